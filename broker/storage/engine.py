"""The async engine, built at start-up from the database URL, and storage error mapping."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
from sqlalchemy import JSON, Table, event, insert, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from broker import filemodes
from broker.config import DatabaseSettings
from broker.errors import ConfigError, StorageUnavailable
from broker.storage.changes import Invalidate, bump
from broker.storage.tables import change_log


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    url = make_url(settings.url.get_secret_value())
    if url.get_backend_name() == "sqlite":
        # A ``file:`` URI names its file in SQLite's own syntax (not a path to create here).
        if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
            _private_sqlite_files(Path(url.database))
        engine = create_async_engine(
            url, connect_args={"timeout": settings.timeout_seconds}, pool_pre_ping=False
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        if url.database and url.database != ":memory:":
            event.listen(engine.sync_engine, "checkin", _stamp_after_commit(url.database))
        return engine
    engine = create_async_engine(
        url,
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        pool_timeout=settings.timeout_seconds,
        # No pre-ping: it costs a round trip per checkout on the hot path; a dead connection
        # surfaces as an error that invalidates the pool, and the next call reconnects.
        pool_pre_ping=False,
        connect_args={
            "timeout": settings.timeout_seconds,
            "command_timeout": settings.timeout_seconds,
            "server_settings": {"application_name": "credential-broker"},
        },
    )
    event.listen(engine.sync_engine, "handle_error", _drop_broken_connection)
    return engine


def _private_sqlite_files(database: Path) -> None:
    """The database file exists, 0600, before SQLite opens it: SQLite gives the -wal and
    -shm files the database file's mode, so all three are the owner's alone whatever the
    umask. Files of an earlier run that others could read are tightened (with a warning)."""
    folder = database.parent
    try:
        filemodes.private_dir(folder)
        if not filemodes.create_private_file(database):
            for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
                filemodes.tighten(path, "SQLite file")
    except OSError as exc:
        raise ConfigError(
            f"database.url: cannot create the SQLite file {database} (or its folder): "
            f"{exc.strerror}"
        ) from None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run while the single writer commits. A lock is waited out for
    # database.timeout_seconds: the connect argument ``timeout`` sets SQLite's busy timeout
    # (a busy_timeout pragma here would override it).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def sqlite_locked(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds a lock this one did not wait for (SQLITE_BUSY or
    SQLITE_LOCKED; extended codes such as SQLITE_BUSY_RECOVERY too: the low byte is the kind).
    The connections that must never block the event loop move their work to a thread then."""
    return getattr(exc, "sqlite_errorcode", -1) & 0xFF in _SQLITE_LOCKED


_SQLITE_LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def connection_broken(exc: BaseException) -> bool:
    """True when asyncpg raised something after which its connection cannot be trusted: the
    server ended the session (``pg_terminate_backend``, shutdown), the socket died, or the
    protocol was left mid-operation ("cannot switch to state ..."). Bad values
    (``asyncpg.DataError``) and ordinary statement errors leave the connection usable."""
    if isinstance(exc, asyncpg.DataError | asyncpg.ClientConfigurationError):
        return False
    return isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        # AdminShutdownError (pg_terminate_backend), CrashShutdownError, CannotConnectNow.
        | asyncpg.exceptions.OperatorInterventionError
        | OSError
        | ConnectionError
        | asyncio.TimeoutError,
    )


