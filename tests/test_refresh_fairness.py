"""A refresher no integration can starve.

A caller allowed to store integrations stores client_credentials integrations whose token
endpoint (a real, hostile HTTP server on loopback) answers every request 400 invalid_request.
The background pass must not spin on them, their endpoint must see a handful of requests per
integration, and a healthy integration must still be refreshed in the first pass. Tokens that
live shorter than the refresh margin are refreshed at half their lifetime, not on every call
or pass. The broker's clock is the test's, so five minutes take no time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client import REGISTRY

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker.storage import repository
from tests.helpers.clock import FakeClock
from tests.helpers.databases import new_database
from tests.helpers.errors import error_info, expect_error, retry_info
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.integrations import row, store_grant
from tests.helpers.processes import replica_set
from tests.helpers.providers import provider_settings
from tests.helpers.settings import ADMIN, KEYS, make_settings
from tests.helpers.stubs import broker_stub
from tests.helpers.waiting import eventually

Code = grpc.StatusCode
FAILING = 13
PASS = timedelta(seconds=30)  # refresh.background_interval_seconds (the default)


@pytest.fixture
def good() -> Iterator[FakeAuthServer]:
    yield from serve_fake(expires_in=3600)


@pytest.fixture
def hostile() -> Iterator[FakeAuthServer]:
    """A token endpoint that refuses every request as malformed (and records each)."""

    def refuse(server: FakeAuthServer) -> None:
        server.routes["/token"] = lambda query, body: (
            400,
            {"error": "invalid_request", "error_description": "no"},
        )

    yield from serve_fake(refuse)


def providers(good: FakeAuthServer, hostile: FakeAuthServer) -> dict[str, Any]:
    return {
        **provider_settings(good),
        "hostile": {"token_url": hostile.token_url, "kinds": ["client_credentials"]},
    }


def hits(server: FakeAuthServer) -> int:
    return sum(1 for r in server.requests if r.path == "/token")


def skipped(provider: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "broker_refresh_skipped_total", {"provider": provider, "reason": reason}
    )
    return value or 0.0


@pytest.fixture
def settings(database_url: str, good: FakeAuthServer, hostile: FakeAuthServer) -> Settings:
    # The default margin (300 s), interval (30 s) and back-off: the attack as it would meet
    # a broker configured as shipped. The pass is driven by the test.
    return make_settings(
        database_url,
        providers=providers(good, hostile),
        refresh={"background": False, "provider_timeout_seconds": 2},
    )


@pytest.fixture
async def broker(settings: Settings, clock: FakeClock) -> AsyncIterator[Broker]:
    running = await start(settings, clock=clock)
    yield running
    await running.stop(0)


async def store_failing(stub: pb_grpc.CredentialBrokerAsyncStub, count: int) -> list[str]:
    ids = []
    for n in range(count):
        stored = await stub.StoreIntegration(
            pb.StoreIntegrationRequest(
                user_id=f"attacker-{n}",
                provider="hostile",
                credential=pb.Credential(
                    client_credentials=pb.ClientCredentialsCredential(
                        client_id=f"client-{n}", client_secret="secret"
                    )
                ),
            ),
            metadata=ADMIN,
        )
        ids.append(stored.integration.id)
    return ids


async def test_failing_integrations_do_not_starve_a_healthy_one(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    good: FakeAuthServer,
    hostile: FakeAuthServer,
    clock: FakeClock,
) -> None:
    failing = await store_failing(stub, FAILING)
    healthy, access, _ = await store_grant(stub, good, expires_in=60, user_id="victim")
    # The first pass: every failing row is tried once, and the healthy one is refreshed.
    await broker.refresher.background_pass()
    assert hits(hostile) <= FAILING
    assert good.refresh_calls == 1, "the healthy integration was refreshed in the first pass"
    assert (await row(broker, healthy)).integration.version == 2
    # Five minutes of passes: a handful of requests per failing integration, not ~1,000 a pass.
    for _ in range(10):
        clock.advance(PASS)
        await broker.refresher.background_pass()
    assert hits(hostile) <= FAILING * 3, hits(hostile)
    for iid in failing:
        stored = await row(broker, iid)
        assert stored.last_refresh_error == "client_rejected"
        assert stored.refresh_failures >= 2
        assert stored.next_refresh_at is not None
        assert stored.next_refresh_at > clock.now
    # A caller of a failing integration meets the failure it backs off from, and the
    # endpoint is not asked again.
    before = hits(hostile)
    error = await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=failing[0]), metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "PROVIDER_MISCONFIGURED",
    )
    info = error_info(error)
    assert info is not None
    assert int(info.metadata["retry_after_seconds"]) > 0
    assert hits(hostile) == before
    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=healthy), metadata=ADMIN
    )
    assert got.access_token != access
    assert not got.refreshed


async def test_a_provider_budget_per_pass(
    database_url: str,
    good: FakeAuthServer,
    hostile: FakeAuthServer,
    clock: FakeClock,
) -> None:
    settings = make_settings(
        database_url,
        providers=providers(good, hostile),
        refresh={"background": False, "background_attempts_per_provider": 4},
    )
    broker = await start(settings, clock=clock)
    try:
        async with broker_stub(broker.port) as stub:
            failing = await store_failing(stub, FAILING)
            healthy, _, _ = await store_grant(stub, good, expires_in=60, user_id="victim")
            budget_skips = skipped("hostile", "budget")
            await broker.refresher.background_pass()
            assert hits(hostile) == 4, "the budget: 4 attempts at that provider per pass"
            assert skipped("hostile", "budget") > budget_skips
            assert (await row(broker, healthy)).integration.version == 2
            # The rows left over are tried in the next passes; those that failed back off.
            clock.advance(PASS)
            await broker.refresher.background_pass()
            assert hits(hostile) == 8
            clock.advance(PASS)
            await broker.refresher.background_pass()
            assert hits(hostile) == 12
            # The last one never tried goes first; the rest of the budget goes to the first
            # four, whose back-off (60-75 s) is over.
            clock.advance(PASS)
            await broker.refresher.background_pass()
            assert hits(hostile) == 16
            for iid in failing:
                assert (await row(broker, iid)).refresh_failures >= 1
    finally:
        await broker.stop(0)


async def test_each_row_is_claimed_at_most_once_per_pass(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    good: FakeAuthServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Inside the claim's horizon (margin + interval) but not due (left > margin): claimed,
    # looked at, given back - once, not in every batch of the pass.
    for n in range(3):
        await store_grant(stub, good, expires_in=310, user_id=f"u{n}")
    claims: dict[str, int] = {}
    claim_due = repository.claim_due

    async def counting(*args: Any, **kwargs: Any) -> Any:
        found = await claim_due(*args, **kwargs)
        for item in found:
            iid = item[0] if isinstance(item, tuple) else item
            claims[iid] = claims.get(iid, 0) + 1
        return found

    monkeypatch.setattr(repository, "claim_due", counting)
    assert await broker.refresher.background_pass() == 0
    assert len(claims) == 3
    assert set(claims.values()) == {1}, claims
    assert good.refresh_calls == 0


@pytest.fixture
def short() -> Iterator[FakeAuthServer]:
    """A provider whose tokens live 120 s, under the default 300 s margin."""
    yield from serve_fake(expires_in=120)


@pytest.fixture
async def short_lived(
    database_url: str, short: FakeAuthServer, clock: FakeClock
) -> AsyncIterator[Broker]:
    settings = make_settings(
        database_url, providers=provider_settings(short), refresh={"background": False}
    )
    running = await start(settings, clock=clock)
    yield running
    await running.stop(0)


async def test_short_tokens_are_refreshed_at_half_their_lifetime_on_calls(
    short: FakeAuthServer, short_lived: Broker, clock: FakeClock
) -> None:
    """120 s tokens under the default 300 s margin, called every 2 s for 2 minutes: about
    one refresh per minute each, not one per call."""
    async with broker_stub(short_lived.port) as stub:
        ids = [
            (await store_grant(stub, short, expires_in=120, user_id=f"u{n}"))[0] for n in range(5)
        ]
        calls = 0
        for _ in range(60):
            clock.advance(timedelta(seconds=2))
            for iid in ids:
                got = await stub.GetAccessToken(
                    pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN
                )
                calls += 1
                left = got.expires_at.ToDatetime(tzinfo=UTC) - clock.now
                # A due token is served while its refresh runs ahead, never below the floor.
                assert left >= timedelta(seconds=30), "never served close to expiry"
        # The first call refreshes (the stored token's lifetime is not known yet:
        # the margin decides), then once every 60 s: 3 each, 4 at most.
        assert short.refresh_calls <= 4 * len(ids), short.refresh_calls
        assert short.refresh_calls >= 2 * len(ids)
        assert calls == 300
        # A caller may still ask for more than half the lifetime ...
        got = await stub.GetAccessToken(
            pb.GetAccessTokenRequest(
                integration_id=ids[0], min_valid_for=duration_pb2.Duration(seconds=100)
            ),
            metadata=ADMIN,
        )
        assert got.expires_at.ToDatetime(tzinfo=UTC) - clock.now >= timedelta(seconds=100)
        # ... and more than the lifetime is unattainable, as before.
        await expect_error(
            stub.GetAccessToken(
                pb.GetAccessTokenRequest(
                    integration_id=ids[0],
                    min_valid_for=duration_pb2.Duration(seconds=300),
                ),
                metadata=ADMIN,
            ),
            Code.FAILED_PRECONDITION,
            "MIN_VALIDITY_UNATTAINABLE",
        )


async def test_short_tokens_are_refreshed_at_half_their_lifetime_in_the_background(
    short: FakeAuthServer, short_lived: Broker, clock: FakeClock
) -> None:
    async with broker_stub(short_lived.port) as stub:
        for n in range(5):
            await store_grant(stub, short, expires_in=120, user_id=f"u{n}")
    per_pass = []
    for _ in range(10):
        before = short.refresh_calls
        await short_lived.refresher.background_pass()
        per_pass.append(short.refresh_calls - before)
        clock.advance(PASS)
    # At most once per row per pass, and over 5 minutes about every other pass.
    assert max(per_pass) <= 5, per_pass
    assert sum(per_pass) <= 5 * 6, per_pass


async def test_callers_respect_the_back_off(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    broker: Broker,
    good: FakeAuthServer,
    clock: FakeClock,
) -> None:
    iid, access, _ = await store_grant(stub, good, expires_in=100)  # inside the margin
    good.fail_always("server_error")
    # The stored token still does for this caller: it gets it at once, and the refresh (run
    # ahead, in the background) fails.
    got = await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    assert got.access_token == access

    async def failed() -> bool:
        return (await row(broker, iid)).refresh_failures == 1 and not broker.refresher.in_flight

    await eventually(failed, "the refresh ahead to fail")
    sent = good.refresh_calls
    assert sent >= 1
    stored = await row(broker, iid)
    assert stored.next_refresh_at is not None
    wait = (stored.next_refresh_at - clock.now).total_seconds()
    assert 60 <= wait <= 75, wait
    # Many calls meanwhile: the token while it does, UNAVAILABLE + RetryInfo once it does
    # not; the provider is not asked again.
    for _ in range(20):
        got = await stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid, force_refresh=True), metadata=ADMIN
        )
        assert got.access_token == access
    error = await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(
                integration_id=iid, min_valid_for=duration_pb2.Duration(seconds=200)
            ),
            metadata=ADMIN,
        ),
        Code.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    )
    info = retry_info(error)
    assert info is not None
    assert info.retry_delay.seconds >= 59
    assert good.refresh_calls == sent
    # When the back-off is over the provider is asked again (and has recovered).
    good.reset_failures()
    clock.advance(timedelta(seconds=wait + 1))
    # (Asking for more than the stored token has left: this caller waits for the refresh.)
    fresh = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(
            integration_id=iid, min_valid_for=duration_pb2.Duration(seconds=60)
        ),
        metadata=ADMIN,
    )
    assert fresh.refreshed
    stored = await row(broker, iid)
    assert stored.refresh_failures == 0
    assert stored.next_refresh_at is None


async def test_storing_again_ends_the_back_off(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, hostile: FakeAuthServer
) -> None:
    [iid] = await store_failing(stub, 1)
    request = pb.GetAccessTokenRequest(integration_id=iid)
    await expect_error(
        stub.GetAccessToken(request, metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "PROVIDER_MISCONFIGURED",
    )
    assert hits(hostile) == 1
    await expect_error(
        stub.GetAccessToken(request, metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "PROVIDER_MISCONFIGURED",
    )
    assert hits(hostile) == 1, "backing off"
    # The owner fixes the credential: the next call tries at once.
    await store_failing(stub, 1)
    await expect_error(
        stub.GetAccessToken(request, metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "PROVIDER_MISCONFIGURED",
    )
    assert hits(hostile) == 2


async def test_a_fixed_configuration_is_tried_at_once_after_a_restart(
    database_url: str, good: FakeAuthServer, clock: FakeClock
) -> None:
    """The back-off after the broker's own client was refused (or missing) outlives neither
    the fix of its configuration nor the restart that applies it."""

    async def get(broker: Broker, iid: str) -> Any:
        async with broker_stub(broker.port) as stub:
            return await stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN
            )

    unconfigured = make_settings(
        database_url, providers=provider_settings(good), refresh={"background": False}
    )
    broker = await start(unconfigured, clock=clock)
    try:
        async with broker_stub(broker.port) as stub:
            refused, _, _ = await store_grant(stub, good)
            missing = (
                await stub.StoreIntegration(
                    pb.StoreIntegrationRequest(
                        user_id="u",
                        provider="twitter",
                        access_token="at",
                        refresh_token="rt",
                        expires_in_seconds=0,
                    ),
                    metadata=ADMIN,
                )
            ).integration.id
        good.fail_next("invalid_client", 2)
        for iid in (refused, missing):
            for _ in range(2):
                await expect_error(
                    get(broker, iid), Code.FAILED_PRECONDITION, "PROVIDER_MISCONFIGURED"
                )
        assert good.refresh_calls == 1, "backing off in the process that saw the refusal"
    finally:
        await broker.stop(0)
    good.reset_failures()
    fixed = make_settings(
        database_url,
        providers={
            **provider_settings(good),
            "twitter": {
                "token_url": good.token_url,
                "client_id": good.client_id,
                "client_secret": good.client_secret,
            },
        },
        refresh={"background": False},
    )
    broker = await start(fixed, clock=clock)
    try:
        assert (await get(broker, refused)).refreshed
        assert good.refresh_calls == 2
        # Twitter's refresh reaches the fake (which does not know the token): it is tried.
        await expect_error(get(broker, missing), Code.FAILED_PRECONDITION)
        assert good.refresh_calls == 3
    finally:
        await broker.stop(0)


async def test_a_broker_process_is_not_starved(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    good: FakeAuthServer,
    hostile: FakeAuthServer,
) -> None:
    """The real thing: a broker process whose background pass runs every 0.3 s."""
    url = await new_database(backend, tmp_path, request)
    sections = {
        "refresh": {"background_interval_seconds": 0.3, "provider_timeout_seconds": 2},
        "providers": providers(good, hostile),
    }
    async with replica_set(tmp_path, url, sections, {"BROKER_KEYS": KEYS}, count=1) as [process]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{process.port}")
        try:
            stub = pb_grpc.CredentialBrokerStub(channel)
            await store_failing(stub, FAILING)
            healthy, _, _ = await store_grant(stub, good, expires_in=60, user_id="victim")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while good.refresh_calls < 1:
                assert loop.time() < deadline, "the healthy integration was never refreshed"
                await asyncio.sleep(0.05)
            # A few seconds more: ten or more passes, each failing row still tried once.
            await asyncio.sleep(3)
            assert hits(hostile) <= FAILING, hits(hostile)
            got = await stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=healthy), metadata=ADMIN
            )
            assert not got.refreshed
            errors = [line for line in process.log if "ERROR" in line]
            assert len(errors) <= FAILING, errors[:5]
        finally:
            await channel.close(None)
