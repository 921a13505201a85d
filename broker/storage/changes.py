"""Hearing other processes' writes on SQLite, the job NOTIFY does on PostgreSQL.

A broker on SQLite is one process, but an operator's CLI (``broker integrations
disconnect``, ``broker grants revoke``) writes to the same file. Every transaction that changes
an integration or revokes a grant records what it changed in ``change_log``
(``broker.storage.engine.announce``) and, once committed, appends a byte to a stamp file beside
the database (``<database>-changes``). Before each cache lookup the broker compares the stamp
file's ``stat`` with the one it saw last (a microsecond or two); only when it moved does it read
the change-log rows it has not seen and drop those entries from its caches. So the next call
after a CLI write is answered from the database.

Why a stamp file rather than ``PRAGMA data_version``: data_version moves on every commit of any
other connection, and the broker's own audit writes commit on every call, so the change log
would be read on every call (about 90 us on a busy 2-core machine, most of a cache hit).

The change log is read through the standard library's ``sqlite3`` from the event loop's thread:
an indexed read of a few rows of a tiny table, only after a write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable

log = logging.getLogger("broker.cache")

Invalidate = Callable[[str, str, str], None]
# The stamp file is rewritten empty past this size (its inode changes, so the stamp still moves).
_STAMP_LIMIT = 4096
_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def stamp_path(database: str) -> str:
    return f"{database}-changes"


def bump(database: str) -> None:
    """After a commit that announced changes: move the stamp other processes watch."""
    path = stamp_path(database)
    try:
        # 0600 like the database beside it (no secret in it, but nobody else's business).
        with os.fdopen(os.open(path, _APPEND, 0o600), "ab") as stamp:
            stamp.write(b".")
            size = stamp.tell()
        if size > _STAMP_LIMIT:
            fresh = f"{path}.{os.getpid()}"
            os.close(os.open(fresh, _CREATE, 0o600))
            os.replace(fresh, path)
    except OSError as exc:  # a broker that cannot see the stamp flushes on its own (poll)
        log.warning("cannot update %s (%s)", path, exc.strerror)


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ChangeWatcher:
    def __init__(
        self, database: str, on_change: dict[str, Invalidate], flush: Callable[[], None]
    ) -> None:
        # check_same_thread=False: opened in whatever thread builds the runtime, then used
        # only from the event loop's thread.
        self._conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=1000")
        self._path = stamp_path(database)
        self._on_change = on_change
        self._flush = flush
        self._seen = _stamp(self._path)
        try:
            row = self._conn.execute("SELECT max(seq) FROM change_log").fetchone()
        except sqlite3.Error:  # not migrated yet: the broker refuses to serve it anyway
            row = (0,)
        self._seq = int(row[0] or 0)

    def poll(self) -> None:
        """Drop what other connections changed since the last poll."""
        stamp = _stamp(self._path)
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            rows = self._conn.execute(
                "SELECT seq, kind, key, user_id, provider FROM change_log WHERE seq > ? "
                "ORDER BY seq",
                (self._seq,),
            ).fetchall()
        except sqlite3.Error as exc:
            # Cannot tell what changed: forget everything rather than serve stale entries.
            log.warning("change log unreadable (%s): caches flushed", type(exc).__name__)
            self._flush()
            return
        if rows and self._seq and rows[0][0] != self._seq + 1:
            # Rows we never saw were purged (a broker idle for a long time): start afresh.
            self._flush()
        for seq, kind, key, user_id, provider in rows:
            handler = self._on_change.get(kind)
            if handler is not None:
                handler(key, user_id, provider)
            self._seq = seq

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
