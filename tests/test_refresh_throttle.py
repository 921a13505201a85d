"""The refresh storm against a real fake provider, on both backends: the per-provider
concurrency limit holds, a 429 with Retry-After pauses every integration of that provider,
provider calls equal rotations, and a refresh costs few statements."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.errors import Throttled
from broker.providers.throttle import ProviderThrottle
from broker.server.app import Broker
from broker.storage import repository
from broker.storage.tables import integrations
from tests.helpers.errors import expect_error, retry_info
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.integrations import row, store_grant, token
from tests.helpers.providers import provider_settings
from tests.helpers.settings import ADMIN, make_settings

Code = grpc.StatusCode
LIMIT = 3


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    yield from serve_fake(expires_in=3600, latency=0.05)


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    return make_settings(
        database_url,
        # The override of refresh.max_concurrent_per_provider is the one that counts.
        providers=provider_settings(fake, max_concurrent_refreshes=LIMIT),
        refresh={
            "margin_seconds": 30,
            "provider_timeout_seconds": 5,
            "max_attempts": 3,
            "background": False,
            "max_concurrent_per_provider": 50,
        },
    )


async def rotations(broker: Broker) -> int:
    async with broker.engine.connect() as conn:
        query = select(func.count()).where(integrations.c.last_refreshed_at.is_not(None))
        return int((await conn.execute(query)).scalar_one())


async def grants(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, n: int
) -> list[str]:
    """``n`` expired integrations of the fake provider, one per user."""
    return [(await store_grant(stub, fake, user_id=f"user-{i}"))[0] for i in range(n)]


def token_requests(fake: FakeAuthServer) -> list[Any]:
    return [r for r in fake.requests if r.path == "/token"]


async def test_a_storm_never_exceeds_the_providers_concurrency_limit(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    ids = await grants(stub, fake, 12)
    # Two callers per integration at once, like the benchmark's storm.
    got = await asyncio.gather(*(token(stub, iid) for iid in ids for _ in range(2)))
    assert all(g.access_token for g in got)
    assert fake.max_in_flight == LIMIT, "the limit is reached, never passed"
    assert fake.refresh_calls == len(ids) == await rotations(broker)
    assert broker.refresher.throttle.in_flight("acme") == 0


async def test_retry_after_pauses_every_integration_of_the_provider(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    first, *others = await grants(stub, fake, 4)
    fake.fail_next("rate_limited", retry_after="1")
    refused = asyncio.create_task(token(stub, first))
    throttle = broker.refresher.throttle
    async with asyncio.timeout(5):
        while throttle.paused_for("acme") == 0:
            await asyncio.sleep(0.005)
    # Other integrations' refreshes wait out the provider's pause, then succeed.
    got = await asyncio.gather(refused, *(token(stub, iid) for iid in others))
    assert all(g.refreshed for g in got)
    sent = token_requests(fake)
    assert len(sent) == 5, "the 429, then one refresh per integration"
    paused_at = sent[0].received_at
    assert all(r.received_at - paused_at >= 0.9 for r in sent[1:]), [
        round(r.received_at - paused_at, 3) for r in sent[1:]
    ]
    assert await rotations(broker) == 4


async def test_a_caller_gets_unavailable_with_retry_info_while_the_provider_is_paused(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    first, other = await grants(stub, fake, 2)
    fake.fail_next("rate_limited", retry_after="30")
    await expect_error(token(stub, first), Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert broker.refresher.throttle.paused_for("acme") > 25
    started = time.monotonic()
    call = stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=other), metadata=ADMIN, timeout=2
    )
    error = await expect_error(call, Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert time.monotonic() - started < 1.9, "refused at once: its deadline is before the pause end"
    info = retry_info(error)
    assert info is not None
    assert info.retry_delay.seconds >= 25
    assert len(token_requests(fake)) == 1, "nothing sent during the pause"
    # Not a failure of that integration: its lease is free and its record clean.
    stored = await row(broker, other)
    assert stored.refresh_failures == 0
    assert stored.last_refresh_error is None


async def test_the_rate_limit_spaces_a_providers_requests() -> None:
    throttle = ProviderThrottle(10, per_second=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(10):
        async with throttle.turn("acme", started + 10):
            pass
    # A burst of one second's worth (5), then 5 a second.
    assert loop.time() - started >= 0.8


async def test_a_turn_that_would_come_too_late_is_refused_at_once() -> None:
    throttle = ProviderThrottle(1)
    loop = asyncio.get_running_loop()
    async with throttle.turn("acme", loop.time() + 10):
        with pytest.raises(Throttled) as refused:
            async with throttle.turn("acme", loop.time() + 0.05):
                raise AssertionError("the only slot is taken")
        assert "1 refresh(es) in flight" in refused.value.message
        throttle.pause("acme", 30)
    with pytest.raises(Throttled) as paused:
        async with throttle.turn("acme", loop.time() + 5):
            raise AssertionError("paused")
    assert paused.value.retry_after > 25
    assert throttle.in_flight("acme") == 0


async def test_no_database_connection_is_held_while_the_provider_answers(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    [iid] = await grants(stub, fake, 1)
    fake.fail_next("slow", delay=0.5)
    pool: Any = broker.engine.pool
    call = asyncio.create_task(token(stub, iid))
    async with asyncio.timeout(5):
        while fake.in_flight == 0:
            await asyncio.sleep(0.005)
    # The lease's transaction has committed and the write's has not begun. Background work
    # (the health watcher's ping, start-up scans) may hold a connection for an instant, so the
    # pool is sampled while the provider answers: a flight holding one would never let it be 0.
    held: list[int] = []
    while fake.in_flight and len(held) < 200:
        held.append(pool.checkedout())
        await asyncio.sleep(0.002)
    assert min(held) == 0, held
    assert (await call).refreshed


async def test_a_refresh_still_queued_at_shutdown_is_not_sent(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    """Shutdown waits for the requests already sent (their rotated tokens are stored); one
    still waiting for the provider's turn must not be sent after that, or its answer could be
    cut off with the process."""
    ids = await grants(stub, fake, LIMIT + 1)
    fake.latency = 0.5
    calls = [asyncio.create_task(token(stub, iid)) for iid in ids]
    async with asyncio.timeout(5):
        while fake.in_flight < LIMIT:
            await asyncio.sleep(0.005)
    broker.refresher.stop_claiming()  # what SIGTERM does first
    results = await asyncio.gather(*calls, return_exceptions=True)
    sent = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(sent) == LIMIT
    assert all(r.refreshed for r in sent)
    assert len(refused) == 1
    assert refused[0].code() == Code.UNAVAILABLE
    assert fake.refresh_calls == LIMIT == await rotations(broker)
    # Not sent, so nothing counted against that integration; its lease is free.
    (unsent,) = [iid for iid, r in zip(ids, results, strict=True) if r in refused]
    stored = await row(broker, unsent)
    assert stored.refresh_failures == 0
    assert stored.last_refresh_error is None
    async with broker.engine.connect() as conn:
        owner = await conn.scalar(
            select(integrations.c.refresh_lease_owner).where(integrations.c.id == unsent)
        )
    assert owner is None


async def test_a_paused_provider_does_not_make_the_background_pass_spin(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Background claims refused by a long pause are left alone until it may end, instead of
    being claimed, read and released again batch after batch."""
    first, *others = await grants(stub, fake, 3)
    fake.fail_next("rate_limited", retry_after="60")
    await expect_error(token(stub, first), Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    claims = 0
    claim_due = repository.claim_due

    async def counting(*args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        nonlocal claims
        found = await claim_due(*args, **kwargs)
        claims += bool(found)
        return found

    monkeypatch.setattr(repository, "claim_due", counting)
    await broker.refresher.background_pass(batch=10, max_batches=100)
    assert claims <= 1, f"{claims} batches claimed during one pass"
    assert len(token_requests(fake)) == 1, "nothing sent during the pause"
    for iid in others:
        stored = await row(broker, iid)
        assert stored.refresh_failures == 0
        assert stored.next_refresh_at is not None
