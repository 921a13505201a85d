"""The audit trail in the database: writing batches of events (the group commit's sinks) and
reading them back (``broker audit``: newest first, filtered by user, integration or caller).
Events hold no tokens, so they can be printed as they are."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import asyncpg
from sqlalchemy import insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.storage.engine import asyncpg_dsn, bulk_insert, raw_driver, sqlite_locked
from broker.storage.repository import utc
from broker.storage.tables import audit_events as t

log = logging.getLogger("broker.audit")

# When an event counts as written (``audit.durability``): "commit" once it is flushed to disk,
# "write" once it is committed and handed to the operating system (PostgreSQL's WAL writer or
# the page cache flushes it moments later).
Durability = Literal["commit", "write"]


async def list_events(
    conn: AsyncConnection,
    *,
    user_id: str | None = None,
    integration_id: str | None = None,
    caller: str | None = None,
    run_id: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    query = select(t)
    if user_id:
        query = query.where(t.c.user_id == user_id)
    if integration_id:
        query = query.where(t.c.integration_id == integration_id)
    if caller:
        query = query.where(t.c.caller == caller)
    if run_id:
        query = query.where(t.c.run_id == run_id)
    if since is not None:
        query = query.where(t.c.occurred_at >= since)
    rows = (await conn.execute(query.order_by(t.c.occurred_at.desc()).limit(limit))).all()
    events = []
    for row in rows:
        event = dict(row._mapping)
        event["occurred_at"] = utc(event["occurred_at"])
        events.append(event)
    return events


COLUMNS = (
    "id",
    "occurred_at",
    "caller",
    "method",
    "integration_id",
    "user_id",
    "provider",
    "outcome",
    "request_id",
    "detail",
    "credential_type",
    "grant_id",
    "run_id",
)
_SQLITE_INSERT = (
    "INSERT INTO audit_events (id, occurred_at, caller, method, integration_id, user_id, "
    "provider, outcome, request_id, detail, credential_type, grant_id, run_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# SQLAlchemy's storage format for DateTime on SQLite (naive UTC), so its reads parse our rows.
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


async def insert_event(conn: AsyncConnection, row: tuple[Any, ...]) -> None:
    """One event (in ``COLUMNS`` order) inside the caller's transaction."""
    await conn.execute(insert(t).values(dict(zip(COLUMNS, row, strict=True))))


class EventSink(Protocol):
    """Where committed batches of audit events go (one transaction per ``write``)."""

    async def write(self, rows: list[tuple[Any, ...]]) -> None: ...

    async def close(self) -> None: ...


class EngineSink:
    """Batches through the engine's pool: one executemany on SQLite, COPY on PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.engine.connect() as conn, raw_driver(conn) as driver:
            if conn.dialect.name == "postgresql":
                await driver.copy_records_to_table("audit_events", records=rows, columns=COLUMNS)
                return
            await driver.executemany(
                _SQLITE_INSERT,
                [(r[0], r[1].astimezone(UTC).strftime(_SQLITE_TIME), *r[2:]) for r in rows],
            )
            await driver.commit()

    async def close(self) -> None:
        return None


def _unnest_insert() -> str:
    """``INSERT ... SELECT FROM unnest($1::type[], ...)``: a whole batch is one execution of
    one prepared statement, whatever its size (so asyncpg prepares it once per connection)."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    casts = ", ".join(
        f"${i}::{t.c[name].type.compile(dialect=dialect)}[]" for i, name in enumerate(COLUMNS, 1)
    )
    # Built from our own column names and types at import, never from input.
    return f"INSERT INTO audit_events ({', '.join(COLUMNS)}) SELECT * FROM unnest({casts})"  # noqa: S608


class PostgresSink:
    """The GetAccessToken hot path's one write, on a connection of its own.

    Outside the pool: no checkout, check-in or greenlet hop per batch, and the prepared
    statement stays on the connection. A failed batch drops the connection (its state is
    unknown after a network error); the next batch connects again.
    """

    def __init__(self, dsn: str, timeout: float, durability: Durability = "commit") -> None:
        self.dsn = dsn
        self.timeout = timeout
        self.statement = _unnest_insert()
        self._conn: asyncpg.Connection | None = None
        self.settings = {"application_name": "credential-broker-audit"}
        if durability == "write":
            # The session's commits return once their WAL is written, not flushed: a broker
            # crash loses nothing, a PostgreSQL crash loses at most the last few
            # wal_writer_delay of them (never a torn or half-applied batch). "commit" leaves
            # the server's own setting in force.
            self.settings["synchronous_commit"] = "off"

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            conn = self._conn = await asyncpg.connect(
                self.dsn,
                timeout=self.timeout,
                command_timeout=self.timeout,
                server_settings=self.settings,
            )
        try:
            await conn.execute(self.statement, *zip(*rows, strict=True))
        except BaseException:
            self._conn = None
            conn.terminate()
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), self.timeout)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()


