"""The SQLite read by id (``broker.storage.sqlite_reader``) that GetAccessToken uses on a cache
miss: the same row as the pooled path, on the event loop when no lock is in the way, in a
thread of its own when one is (the loop never waits), and a failure that is STORAGE_UNAVAILABLE
and leaves a connection that is reopened on the next read."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from itertools import product
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings, Settings
from broker.errors import StorageUnavailable
from broker.model import Kind, Status, StoredIntegration
from broker.server.app import Broker
from broker.storage import repository
from broker.storage.engine import create_engine, storage_errors
from broker.storage.sqlite_reader import SqliteReader, reader_for
from broker.storage.tables import integrations
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, make_settings

BASE = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def database_file(database_url: str) -> str:
    return database_url.removeprefix("sqlite+aiosqlite:///")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(DatabaseSettings(url=database_url))
    yield engine
    await engine.dispose()


@pytest.fixture
async def reader(engine: AsyncEngine) -> AsyncIterator[SqliteReader]:
    opened = reader_for(engine, 2.0)
    assert opened is not None
    yield opened
    await opened.close()


def _row(n: int, kind: Kind, status: Status, *, full: bool) -> dict[str, Any]:
    """Every column the broker writes; ``full`` sets the optional ones, otherwise they are
    NULL (or empty) — the shapes the kinds and statuses take in practice and a few beyond."""
    minted = kind.minted
    at = BASE + timedelta(days=n, microseconds=n)
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "user_id": f"user-{n}",
        "provider": "twitter",
        "account_id": f"acct-{n}" if full else "",
        "status": status.value,
        "token_type": "Bearer" if full else "bearer",
        "scopes": ["tweet.read", "users.read", "ü"] if full else [],
        "metadata": {"team": "bench", "note": "naïve ☃", "empty": ""} if full else {},
        "created_at": at,
        # Whole seconds: SQLAlchemy still writes ".000000"; both paths must read it back.
        "updated_at": at.replace(microsecond=0) + timedelta(seconds=1),
        "expires_at": at + timedelta(hours=1) if full else None,
        "last_refreshed_at": at + timedelta(minutes=1) if full else None,
        "disconnected_at": at + timedelta(minutes=2) if status is Status.DISCONNECTED else None,
        "disconnect_reason": "user asked" if status is Status.DISCONNECTED and full else None,
        "version": 2**40 + n if full else 1,
        "access_token_ct": None if minted and not full else bytes([0, n % 256, 255]) * 20,
        "refresh_token_ct": b"\x00rt" * 10 if full and not minted else None,
        "key_id": "test1" if full else None,
        "refresh_failures": n if full else 0,
        "revocation": "PENDING" if full and status is Status.DISCONNECTED else None,
        "revocation_attempts": 3 if full else 0,
        "credential_type": kind.value,
        "credential_ct": (b"{ct}" * 8 if full else b"")
        if kind is not Kind.AUTHORIZATION_CODE
        else None,
        "last_refresh_error": "invalid_grant" if full else None,
        "next_refresh_at": at + timedelta(minutes=50) if full else None,
        "issued_lifetime_seconds": 3600 if full else None,
    }
    return values


def _same(pooled: StoredIntegration, raw: StoredIntegration) -> None:
    """Equal, and of the same types field by field (``bytes == memoryview`` is True, and an
    aware datetime never equals a naive one but its type would not say so)."""
    assert raw == pooled
    pairs: list[tuple[Any, Any]] = [(pooled, raw), (pooled.integration, raw.integration)]
    for a, b in pairs:
        for f in dataclasses.fields(a):
            left, right = getattr(a, f.name), getattr(b, f.name)
            assert type(left) is type(right), f.name
            if isinstance(left, datetime):
                assert left.tzinfo is UTC, f.name
                assert right.tzinfo is UTC, f.name


async def test_same_row_as_the_pooled_path(engine: AsyncEngine, reader: SqliteReader) -> None:
    rows = [
        _row(n, kind, status, full=full)
        for n, (kind, status, full) in enumerate(product(Kind, Status, (True, False)))
    ]
    async with engine.begin() as conn:
        for values in rows:
            await conn.execute(insert(integrations).values(**values))
    async with engine.connect() as conn:
        for values in rows:
            pooled = await repository.read(conn, values["id"])
            raw = await reader.read(values["id"])
            assert pooled is not None
            assert raw is not None
            _same(pooled, raw)
            assert raw.integration.version == values["version"]
            assert raw.access_token_ct == values["access_token_ct"]
    assert reader.waited == 0


async def test_missing_id_is_none(reader: SqliteReader) -> None:
    assert await reader.read(str(uuid.uuid4())) is None
    assert await reader.read("") is None


async def test_each_read_sees_every_earlier_commit(
    engine: AsyncEngine, reader: SqliteReader, database_file: str
) -> None:
    """No snapshot outlives a read: a commit by another connection shows at the next read."""
    values = _row(1, Kind.AUTHORIZATION_CODE, Status.CONNECTED, full=True)
    async with engine.begin() as conn:
        await conn.execute(insert(integrations).values(**values))
    first = await reader.read(values["id"])
    assert first is not None
    with sqlite3.connect(database_file, isolation_level=None) as other:
        other.execute("UPDATE integrations SET version = 7 WHERE id = ?", (values["id"],))
    again = await reader.read(values["id"])
    assert again is not None
    assert again.integration.version == 7


@pytest.fixture
def holder(database_file: str) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(database_file, isolation_level=None, timeout=0)
    yield conn
    conn.close()


@pytest.mark.parametrize("begin", ["BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"])
async def test_a_held_write_lock_does_not_stop_the_read(
    engine: AsyncEngine, reader: SqliteReader, holder: sqlite3.Connection, begin: str
) -> None:
    """WAL: the committed row, at once, on the loop, while another connection holds the write
    lock with an uncommitted change to that very row."""
    values = _row(1, Kind.API_KEY, Status.CONNECTED, full=True)
    async with engine.begin() as conn:
        await conn.execute(insert(integrations).values(**values))
    holder.execute(begin)
    holder.execute("UPDATE integrations SET version = 99 WHERE id = ?", (values["id"],))
    started = time.monotonic()
    got = await reader.read(values["id"])
    assert time.monotonic() - started < 0.5
    assert got is not None
    assert got.integration.version == values["version"]
    assert reader.waited == 0
    holder.execute("ROLLBACK")


async def _max_gap(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this task, until ``stop``."""
    gap = 0.0
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.005)
        now = time.monotonic()
        gap = max(gap, now - last)
        last = now
    return gap


