"""The PostgreSQL read by id (``broker.storage.reader``) that GetAccessToken uses on a cache
miss: the same row as the pooled path, one statement per call with nothing after it, at most
``pool_size`` connections, and a connection that failed or was cancelled mid-statement is
dropped rather than handed to the next call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings
from broker.errors import StorageUnavailable
from broker.server.app import Broker, start
from broker.storage import repository
from broker.storage.engine import create_engine, storage_errors
from broker.storage.reader import APPLICATION_NAME, IntegrationReader, open_reader
from tests.conftest import ADMIN, PostgresFactory, make_settings, store_request
from tests.test_database_down import Proxy

pytestmark = pytest.mark.postgres

POOL_SIZE = 3


def _dsn(url: str, port: int | None = None) -> str:
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
        async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
            stub = pb_grpc.CredentialBrokerStub(channel)
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
        _dsn(database), DatabaseSettings(url=database, pool_size=POOL_SIZE, timeout_seconds=2)
    )
    yield opened
    await opened.close()


async def _sql(database: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(_dsn(database))
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
        _dsn(database, proxy.port),
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
        _dsn(database, proxy.port), DatabaseSettings(url=database, timeout_seconds=1)
    )
    await proxy.stop()
    try:
        with pytest.raises(StorageUnavailable):
            async with storage_errors():
                await reader.read("00000000-0000-4000-8000-000000000000")
    finally:
        await reader.close()
