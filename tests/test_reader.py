"""The PostgreSQL read by id (``broker.storage.reader``) that GetAccessToken uses on a cache
miss: the same row as the pooled path, one statement per call with nothing after it, at most
``pool_size`` connections, and a connection that failed or was cancelled mid-statement is
dropped rather than handed to the next call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.config import DatabaseSettings
from broker.errors import CiphertextInvalid, StorageUnavailable
from broker.model import StoredIntegration
from broker.server.app import Broker, start
from broker.storage import repository
from broker.storage.engine import create_engine, storage_errors
from broker.storage.reader import APPLICATION_NAME, MAX_BATCH, IntegrationReader, open_reader
from tests.helpers.databases import PostgresFactory
from tests.helpers.integrations import store_request
from tests.helpers.proxy import Proxy
from tests.helpers.settings import ADMIN, make_settings
from tests.helpers.stubs import broker_stub

pytestmark = pytest.mark.postgres

POOL_SIZE = 3


def plain_dsn(url: str, port: int | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if port is not None:
        parsed = parsed.set(host="127.0.0.1", port=port)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture
async def database(postgres: PostgresFactory) -> str:
    return await postgres.new()


@pytest.fixture
async def stored_ids(database: str) -> list[str]:
    """Integrations stored through a real broker (encrypted, with scopes and metadata)."""
    broker: Broker = await start(make_settings(database, cache={"enabled": False}))
    try:
        async with broker_stub(broker.port) as stub:
            ids = []
            for n in range(3):
                request = store_request(user_id=f"user-{n}", access_token=f"at-{n}")
                request.metadata["team"] = "bench"
                done = await stub.StoreIntegration(request, metadata=ADMIN)
                ids.append(done.integration.id)
            # And the broker's own GetAccessToken goes through its reader.
            assert broker.runtime.reader is not None
            got = await stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=ids[0]), metadata=ADMIN
            )
            assert got.access_token == "at-0"
    finally:
        await broker.stop(0)
    return ids


@pytest.fixture
async def reader(database: str) -> AsyncIterator[IntegrationReader]:
    opened = await open_reader(
        plain_dsn(database), DatabaseSettings(url=database, pool_size=POOL_SIZE, timeout_seconds=2)
    )
    yield opened
    await opened.close()


async def _sql(database: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_dsn(database))
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _read_backends(database: str) -> list[asyncpg.Record]:
    return await _sql(
        database,
        "SELECT pid, query FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
        make_url(database).database,
        APPLICATION_NAME,
    )


async def test_same_row_as_the_pooled_path(
    database: str, stored_ids: list[str], reader: IntegrationReader
) -> None:
    engine = create_engine(DatabaseSettings(url=database))
    try:
        async with engine.connect() as conn:
            for iid in stored_ids:
                expected = await repository.get(conn, iid)
                assert expected is not None
                got = await reader.read(iid)
                assert got == expected
                assert got.integration.metadata == {"team": "bench"}
                assert got.integration.scopes == expected.integration.scopes
    finally:
        await engine.dispose()
    assert await reader.read("00000000-0000-4000-8000-000000000000") is None


async def test_one_statement_and_nothing_after_it(
    database: str, stored_ids: list[str], reader: IntegrationReader
) -> None:
    """No reset query when the connection goes back (asyncpg's default would run one): the
    last thing the backend ran is the read itself."""
    for _ in range(3):
        assert await reader.read(stored_ids[0]) is not None
    backends = await _read_backends(database)
    assert len(backends) == 1
    assert backends[0]["query"] == repository.GET_BY_ID


async def test_connections_stay_within_pool_size(
    database: str, stored_ids: list[str], reader: IntegrationReader
) -> None:
    reads = [reader.read(stored_ids[n % len(stored_ids)]) for n in range(10 * POOL_SIZE)]
    assert all(r is not None for r in await asyncio.gather(*reads))
    assert 1 <= len(await _read_backends(database)) <= POOL_SIZE


async def test_terminated_backends_are_dropped(
    database: str, stored_ids: list[str], reader: IntegrationReader
) -> None:
    await asyncio.gather(*(reader.read(stored_ids[0]) for _ in range(POOL_SIZE * 2)))
    before = {r["pid"] for r in await _read_backends(database)}
    await _sql(
        database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 "
        "AND datname = $2",
        APPLICATION_NAME,
        make_url(database).database,
    )
    # Each dead connection fails at most one call, as STORAGE_UNAVAILABLE (never anything
    # else); then reads work again on new connections.
    failures = 0
    for _ in range(POOL_SIZE * 2):
        try:
            async with storage_errors():
                assert await reader.read(stored_ids[1]) is not None
        except StorageUnavailable:
            failures += 1
    assert failures <= POOL_SIZE
    assert await reader.read(stored_ids[2]) is not None
    after = {r["pid"] for r in await _read_backends(database)}
    assert after
    assert not after & before


async def test_cancelled_read_drops_its_connection(database: str, stored_ids: list[str]) -> None:
    """A caller's deadline cancels a read mid-statement: that connection is not reused (the
    next call would meet "another operation is in progress")."""
    url = make_url(database)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    reader = await open_reader(
        plain_dsn(database, proxy.port),
        DatabaseSettings(url=database, pool_size=1, timeout_seconds=5),
    )
    try:
        assert await reader.read(stored_ids[0]) is not None
        (first,) = {r["pid"] for r in await _read_backends(database)}
        proxy.frozen = True
        pending = asyncio.ensure_future(reader.read(stored_ids[0]))
        await asyncio.sleep(0.2)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        proxy.frozen = False
        got = await asyncio.wait_for(reader.read(stored_ids[1]), 5)
        assert got is not None
        assert got.integration.id == stored_ids[1]
        pids = {r["pid"] for r in await _read_backends(database)}
        assert first not in pids
    finally:
        await reader.close()
        await proxy.stop()


async def test_unreachable_database_is_storage_unavailable(database: str) -> None:
    url = make_url(database)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    reader = await open_reader(
        plain_dsn(database, proxy.port), DatabaseSettings(url=database, timeout_seconds=1)
    )
    await proxy.stop()
    try:
        with pytest.raises(StorageUnavailable):
            async with storage_errors():
                await reader.read("00000000-0000-4000-8000-000000000000")
    finally:
        await reader.close()


# -- coalescing: concurrent reads share one statement ------------------------------------------

MISSING = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
async def patient_reader(database: str) -> AsyncIterator[IntegrationReader]:
    """A reader whose statements may wait on a lock for a while (the tests below hold one)."""
    opened = await open_reader(
        plain_dsn(database), DatabaseSettings(url=database, pool_size=POOL_SIZE, timeout_seconds=30)
    )
    yield opened
    await opened.close()


@asynccontextmanager
async def _table_locked(database: str) -> AsyncIterator[None]:
    """Every read of ``integrations`` waits until the block ends (then carries on)."""
    conn = await asyncpg.connect(plain_dsn(database))
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE integrations IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def _blocked_reads(database: str) -> list[int]:
    """The reader's backends waiting on that lock."""
    rows = await _sql(
        database,
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name = $2 "
        "AND wait_event_type = 'Lock'",
        make_url(database).database,
        APPLICATION_NAME,
    )
    return [r["pid"] for r in rows]


