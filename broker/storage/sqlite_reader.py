"""GetAccessToken's read by integration id on a SQLite file (a cache miss, or the cache off):
SQLite's counterpart of ``broker.storage.reader``.

Through the engine's pool a point read costs a pool checkout, a greenlet switch, two hops to
aiosqlite's thread and back, and a rollback at check-in — most of a cold call's CPU. Here the
standard library's ``sqlite3`` runs one statement on a connection of the reader's own (sqlite3
keeps it prepared: the text is the same every time), on the event loop's thread: a lookup by
primary key takes tens of microseconds, and in WAL mode readers do not wait for the writer.

The loop must never wait on a lock, though — the connection holding it may need the loop to
finish. So the loop's connection has no busy timeout: when SQLite answers SQLITE_BUSY or
SQLITE_LOCKED at once (WAL recovery after a crash, a database not in WAL mode with a writer
committing), the read goes to a thread of the reader's own, whose connection waits up to the
database timeout, as ``audit_log.SqliteSink`` does for its writes.

Rows are converted by SQLAlchemy's own result processors for the engine's dialect (text
datetimes, JSON text), then by position (``repository.from_values``): the same
``StoredIntegration`` as the pooled path. Ciphertexts stay ciphertexts; nothing is logged but
the kind of a failure. Any ``sqlite3.Error`` closes the connection it happened on (the next read
opens a new one) and is raised as ``StorageUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from broker import metrics
from broker.errors import StorageUnavailable
from broker.model import StoredIntegration
from broker.storage.engine import sqlite_locked
from broker.storage.repository import FIELDS, SQLITE_GET_BY_ID, from_values
from broker.storage.tables import integrations as t

log = logging.getLogger("broker.storage")

Processor = Callable[[Any], Any]


def _processors(dialect: Dialect) -> list[tuple[int, Processor]]:
    """(position, converter) of the columns SQLAlchemy converts on this dialect: the datetimes
    (naive text -> datetime; ``from_values`` makes them aware UTC) and the JSON columns. The
    rest (text, integers, BLOBs as bytes) come out of sqlite3 as SQLAlchemy hands them on."""
    found: list[tuple[int, Processor]] = []
    for position, name in enumerate(FIELDS):
        column_type = t.c[name].type
        convert = column_type.dialect_impl(dialect).result_processor(dialect, None)
        if convert is not None:
            found.append((position, convert))
    return found


class _Busy(Exception):
    """The loop's connection met a lock; the read goes to the reader's thread."""


class SqliteReader:
    def __init__(self, database: str, timeout: float, dialect: Dialect) -> None:
        self.database = database
        self.timeout = timeout
        self._convert = _processors(dialect)
        self._here: sqlite3.Connection | None = None  # the event loop's (never waits)
        self._conn: sqlite3.Connection | None = None  # the thread's (waits up to timeout)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-sqlite")
        self._closed = False
        # Reads that met a lock and went to the thread (tests, and what a gauge would show).
        self.waited = 0

    def _connect(self, timeout: float) -> sqlite3.Connection:
        # Autocommit: each read is its own transaction, so no snapshot outlives its statement
        # (the next read sees every commit before it, and checkpoints are never held back).
        conn = sqlite3.connect(self.database, timeout=timeout, isolation_level=None)
        try:
            # Only the one SELECT ever runs here; refuse anything else. WAL mode is the file's
            # (the engine sets it) and synchronous only concerns writers.
            conn.execute("PRAGMA query_only=ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _fetch(self, conn: sqlite3.Connection, integration_id: str) -> list[Any]:
        # fetchall steps the statement to its end, which resets it and ends the transaction.
        return conn.execute(SQLITE_GET_BY_ID, (integration_id,)).fetchall()

    def _read_here(self, integration_id: str) -> list[Any]:
        """On the event loop's thread; ``_Busy`` at once if a lock is in the way."""
        conn = self._here
        self._here = None  # back only after a clean read: a failure closes it
        try:
            if conn is None:
                conn = self._connect(0)
            rows = self._fetch(conn, integration_id)
        except sqlite3.OperationalError as exc:
            if sqlite_locked(exc):
                # Nothing wrong with the connection: a lock it did not wait for.
                self._here = conn
                raise _Busy from None
            _discard(conn)
            raise
        except BaseException:
            _discard(conn)
            raise
        self._here = conn
        return rows

    def _read_waiting(self, integration_id: str) -> list[Any]:
        """In the reader's thread: waits for a lock up to the database timeout."""
        conn = self._conn
        self._conn = None
        try:
            if conn is None:
                conn = self._connect(self.timeout)
            rows = self._fetch(conn, integration_id)
        except BaseException:
            _discard(conn)
            raise
        self._conn = conn
        return rows

    async def read(self, integration_id: str) -> StoredIntegration | None:
        """The row, or None; StorageUnavailable if SQLite fails."""
        if self._closed:
            raise StorageUnavailable("the database is unreachable; retry shortly", cause="closed")
        try:
            try:
                rows = self._read_here(integration_id)
            except _Busy:
                self.waited += 1
                metrics.READ_LOCK_WAITS.inc()
                loop = asyncio.get_running_loop()
                rows = await loop.run_in_executor(self._thread, self._read_waiting, integration_id)
        except sqlite3.Error as exc:
            name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
            log.warning("integration read failed (%s); the next read reconnects", name)
            raise StorageUnavailable(
                "the database is unreachable; retry shortly", cause=type(exc).__name__
            ) from None
        return self.convert(rows[0]) if rows else None

    def convert(self, row: Sequence[Any]) -> StoredIntegration:
        values = list(row)
        for position, convert in self._convert:
            values[position] = convert(values[position])
        return from_values(values)

    async def close(self) -> None:
        if self._closed:
            return  # a runtime may be closed twice (start-up failure, then shutdown)
        self._closed = True
        here, self._here = self._here, None
        _discard(here)

        def close() -> None:
            conn, self._conn = self._conn, None
            _discard(conn)

        # The thread's connection is closed in its thread, after any read still running there.
        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown(wait=False)


def _discard(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()


def reader_for(engine: AsyncEngine, timeout: float) -> SqliteReader | None:
    """A reader for a SQLite file; None for an in-memory or URI database (tests), which other
    connections may not see: those keep reading through the pool."""
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return SqliteReader(database, timeout, engine.dialect)
