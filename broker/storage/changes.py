"""Hearing other processes' writes on SQLite, the job NOTIFY does on PostgreSQL.

A broker on SQLite is one process, but an operator's CLI (``broker integrations
disconnect``, ``broker grants revoke``) writes to the same file. Every write transaction
records what it changed in ``change_log`` (``broker.storage.engine.announce``). Before each
cache lookup the broker asks its own read-only connection ``PRAGMA data_version``, which
changes only when another connection has committed (an in-memory check, microseconds); only
then does it read the change-log rows it has not seen and drop those entries from its caches.
Since the check runs before every lookup, the next call after a CLI write is answered from
the database.

The connection is the standard library's ``sqlite3``, used from the event loop's thread: both
statements read the WAL index and a few pages of a tiny table, never waiting on the writer.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

log = logging.getLogger("broker.cache")

Invalidate = Callable[[str, str, str], None]


class ChangeWatcher:
    def __init__(self, path: str, on_change: dict[str, Invalidate], flush: Callable[[], None]):
        # check_same_thread=False: opened in whatever thread builds the runtime, then used
        # only from the event loop's thread.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=1000")
        self._on_change = on_change
        self._flush = flush
        self._version = self._data_version()
        try:
            row = self._conn.execute("SELECT max(seq) FROM change_log").fetchone()
        except sqlite3.Error:  # not migrated yet: the broker refuses to serve it anyway
            row = (0,)
        self._seq = int(row[0] or 0)

    def _data_version(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def poll(self) -> None:
        """Drop what other connections changed since the last poll."""
        try:
            version = self._data_version()
            if version == self._version:
                return
            self._version = version
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
        if rows and rows[0][0] != self._seq + 1 and self._seq:
            # Rows we never saw were purged (a broker idle for a long time): start afresh.
            self._flush()
        for seq, kind, key, user_id, provider in rows:
            handler = self._on_change.get(kind)
            if handler is not None:
                handler(key, user_id, provider)
            self._seq = seq

    def close(self) -> None:
        self._conn.close()
