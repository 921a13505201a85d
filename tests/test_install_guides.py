"""The install commands the deployment guides give resolve as written: the server depends on
the client distribution, which is on no index, so a guide must install both from the clone."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_systemd_units_install_command_resolves() -> None:
    header = (ROOT / "docs" / "credential-broker.service").read_text()
    found = re.search(r"/opt/broker/bin/pip install (.+)", header)
    assert found, "the unit's header gives its install command"
    args = shlex.split(found.group(1))
    assert "./clients/python" in args, "the client distribution is installed beside the server"
    # Resolve every requirement against the index without installing anything.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
