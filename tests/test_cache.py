"""The hot-path cache: correct across replicas, bypassed when it cannot hear about writes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from sqlalchemy import update

from broker import metrics
from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.domain.cache import IntegrationCache
from broker.model import Integration, Selector, Status, StoredIntegration
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from broker.storage.tables import integrations
from tests.helpers.databases import PostgresFactory
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.processes import BrokerProcess, write_toml
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, ENVIRONMENT, KEYS, make_settings
from tests.helpers.stubs import broker_stub

Code = grpc.StatusCode


def stored(iid: str, user: str = "u", provider: str = "p") -> StoredIntegration:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    integration = Integration(
        iid,
        user,
        provider,
        "",
        Status.CONNECTED,
        "Bearer",
        (),
        {},
        now,
        now,
        None,
        None,
        None,
        None,
        False,
        1,
    )
    return StoredIntegration(integration, b"ct", None, "k")


def test_a_read_that_raced_a_write_is_not_cached() -> None:
    cache = IntegrationCache(10)
    seen = cache.seq  # the read starts ...
    cache.invalidate("i1")  # ... a write lands ...
    cache.put(Selector(integration_id="i1"), stored("i1"), seen)  # ... the stale row comes back
    assert cache.get(Selector(integration_id="i1"), "") is None
    cache.put(Selector(integration_id="i1"), stored("i1"), cache.seq)
    assert cache.get(Selector(integration_id="i1"), "") is not None


def test_owner_lookups_are_invalidated_by_a_new_account() -> None:
    cache = IntegrationCache(10)
    by_owner = Selector(user_id="u", provider="p")
    cache.put(by_owner, stored("i1"), cache.seq)
    assert cache.get(by_owner, "p") is not None
    cache.invalidate("i2", "u", "p")  # another account of u at p was inserted
    assert cache.get(by_owner, "p") is None


def test_bounded_and_bypassed_while_unavailable() -> None:
    cache = IntegrationCache(3)
    for n in range(5):
        cache.put(Selector(integration_id=f"i{n}"), stored(f"i{n}"), cache.seq)
    assert len(cache) == 3
    assert cache.get(Selector(integration_id="i0"), "") is None
    cache.available = False
    assert cache.get(Selector(integration_id="i4"), "") is None
    cache.put(Selector(integration_id="i9"), stored("i9"), cache.seq)
    cache.available = True
    assert cache.get(Selector(integration_id="i9"), "") is None


async def test_hot_path_serves_from_cache_and_sees_own_writes(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker
) -> None:
    response = await stub.StoreIntegration(store_request(access_token="at-1"), metadata=ADMIN)
    iid = response.integration.id
    request = pb.GetAccessTokenRequest(integration_id=iid)
    for _ in range(5):
        assert (await stub.GetAccessToken(request, metadata=ADMIN)).access_token == "at-1"
    assert broker.runtime.cache.hits >= 4
    await stub.StoreIntegration(store_request(access_token="at-2"), metadata=ADMIN)
    assert (await stub.GetAccessToken(request, metadata=ADMIN)).access_token == "at-2"
    await stub.Disconnect(
        pb.DisconnectRequest(integration_id=iid, skip_provider_revocation=True), metadata=ADMIN
    )
    await expect_error(
        stub.GetAccessToken(request, metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "INTEGRATION_DISCONNECTED",
    )


@pytest.fixture
async def two_processes(
    postgres: PostgresFactory, tmp_path: Path
) -> AsyncIterator[tuple[str, list[BrokerProcess]]]:
    url = await postgres.new()
    config = write_toml(
        tmp_path / "broker.toml",
        {
            "server": {"listen": "127.0.0.1:0", "environment": ENVIRONMENT},
            "database": {"url": url},
            "refresh": {"background": False},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
        },
    )
    processes = [BrokerProcess(config, {"BROKER_KEYS": KEYS}) for _ in range(2)]
    await asyncio.gather(*(p.start() for p in processes))
    yield url, processes
    await asyncio.gather(*(p.stop() for p in processes))


@pytest.mark.postgres
async def test_disconnect_on_one_replica_is_honoured_by_the_other_within_a_second(
    two_processes: tuple[str, list[BrokerProcess]],
) -> None:
    _, (a, b) = two_processes
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ca,
        grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as cb,
    ):
        stub_a, stub_b = pb_grpc.CredentialBrokerStub(ca), pb_grpc.CredentialBrokerStub(cb)
        iid = (
            await stub_a.StoreIntegration(store_request(access_token="at-1"), metadata=ADMIN)
        ).integration.id
        request = pb.GetAccessTokenRequest(integration_id=iid)
        # Warm B's cache (its listener may still be connecting: call until it is cached).
        for _ in range(20):
            assert (await stub_b.GetAccessToken(request, metadata=ADMIN)).access_token == "at-1"
            await asyncio.sleep(0.05)
        # A new token stored through A reaches B.
        await stub_a.StoreIntegration(store_request(access_token="at-2"), metadata=ADMIN)
        deadline = time.monotonic() + 1.0
        while (await stub_b.GetAccessToken(request, metadata=ADMIN)).access_token != "at-2":
            assert time.monotonic() < deadline, "B kept serving the old token"
            await asyncio.sleep(0.01)
        # A Disconnect through A is honoured by B within one second.
        await stub_a.Disconnect(
            pb.DisconnectRequest(integration_id=iid, skip_provider_revocation=True), metadata=ADMIN
        )
        disconnected_at = time.monotonic()
        while True:
            try:
                await stub_b.GetAccessToken(request, metadata=ADMIN)
            except grpc.aio.AioRpcError as error:
                # A polling loop (call until B refuses), which pytest.raises cannot express.
                assert error.code() == Code.FAILED_PRECONDITION  # noqa: PT017
                break
            assert time.monotonic() - disconnected_at < 1.0, "B served a disconnected token"
            await asyncio.sleep(0.01)


async def _terminate_listeners(url: str) -> int:
    from tests.helpers.databases import plain_dsn

    conn = await asyncpg.connect(plain_dsn(url))
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%' "
            "AND pid <> pg_backend_pid()"
        )
        return len(rows)
    finally:
        await conn.close()


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.postgres
async def test_lost_listen_connection_flushes_and_bypasses_the_cache(
    postgres: PostgresFactory,
) -> None:
    url = await postgres.new()
    broker = await start(make_settings(url))
    try:
        cache = broker.runtime.cache
        assert broker.listener is not None
        await _until(lambda: cache.available)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
            stub = pb_grpc.CredentialBrokerStub(channel)
            iid = (await stub.StoreIntegration(store_request(), metadata=ADMIN)).integration.id
            request = pb.GetAccessTokenRequest(integration_id=iid)
            await stub.GetAccessToken(request, metadata=ADMIN)
            await stub.GetAccessToken(request, metadata=ADMIN)
            assert len(cache) == 1
            assert await _terminate_listeners(url) == 1
            await _until(lambda: not cache.available)
            assert len(cache) == 0, "flushed when the channel was lost"
            # While nobody listens, a write from elsewhere must still be seen: the cache is
            # bypassed, every call reads the database.
            async with broker.engine.begin() as conn:
                await conn.execute(
                    update(integrations)
                    .where(integrations.c.id == iid)
                    .values(status="NEEDS_REAUTHORIZATION")
                )
            await expect_error(
                stub.GetAccessToken(request, metadata=ADMIN),
                Code.FAILED_PRECONDITION,
                "REAUTHORIZATION_REQUIRED",
            )
            assert len(cache) == 0
            await _until(lambda: cache.available)
    finally:
        await broker.stop(0)


async def test_audit_group_commit_batches_and_stays_fail_closed(
    backend: str, database_url: str
) -> None:
    broker = await start(make_settings(database_url))
    try:
        async with broker_stub(broker.port) as stub:
            iid = (await stub.StoreIntegration(store_request(), metadata=ADMIN)).integration.id
            request = pb.GetAccessTokenRequest(integration_id=iid)

            def batches() -> tuple[float, float]:
                count = sum_ = 0.0
                for metric in metrics.AUDIT_BATCH.collect():
                    for sample in metric.samples:
                        if sample.name.endswith("_count"):
                            count = sample.value
                        elif sample.name.endswith("_sum"):
                            sum_ = sample.value
                return count, sum_

            before = batches()
            results = await asyncio.gather(
                *(stub.GetAccessToken(request, metadata=ADMIN) for _ in range(100))
            )
            after = batches()
            assert len(results) == 100
            assert after[1] - before[1] == 100, "every call's event was written"
            assert after[0] - before[0] < 100, "events of concurrent calls share transactions"
            # Break the audit table: every concurrent call fails and no token leaves.
            async with broker.engine.begin() as conn:
                await conn.exec_driver_sql("ALTER TABLE audit_events RENAME TO audit_events_off")
            outcomes = await asyncio.gather(
                *(stub.GetAccessToken(request, metadata=ADMIN) for _ in range(20)),
                return_exceptions=True,
            )
            assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes), outcomes
            assert {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)} == {
                Code.UNAVAILABLE
            }
            async with broker.engine.begin() as conn:
                await conn.exec_driver_sql("ALTER TABLE audit_events_off RENAME TO audit_events")
            await stub.GetAccessToken(request, metadata=ADMIN)
    finally:
        await broker.stop(0)


async def test_metrics_endpoint(database_url: str, unused_tcp_port: int) -> None:
    settings = make_settings(database_url, metrics={"listen": f"127.0.0.1:{unused_tcp_port}"})
    broker = await start(settings)
    try:
        async with broker_stub(broker.port) as stub:
            stored_ = await stub.StoreIntegration(
                store_request(user_id="secret-user-7", access_token="at-metric-canary"),
                metadata=ADMIN,
            )
            request = pb.GetAccessTokenRequest(integration_id=stored_.integration.id)
            await stub.GetAccessToken(request, metadata=ADMIN)
            await stub.GetAccessToken(request, metadata=ADMIN)
        async with httpx.AsyncClient() as http:
            body = (await http.get(f"http://127.0.0.1:{unused_tcp_port}/metrics")).text
        assert 'broker_rpc_total{code="OK",method="GetAccessToken"}' in body
        assert "broker_rpc_latency_seconds_bucket" in body
        assert "broker_cache_hit_ratio" in body
        assert "broker_audit_batch_size_count" in body
        assert "broker_db_pool" in body or "sqlite" in database_url
        # The cache-miss read above went through the read pool (PostgreSQL).
        assert "broker_db_read_pool_size 1.0" in body or "sqlite" in database_url
        assert "secret-user-7" not in body
        assert "at-metric-canary" not in body
        assert stored_.integration.id not in body
    finally:
        await broker.stop(0)


@pytest.mark.postgres
async def test_serve_with_workers_shares_one_port(
    postgres: PostgresFactory, tmp_path: Path, unused_tcp_port: int
) -> None:
    url = await postgres.new()
    config = write_toml(
        tmp_path / "broker.toml",
        {
            "server": {"listen": f"127.0.0.1:{unused_tcp_port}", "environment": ENVIRONMENT},
            "database": {"url": url},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
        },
    )
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "--config",
        str(config),
        "serve",
        "--workers",
        "2",
        env={**__import__("os").environ, "BROKER_KEYS": KEYS},
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    serving = 0
    deadline = time.monotonic() + 20
    while serving < 2:
        line = await asyncio.wait_for(proc.stderr.readline(), max(0.1, deadline - time.monotonic()))
        assert line, "workers exited early"
        serving += b"broker serving on" in line
    pids: set[str] = set()
    try:
        for _ in range(8):
            # New channels are new connections: the kernel spreads them over the workers.
            async with broker_stub(unused_tcp_port) as stub:
                response = await stub.StoreIntegration(store_request(), metadata=ADMIN)
                assert response.integration.user_id == "user-1"
        pids.add("ok")
    finally:
        proc.send_signal(__import__("signal").SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert pids


def test_workers_refuse_sqlite(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--workers", "2"],
        cwd=tmp_path,
        env={**__import__("os").environ, "BROKER_KEYS": KEYS},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--workers" in result.stderr
    assert "PostgreSQL" in result.stderr