async def _until_blocked(database: str, count: int = 1) -> list[int]:
    for _ in range(200):
        pids = await _blocked_reads(database)
        if len(pids) >= count:
            return pids
        await asyncio.sleep(0.05)
    raise AssertionError("the reader's statement never waited on the lock")


def _owners(stored_ids: list[str]) -> dict[str, str]:
    return {iid: f"user-{n}" for n, iid in enumerate(stored_ids)}


@pytest.mark.parametrize("max_batches", [1, POOL_SIZE])
async def test_concurrent_reads_get_their_own_rows(
    database: str, stored_ids: list[str], max_batches: int
) -> None:
    """Distinct, repeated and missing ids in one burst: each read gets the row of the id it
    asked for (never another user's), or None, in fewer statements than reads."""
    reader = await IntegrationReader(
        plain_dsn(database),
        DatabaseSettings(url=database, pool_size=POOL_SIZE, timeout_seconds=5),
        max_batches=max_batches,
    ).open()
    try:
        owners = _owners(stored_ids)
        asked = [*stored_ids, MISSING, *stored_ids, stored_ids[0], MISSING] * 5
        got = await asyncio.gather(*(reader.read(iid) for iid in asked))
        for iid, row in zip(asked, got, strict=True):
            if iid == MISSING:
                assert row is None
            else:
                assert row is not None
                assert row.integration.id == iid
                assert row.integration.user_id == owners[iid]
        assert 1 <= reader.statements < len(asked)
    finally:
        await reader.close()


