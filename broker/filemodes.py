"""The broker's own files are its owner's alone: the SQLite database (and its -wal and -shm,
which SQLite creates with the database file's mode), the dev key and token, and ``.broker/``.
Files 0600 and folders 0700, whatever the umask; a loose one found from an earlier run is
tightened with a warning naming it, and one of another user is left alone (also warned of)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("broker.files")

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create ``path`` (0700) when missing; parents missing too are made as mkdir makes them.
    An existing folder keeps its mode: it may be anyone's (``/var/lib``, a project folder)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=DIR_MODE, exist_ok=True)
        # mkdir's mode passes through the umask, which only ever removes bits.
        os.chmod(path, DIR_MODE)


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty with 0600 unless it exists; True when this call created it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def owned_by_us(path: Path) -> bool:
    return os.stat(path).st_uid == os.getuid()


def tighten(path: Path, what: str) -> bool:
    """Make an existing ``path`` of ours that group or others may use 0600 (0700 for a
    folder), with a warning; False when it is loose and not ours (left as it is, warned of).
    A missing path is fine (True)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return True
    mode = stat.S_IMODE(found.st_mode)
    if not mode & 0o077:
        return True
    target = DIR_MODE if stat.S_ISDIR(found.st_mode) else FILE_MODE
    if found.st_uid != os.getuid():
        log.warning(
            "%s %s has mode %04o (other users may read it) and belongs to another user; "
            "left as it is, fix it with `chmod %o %s`",
            what,
            path,
            mode,
            target,
            path,
        )
        return False
    os.chmod(path, target)
    log.warning(
        "%s %s had mode %04o, so other users could read it; changed to %04o (replace what "
        "it holds if others may have read it)",
        what,
        path,
        mode,
        target,
    )
    return True