@pytest.fixture
def rollback_journal(database_file: str) -> str:
    """The database out of WAL mode, where a writer's lock does keep readers out."""
    with sqlite3.connect(database_file, isolation_level=None) as conn:
        assert conn.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    return database_file


async def test_a_lock_that_stops_readers_is_waited_out_in_a_thread(
    rollback_journal: str, holder: sqlite3.Connection
) -> None:
    with sqlite3.connect(rollback_journal, isolation_level=None) as conn:
        values = _row(1, Kind.BASIC, Status.CONNECTED, full=False)
        conn.execute(
            "INSERT INTO integrations (id, user_id, provider, status, scopes, metadata, "
            "created_at, updated_at, credential_type) VALUES (?, 'u', 'p', 'CONNECTED', '[]', "
            "'{}', '2026-01-02 03:04:05.000006', '2026-01-02 03:04:05.000006', 'basic')",
            (values["id"],),
        )
    reader = SqliteReader(rollback_journal, 5.0, create_engine(DatabaseSettings()).dialect)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE integrations SET version = 5 WHERE id = ?", (values["id"],))
        # The holder commits from the loop: a reader that blocked the loop would deadlock.
        asyncio.get_running_loop().call_later(0.3, holder.execute, "COMMIT")
        waits_before = REGISTRY.get_sample_value("broker_db_read_lock_waits_total") or 0.0
        stop = asyncio.Event()
        ticker = asyncio.create_task(_max_gap(stop))
        started = time.monotonic()
        got = await reader.read(values["id"])
        waited = time.monotonic() - started
        stop.set()
        gap = await ticker
        assert got is not None
        assert got.integration.version == 5
        assert got.integration.created_at == datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
        assert waited >= 0.25
        assert gap < 0.2
        assert reader.waited == 1
        # Operators see it: the metric counts reads that had to wait for a lock.
        waits = REGISTRY.get_sample_value("broker_db_read_lock_waits_total")
        assert waits == waits_before + 1
        # The lock gone, the next read is answered on the loop again.
        assert await reader.read(values["id"]) is not None
        assert reader.waited == 1
    finally:
        await reader.close()


async def test_a_lock_held_past_the_timeout_is_storage_unavailable(
    rollback_journal: str, holder: sqlite3.Connection
) -> None:
    reader = SqliteReader(rollback_journal, 0.2, create_engine(DatabaseSettings()).dialect)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageUnavailable):
            async with storage_errors():
                await reader.read("x")
        holder.execute("ROLLBACK")
        assert await reader.read("x") is None
    finally:
        await reader.close()