class SqliteSink:
    """SQLite's counterpart of ``PostgresSink``: connections of its own instead of a pool
    checkout, a thread hop per statement and a rollback at check-in.

    With ``audit.durability = "write"`` a batch is written on the event loop's thread when the
    database's write lock is free at once — the common case, and an insert and a commit that
    need no fsync (WAL, synchronous NORMAL) cost less than the two thread hops around them.
    When another connection holds the lock (a refresh being written, the CLI) the loop must
    not wait for it — that writer may need the loop to finish — so the batch goes to a thread
    of the sink's own, which waits up to the database timeout. With "commit" (synchronous
    FULL: the commit fsyncs) every batch goes to that thread.

    Checkpoints run beside the writer, not inside it: SQLite's automatic checkpoint runs in the
    commit that crosses its threshold and fsyncs there, so every call waiting on that batch
    would wait for the disk too (the p99). The audit connection turns it off and a second
    connection, in a thread of its own, runs a PASSIVE checkpoint (which never blocks the
    writer) every ``_CHECKPOINT_ROWS`` events."""

    def __init__(self, database: str, timeout: float, durability: Durability = "commit") -> None:
        self.database = database
        self.timeout = timeout
        # "commit": every commit fsyncs the write-ahead log (FULL) — in the sink's thread,
        # never on the event loop. "write": the log is fsynced only at checkpoints (NORMAL,
        # the broker's own setting for its other connections): an application crash loses
        # nothing, a power loss or operating-system crash may roll back the commits since
        # the last checkpoint.
        self.synchronous = "FULL" if durability == "commit" else "NORMAL"
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-sqlite")
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-wal")
        self._conn: sqlite3.Connection | None = None  # the thread's
        self._here: sqlite3.Connection | None = None  # the event loop's (never waits)
        self._closed = False
        self._unchecked = 0  # events written since the last checkpoint began
        self._checkpoint: asyncio.Future[None] | None = None

    def _connect(self, timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self.database, timeout=timeout, isolation_level=None)
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """In the sink's thread: waits for the write lock (up to the database timeout)."""
        conn = self._conn if self._conn is not None else self._connect(self.timeout)
        self._conn = None  # back only once the batch went through (a failure closed it)
        _write_batch(conn, rows, wait=True)
        self._conn = conn

    def _write_here(self, rows: list[tuple[Any, ...]]) -> bool:
        """On the event loop's thread, only if the write lock is free at once; False if not
        (nothing written)."""
        conn = self._here if self._here is not None else self._connect(0)
        self._here = None
        written = _write_batch(conn, rows, wait=False)
        self._here = conn
        return written

    def _checkpoint_wal(self) -> None:
        try:
            with contextlib.closing(sqlite3.connect(self.database, timeout=self.timeout)) as conn:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            # The next one will catch up; until then the write-ahead log is only longer.
            log.warning("audit: WAL checkpoint failed (%s)", type(exc).__name__)

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        if self._closed:
            # Events that reach a closed sink are not written: their calls fail (fail closed).
            raise RuntimeError("the audit sink is closed")
        loop = asyncio.get_running_loop()
        # A commit that fsyncs is never made on the event loop's thread (the loop would stop
        # for the disk).
        if self.synchronous == "FULL" or not self._write_here(rows):
            await loop.run_in_executor(self._thread, self._write, rows)
        self._unchecked += len(rows)
        if self._unchecked >= _CHECKPOINT_ROWS and (
            self._checkpoint is None or self._checkpoint.done()
        ):
            self._unchecked = 0
            self._checkpoint = loop.run_in_executor(self._checkpointer, self._checkpoint_wal)

    async def close(self) -> None:
        if self._closed:
            return  # a runtime may be closed twice (start-up failure, then shutdown)
        self._closed = True

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        here, self._here = self._here, None
        if here is not None:
            here.close()
        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        if self._checkpoint is not None:
            await self._checkpoint
        self._thread.shutdown(wait=False)
        self._checkpointer.shutdown(wait=False)


def _write_batch(conn: sqlite3.Connection, rows: list[tuple[Any, ...]], *, wait: bool) -> bool:
    """The batch in one transaction. Without ``wait``, False (nothing written) when another
    connection holds the write lock. On any failure ``conn`` is closed — an open transaction
    is rolled back with it — and the error raised."""
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not wait and sqlite_locked(exc):
                return False
            raise
        conn.executemany(
            _SQLITE_INSERT,
            [(r[0], r[1].astimezone(UTC).strftime(_SQLITE_TIME), *r[2:]) for r in rows],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return True


# Events between checkpoints of the SQLite audit (about SQLite's own 1,000-page default).
_CHECKPOINT_ROWS = 2000


def sink_for(engine: AsyncEngine, timeout: float, durability: Durability = "commit") -> EventSink:
    """A connection of the audit's own: asyncpg on PostgreSQL, sqlite3 (in a thread of its
    own) for a SQLite file; the pool for an in-memory SQLite database (tests)."""
    if engine.dialect.name == "postgresql":
        return PostgresSink(asyncpg_dsn(engine.url), timeout, durability)
    database = engine.url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        return SqliteSink(database, timeout, durability)
    return EngineSink(engine)


async def insert_events(conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
    """Many events (in ``COLUMNS`` order) in one statement, inside the caller's transaction."""
    if rows:
        await bulk_insert(conn, t, [dict(zip(COLUMNS, row, strict=True)) for row in rows])
