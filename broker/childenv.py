"""The environment a program the broker runs (``keys.command``) gets: what any program needs
to run (PATH, HOME, the locale, TZ, TMPDIR, USER) and the variables the operator named, never
the rest of the broker's. The broker's environment holds its own secrets (``BROKER_*``: the
database URL, keys, webhook secrets) and providers' client secrets, which are no business of
a secrets manager's CLI, nor of anything it runs in turn."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping

BASE = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME")
BASE_PREFIXES = ("LC_",)
# Never passed on, whatever the passthrough says.
WITHHELD_PREFIX = "BROKER_"


def minimal(
    passthrough: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The child's environment: the base names, ``LC_*``, and each ``passthrough`` name or
    ``PREFIX*`` pattern, minus every ``BROKER_*`` variable."""
    source = os.environ if environ is None else environ
    patterns = tuple(passthrough)
    env: dict[str, str] = {}
    for name, value in source.items():
        if name.startswith(WITHHELD_PREFIX):
            continue
        if (
            name in BASE
            or name.startswith(BASE_PREFIXES)
            or any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ):
            env[name] = value
    return env