async def test_a_failed_read_is_unavailable_and_the_connection_reopened(
    engine: AsyncEngine, reader: SqliteReader, database_file: str, tmp_path: Path
) -> None:
    """On a copy whose table goes away under an open connection."""
    values = _row(1, Kind.AUTHORIZATION_CODE, Status.CONNECTED, full=True)
    async with engine.begin() as conn:
        await conn.execute(insert(integrations).values(**values))
    await engine.dispose()
    copy = str(tmp_path / "copy.db")
    with sqlite3.connect(database_file) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    on_copy = SqliteReader(copy, 2.0, engine.dialect)
    try:
        assert await on_copy.read(values["id"]) is not None
        opened = on_copy._here
        assert opened is not None
        with sqlite3.connect(copy, isolation_level=None) as other:
            other.execute("ALTER TABLE integrations RENAME TO parked")
        with pytest.raises(StorageUnavailable) as caught:
            async with storage_errors():
                await on_copy.read(values["id"])
        assert caught.value.reason == "STORAGE_UNAVAILABLE"
        assert on_copy._here is None
        with pytest.raises(sqlite3.ProgrammingError):
            opened.execute("SELECT 1")  # closed, not kept for the next call
        with sqlite3.connect(copy, isolation_level=None) as other:
            other.execute("ALTER TABLE parked RENAME TO integrations")
        again = await on_copy.read(values["id"])
        assert again is not None
        assert again.integration.id == values["id"]
        assert on_copy._here is not None
        assert on_copy._here is not opened
    finally:
        await on_copy.close()


async def test_closed_reader_refuses_and_closes_once(reader: SqliteReader) -> None:
    assert await reader.read("x") is None
    await reader.close()
    await reader.close()
    with pytest.raises(StorageUnavailable):
        await reader.read("x")


async def test_only_sqlite_files_get_a_reader(tmp_path: Path) -> None:
    urls = {
        f"sqlite+aiosqlite:///{tmp_path / 'a.db'}": True,
        "sqlite+aiosqlite:///:memory:": False,
        "sqlite+aiosqlite://": False,
        f"sqlite+aiosqlite:///file:{tmp_path / 'b.db'}?uri=true": False,
        "postgresql+asyncpg://u@127.0.0.1:1/db": False,
    }
    for url, expected in urls.items():
        engine = create_engine(DatabaseSettings(url=url))
        try:
            got = reader_for(engine, 1.0)
            assert (got is not None) == expected, url
            if got is not None:
                await got.close()
        finally:
            await engine.dispose()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, cache={"enabled": False})


async def test_get_access_token_cold_over_grpc(
    broker: Broker, stub: pb_grpc.CredentialBrokerAsyncStub, database_file: str
) -> None:
    """Cache off: every GetAccessToken reads through the SQLite reader, sees a newer write at
    once, and answers STORAGE_UNAVAILABLE while the table is away, then recovers."""
    runtime = broker.runtime
    assert runtime.sqlite_reader is not None
    assert runtime.service.reader is runtime.sqlite_reader
    stored = await stub.StoreIntegration(store_request(access_token="at-1"), metadata=ADMIN)
    iid = stored.integration.id
    request = pb.GetAccessTokenRequest(integration_id=iid)
    for _ in range(3):
        got = await stub.GetAccessToken(request, metadata=ADMIN)
        assert got.access_token == "at-1"
    await stub.StoreIntegration(store_request(access_token="at-2"), metadata=ADMIN)
    assert (await stub.GetAccessToken(request, metadata=ADMIN)).access_token == "at-2"
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=str(uuid.uuid4())), metadata=ADMIN
        ),
        grpc.StatusCode.NOT_FOUND,
    )

    def rename(old: str, new: str) -> None:
        with sqlite3.connect(database_file, isolation_level=None) as other:
            other.execute(f"ALTER TABLE {old} RENAME TO {new}")

    # In a thread: waiting for the write lock on the event loop would stall a background
    # write transaction of the broker's that holds it, until SQLite's timeout.
    await asyncio.to_thread(rename, "integrations", "parked")
    try:
        await expect_error(
            stub.GetAccessToken(request, metadata=ADMIN),
            grpc.StatusCode.UNAVAILABLE,
            "STORAGE_UNAVAILABLE",
        )
    finally:
        await asyncio.to_thread(rename, "parked", "integrations")
    assert (await stub.GetAccessToken(request, metadata=ADMIN)).access_token == "at-2"
    assert runtime.sqlite_reader.waited == 0