async def test_a_batch_is_bounded(
    database: str, stored_ids: list[str], reader: IntegrationReader
) -> None:
    """More distinct ids than one statement takes: split, every read still answered."""
    unknown = [str(uuid.UUID(int=n)) for n in range(1, 2 * MAX_BATCH + 2)]
    asked = [*unknown[: MAX_BATCH // 2], *stored_ids, *unknown[MAX_BATCH // 2 :]]
    got = await asyncio.gather(*(reader.read(iid) for iid in asked))
    owners = _owners(stored_ids)
    for iid, row in zip(asked, got, strict=True):
        if iid in owners:
            assert row is not None
            assert (row.integration.id, row.integration.user_id) == (iid, owners[iid])
        else:
            assert row is None
    assert reader.statements >= 3  # 2 * MAX_BATCH + 4 distinct ids


async def test_reads_arriving_during_a_batch_share_the_next(
    database: str, stored_ids: list[str], patient_reader: IntegrationReader
) -> None:
    """A lone read goes at once; the reads that arrive while it is in flight wait for it and
    then go together (one batch in flight at a time)."""
    reader = patient_reader
    async with _table_locked(database):
        first = asyncio.ensure_future(reader.read(stored_ids[0]))
        await _until_blocked(database)
        assert reader.statements == 1
        rest = [asyncio.ensure_future(reader.read(iid)) for iid in stored_ids * 3]
        await asyncio.sleep(0.1)
        assert reader.statements == 1
    got = await asyncio.gather(first, *rest)
    assert [r.integration.id if r else None for r in got] == [stored_ids[0], *stored_ids * 3]
    assert reader.statements == 2


async def test_a_failed_batch_fails_every_read_in_it(
    database: str, stored_ids: list[str], patient_reader: IntegrationReader
) -> None:
    """The backend of a batch in flight is terminated: every read in it is
    STORAGE_UNAVAILABLE, the connection is dropped, and the next reads work."""
    reader = patient_reader

    async def read(iid: str) -> None:
        async with storage_errors():
            await reader.read(iid)

    async with _table_locked(database):
        reads = [asyncio.ensure_future(read(iid)) for iid in [*stored_ids, MISSING, stored_ids[0]]]
        (pid,) = await _until_blocked(database)
        await _sql(database, "SELECT pg_terminate_backend($1)", pid)
        results = await asyncio.gather(*reads, return_exceptions=True)
    assert reader.statements == 1
    assert all(isinstance(r, StorageUnavailable) for r in results), results
    got = await reader.read(stored_ids[1])
    assert got is not None
    assert got.integration.id == stored_ids[1]
    assert pid not in {r["pid"] for r in await _read_backends(database)}


async def test_a_closed_reader_fails_waiting_reads_as_unavailable(
    database: str, stored_ids: list[str]
) -> None:
    reader = await open_reader(
        plain_dsn(database), DatabaseSettings(url=database, pool_size=1, timeout_seconds=1)
    )
    await reader.close()
    with pytest.raises(StorageUnavailable):
        async with storage_errors():
            await reader.read(stored_ids[0])


async def test_a_cancelled_read_leaves_the_batch_to_the_others(
    database: str, stored_ids: list[str], patient_reader: IntegrationReader
) -> None:
    """A caller's deadline ends its own read only: the statement others wait on carries on,
    on the same connection, and serves them."""
    reader = patient_reader
    async with _table_locked(database):
        cancelled = asyncio.ensure_future(reader.read(stored_ids[0]))
        others = [asyncio.ensure_future(reader.read(iid)) for iid in (stored_ids[0], stored_ids[1])]
        (pid,) = await _until_blocked(database)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await asyncio.sleep(0.1)
        assert not any(o.done() for o in others)
    first, second = await asyncio.gather(*others)
    assert first is not None
    assert first.integration.id == stored_ids[0]
    assert second is not None
    assert second.integration.id == stored_ids[1]
    assert reader.statements == 1
    assert {r["pid"] for r in await _read_backends(database)} == {pid}


async def test_a_read_cancelled_before_its_batch_runs_is_not_asked(
    database: str, stored_ids: list[str], patient_reader: IntegrationReader
) -> None:
    reader = patient_reader
    async with _table_locked(database):
        first = asyncio.ensure_future(reader.read(stored_ids[0]))
        await _until_blocked(database)
        gone = asyncio.ensure_future(reader.read(stored_ids[1]))
        kept = asyncio.ensure_future(reader.read(stored_ids[2]))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
    got = await asyncio.gather(first, kept)
    assert [r.integration.id if r else None for r in got] == [stored_ids[0], stored_ids[2]]
    # The second statement asked for the one id still wanted: GET_BY_ID, not the array.
    assert reader.statements == 2
    backends = await _read_backends(database)
    assert [b["query"] for b in backends] == [repository.GET_BY_ID]


async def test_a_batch_nobody_waits_for_is_stopped(
    database: str, stored_ids: list[str], patient_reader: IntegrationReader
) -> None:
    """Every read of a batch cancelled: the statement is abandoned at once (its connection
    dropped, mid-statement), not left to hold a connection until its timeout."""
    reader = patient_reader
    async with _table_locked(database):
        reads = [asyncio.ensure_future(reader.read(iid)) for iid in stored_ids[:2]]
        (pid,) = await _until_blocked(database)
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        # Dropped on the broker's side while the lock still holds the statement (the backend
        # itself only notices once it stops waiting on the lock).
        for _ in range(100):
            if reader.connections() == (0.0, 0.0):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the abandoned statement still holds its connection")
    for _ in range(100):
        if pid not in {r["pid"] for r in await _read_backends(database)}:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the abandoned statement's backend is still there")
    got = await reader.read(stored_ids[1])
    assert got is not None
    assert got.integration.id == stored_ids[1]


async def test_a_row_that_cannot_be_read_fails_only_its_own_reads(
    database: str, stored_ids: list[str], reader: IntegrationReader
) -> None:
    await _sql(database, "UPDATE integrations SET status = 'bogus' WHERE id = $1", stored_ids[0])
    bad, good = await asyncio.gather(
        reader.read(stored_ids[0]), reader.read(stored_ids[1]), return_exceptions=True
    )
    # A value the broker never writes: the row is not to be trusted (DATA_LOSS, not a bug).
    assert isinstance(bad, CiphertextInvalid)
    assert isinstance(good, StoredIntegration)
    assert good.integration.id == stored_ids[1]
    assert reader.statements == 1