def _driver_error(exc: BaseException) -> BaseException | None:
    """The asyncpg exception behind SQLAlchemy's wrapper (``orig`` chains to it)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(
            seen, asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.InternalClientError
        ):
            return cast(BaseException, seen)
        orig: BaseException | None = getattr(seen, "orig", None)
        seen = orig or seen.__cause__
    return None


def _drop_broken_connection(context: Any) -> None:
    """SQLAlchemy asks asyncpg only whether the socket is closed; a connection whose protocol
    was left mid-operation is still "open" but fails every later statement. Count it as a
    disconnect so SQLAlchemy drops it and the next call gets a fresh one."""
    driver = _driver_error(context.original_exception)
    if driver is not None and connection_broken(driver):
        context.is_disconnect = True


def _stamp_after_commit(database: str) -> Callable[[Any, Any], None]:
    """A connection that announced changes is checked in after its transaction ended: move
    the stamp other processes watch (``broker.storage.changes``). After a rollback the stamp
    moves for nothing, which only costs the watchers one read of the change log."""

    def on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None and record.info.pop(_ANNOUNCED, False):
            bump(database)

    return on_checkin


def is_unavailable(exc: BaseException) -> bool:
    """True when an exception means "the database cannot be reached", not "bad data"."""
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    if isinstance(exc, PendingRollbackError):
        # Using a connection whose transaction died with it: unavailable if that is why.
        return exc.__context__ is not None and is_unavailable(exc.__context__)
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        driver = _driver_error(exc)
        return driver is not None and connection_broken(driver)
    # Raised by asyncpg itself on the raw paths (hot read, audit COPY), unwrapped.
    return connection_broken(exc)


@asynccontextmanager
async def raw_driver(conn: AsyncConnection) -> AsyncIterator[Any]:
    """The driver connection under ``conn``, for the raw hot paths (asyncpg, aiosqlite).

    SQLAlchemy does not see what fails in here, so a failure that leaves the connection
    unusable drops it from the pool here; otherwise the next call would inherit it. A
    cancelled call (the caller's deadline) can leave asyncpg's protocol mid-operation too:
    the next user would get "cannot switch to state ...; another operation is in progress".
    """
    raw = await conn.get_raw_connection()
    try:
        yield raw.driver_connection
    except BaseException as exc:
        if is_unavailable(exc) or not isinstance(exc, Exception):
            await asyncio.shield(conn.invalidate())
        raise


CHANNEL = "broker_invalidate"
# Revoked grants (payload: the grant id), heard by every replica's grant cache.
GRANT_CHANNEL = "broker_grants"
_ANNOUNCED = "announced_changes"


@asynccontextmanager
async def write_transaction(
    engine: AsyncEngine, invalidate: Invalidate | None = None, *, immediate: bool = True
) -> AsyncIterator[AsyncConnection]:
    """A transaction whose writes to integrations are announced once it has committed: to this
    process through ``invalidate`` (its cache), to other replicas by NOTIFY (PostgreSQL sends
    notifications only at commit, so nobody hears of a write that rolled back).

    ``immediate=False``: on SQLite, for a transaction whose first statement writes (it takes
    the write lock, waiting as long as ``BEGIN IMMEDIATE`` would), saving that statement."""
    touched: list[tuple[str, str, str]] = []
    committed: list[Callable[[], None]] = []
    async with storage_errors(), engine.begin() as conn:
        # Kept by reference: once the connection is lost mid-transaction, ``conn.info`` would
        # try to reconnect and raise PendingRollbackError instead of the real failure.
        info = conn.info
        info["touched"] = touched
        info["after_commit"] = committed
        try:
            if immediate and conn.dialect.name == "sqlite":
                # The write lock from the first statement on, as PostgreSQL's FOR UPDATE gives:
                # the driver would begin only at the first write, so what the transaction read
                # before it (an owner's row, its version) could already be stale.
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn
        finally:
            info.pop("touched", None)
            info.pop("after_commit", None)
    if invalidate is not None:
        for integration_id, user_id, provider in touched:
            invalidate(integration_id, user_id, provider)
    for hook in committed:
        hook()


def after_commit(conn: AsyncConnection, hook: Callable[[], None]) -> None:
    """Run ``hook`` once the ``write_transaction`` of ``conn`` has committed (never on a
    rollback); outside one, nothing runs (readers fall back to polling)."""
    hooks = conn.info.get("after_commit")
    if hooks is not None:
        hooks.append(hook)


async def touch(
    conn: AsyncConnection, integration_id: str, user_id: str = "", provider: str = ""
) -> None:
    """Record a write to one integration (see ``write_transaction``)."""
    touched_here(conn, integration_id, user_id, provider)
    await announce(conn, CHANNEL, integration_id, user_id, provider)


def touched_here(
    conn: AsyncConnection, integration_id: str, user_id: str = "", provider: str = ""
) -> None:
    """``touch`` for this process only (its cache, after commit), for a write whose statement
    announced it to the others itself (``notify_payload``)."""
    touched = conn.info.get("touched")
    if touched is not None:
        touched.append((integration_id, user_id, provider))


def notify_payload(integration_id: str, user_id: str = "", provider: str = "") -> str:
    """What ``touch`` sends on ``CHANNEL`` on PostgreSQL, for a statement that sends it
    itself (``pg_notify`` beside the write)."""
    return "\x1f".join((integration_id, user_id, provider))


async def announce(
    conn: AsyncConnection, channel: str, key: str, user_id: str = "", provider: str = ""
) -> None:
    """Tell other processes, once this transaction commits, that ``key`` changed: NOTIFY on
    PostgreSQL (replicas), a ``change_log`` row on SQLite and, once the connection is back in
    the pool, a moved stamp file (another process on the same file, e.g. the CLI; see
    ``broker.storage.changes``)."""
    if conn.dialect.name == "postgresql":
        payload = "\x1f".join((key, user_id, provider))
        await conn.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload}
        )
    elif conn.dialect.name == "sqlite":
        conn.info[_ANNOUNCED] = True
        await conn.execute(
            insert(change_log).values(
                kind=channel,
                key=key,
                user_id=user_id,
                provider=provider,
                occurred_at=datetime.now(UTC),
            )
        )


@asynccontextmanager
async def storage_errors() -> AsyncIterator[None]:
    """Turn "database unreachable" into StorageUnavailable; let everything else through."""
    try:
        yield
    except Exception as exc:
        if is_unavailable(exc):
            raise StorageUnavailable(
                "the database is unreachable; retry shortly", cause=type(exc).__name__
            ) from None
        raise


def describe_url(url: URL) -> str:
    """Where a database is, for people: never the password."""
    if url.get_backend_name() == "sqlite":
        return f"SQLite database {url.database or ':memory:'}"
    host = url.host or "localhost"
    return f"PostgreSQL database {url.database!r} on {host}:{url.port or 5432} as {url.username!r}"


def _innermost(exc: BaseException) -> BaseException:
    """The driver's own exception under SQLAlchemy's wrappers."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "orig", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def describe_cause(exc: BaseException, timeout: float) -> str:
    inner = _innermost(exc)
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused (is the server running, and is this its port?)"
    if isinstance(inner, socket.gaierror):
        return "host name not found"
    if isinstance(inner, asyncio.TimeoutError | TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(inner, asyncpg.TooManyConnectionsError):
        return f"the server refuses more connections ({inner}); lower pool_size or add capacity"
    text = str(inner).strip() or type(inner).__name__
    return text.splitlines()[0]


async def probe(engine: AsyncEngine, connect_timeout: float = 5.0) -> None:
    """Connect once and run ``SELECT 1``, as start-up does before anything else.

    Raises StorageUnavailable whose message names the database (host, port, name, role) and
    the cause in one line: a database or role that does not exist, a wrong host or port, a
    server refusing connections — never a traceback."""
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:
        raise StorageUnavailable(
            f"cannot use the {describe_url(engine.url)}: {describe_cause(exc, connect_timeout)}",
            cause=type(_innermost(exc)).__name__,
        ) from None


def asyncpg_dsn(url: str | URL) -> str:
    """The PostgreSQL URL as asyncpg takes it (no ``+asyncpg`` driver name), password kept:
    for the connections the broker opens without SQLAlchemy (reader, listener, audit sink)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def touch_many(conn: AsyncConnection, written: list[tuple[str, str, str]]) -> None:
    """``touch`` for many integrations written in one transaction (``broker import``): on
    PostgreSQL one statement for the batch."""
    if conn.dialect.name != "postgresql":
        for integration_id, user_id, provider in written:
            await touch(conn, integration_id, user_id, provider)
        return
    touched = conn.info.get("touched")
    if touched is not None:
        touched.extend(written)
    payloads = ["\x1f".join(w) for w in written]
    await conn.execute(
        text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p"),
        {"channel": CHANNEL, "payloads": payloads},
    )


async def bulk_insert(conn: AsyncConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Rows that all name the same columns, in the caller's transaction: on PostgreSQL one
    binary COPY (``broker import``'s batches: a parameter set per row through SQLAlchemy costs
    more than the database's work), elsewhere one executemany."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        await conn.execute(insert(table), rows)
        return
    columns = list(rows[0])
    as_json = {c.name for c in table.columns if isinstance(c.type, JSON)}
    records = [
        tuple(json.dumps(row[c]) if c in as_json else row[c] for c in columns) for row in rows
    ]
    async with raw_driver(conn) as raw:
        await raw.copy_records_to_table(table.name, records=records, columns=columns)
