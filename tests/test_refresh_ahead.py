"""Refresh ahead: a caller whose token is due (inside the margin) but still satisfies it is
answered at once with that token while the refresh runs in the background, through the same
single flight and lease; only a caller the token cannot satisfy waits. Real broker, real fake
authorization server answering slowly, both backends. Nothing here measures time: who waited
is read from the answers (old token, ``refreshed``) and the engine's count of callers that
waited on a flight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker_devtools.fakeapi import FakeApi
from tests.helpers.clock import FakeClock
from tests.helpers.errors import expect_error
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.integrations import row, store_grant, token
from tests.helpers.providers import provider_settings
from tests.helpers.settings import ADMIN, make_settings
from tests.helpers.stubs import broker_stub
from tests.helpers.waiting import eventually

Code = grpc.StatusCode
# Inside the default 300 s margin, far above the 30 s floor.
DUE = 200


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    # Every provider answer takes a while: a caller that waited for one would get its token.
    yield from serve_fake(expires_in=3600, latency=1.0)


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer, api: FakeApi) -> Settings:
    return make_settings(
        database_url,
        providers=provider_settings(fake, api_base_url=api.url + "/v1"),
        refresh={"background": False, "provider_timeout_seconds": 5, "max_attempts": 1},
    )


def waited(broker: Broker) -> int:
    return broker.refresher.callers_waited


async def refreshed_once(broker: Broker, iid: str, version: int = 1) -> None:
    async def stored() -> bool:
        current = await row(broker, iid)
        return current.integration.version == version + 1 and not broker.refresher.in_flight

    await eventually(stored, "the refresh ahead to be stored")


async def test_a_due_token_that_still_satisfies_is_served_at_once_and_refreshed_behind(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, old, _ = await store_grant(stub, fake, expires_in=DUE)
    got = await token(stub, iid)
    # The stored token, and the refresh still at the provider when the answer came.
    assert got.access_token == old
    assert not got.refreshed
    assert (await row(broker, iid)).integration.version == 1
    assert waited(broker) == 0
    await refreshed_once(broker, iid)
    assert fake.refresh_calls == 1
    # The next caller gets the new token, from the row the refresh stored.
    again = await token(stub, iid)
    assert again.access_token != old
    assert fake.is_access_token_active(again.access_token)
    assert fake.refresh_calls == 1
    assert waited(broker) == 0


async def test_a_caller_the_token_cannot_satisfy_waits_and_joins_the_same_refresh(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, old, _ = await store_grant(stub, fake, expires_in=DUE)
    first = await token(stub, iid)
    assert first.access_token == old
    assert broker.refresher.in_flight == 1
    # Wants more than the stored token has left: waits, on the refresh already running.
    longer = await token(stub, iid, min_valid_for=duration_pb2.Duration(seconds=DUE + 100))
    assert longer.refreshed
    assert longer.access_token != old
    assert fake.refresh_calls == 1
    assert waited(broker) == 1
    # So does a caller that forces a refresh, and one whose token is below the floor.
    forced = await token(stub, iid, force_refresh=True)
    assert forced.refreshed
    assert fake.refresh_calls == 2
    iid2, old2, _ = await store_grant(stub, fake, expires_in=20, user_id="u2")
    low = await token(stub, iid2)
    assert low.refreshed
    assert low.access_token != old2
    assert waited(broker) == 3


async def test_concurrent_callers_are_answered_and_the_provider_called_once(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, old, _ = await store_grant(stub, fake, expires_in=DUE)
    answers = await asyncio.gather(*(token(stub, iid) for _ in range(50)))
    assert {a.access_token for a in answers} == {old}
    assert not any(a.refreshed for a in answers)
    assert waited(broker) == 0
    await refreshed_once(broker, iid)
    assert fake.refresh_calls == 1


async def test_a_failed_refresh_ahead_is_recorded_and_the_old_token_served_while_it_does(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, old, _ = await store_grant(stub, fake, expires_in=DUE)
    fake.fail_always("unavailable")
    got = await token(stub, iid)
    assert got.access_token == old
    assert waited(broker) == 0  # the failure did not happen in this caller's way
    assert (await row(broker, iid)).refresh_failures == 0  # it is still at the provider

    async def failed() -> bool:
        current = await row(broker, iid)
        return current.refresh_failures == 1 and not broker.refresher.in_flight

    await eventually(failed, "the failure of the refresh ahead to be recorded")
    stored = await row(broker, iid)
    assert stored.last_refresh_error == "provider_unavailable"
    assert stored.next_refresh_at is not None
    assert stored.integration.version == 1
    sent = fake.refresh_calls
    assert sent == 1
    # The integration backs off: callers the token satisfies keep getting it, and the
    # provider is not asked again per request.
    for _ in range(10):
        again = await token(stub, iid)
        assert again.access_token == old
        assert not again.refreshed
    assert fake.refresh_calls == sent
    assert not broker.refresher.in_flight
    # A caller it cannot satisfy meets the failure the integration backs off from.
    await expect_error(
        token(stub, iid, min_valid_for=duration_pb2.Duration(seconds=DUE + 100)),
        Code.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    )
    assert fake.refresh_calls == sent


async def test_proxy_sends_a_due_token_that_still_satisfies_and_refreshes_behind(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker, api: FakeApi
) -> None:
    iid, old, _ = await store_grant(stub, fake, expires_in=DUE)
    request = pb.ProxyRequest(integration_id=iid, method="GET", path="/things")
    response = await stub.Proxy(request, metadata=ADMIN)
    assert response.status == 200
    assert not response.refreshed
    assert api.requests[-1].headers["authorization"] == f"Bearer {old}"
    assert waited(broker) == 0
    await refreshed_once(broker, iid)
    again = await stub.Proxy(request, metadata=ADMIN)
    assert again.status == 200
    sent = api.requests[-1].headers["authorization"].removeprefix("Bearer ")
    assert sent != old
    assert fake.is_access_token_active(sent)
    assert fake.refresh_calls == 1


@pytest.fixture
def quick() -> Iterator[FakeAuthServer]:
    # Tokens live 400 s, as the short integrations of the soak: each falls inside the
    # default 300 s margin 100 s after it is issued.
    yield from serve_fake(expires_in=400, latency=0.05)


@pytest.fixture
async def soaked(
    database_url: str, quick: FakeAuthServer, clock: FakeClock
) -> AsyncIterator[Broker]:
    settings = make_settings(
        database_url, providers=provider_settings(quick), refresh={"background": False}
    )
    running = await start(settings, clock=clock)
    yield running
    await running.stop(0)


async def test_a_small_soak_where_integrations_come_due_keeps_callers_from_waiting(
    soaked: Broker, quick: FakeAuthServer, clock: FakeClock
) -> None:
    """20 integrations, 5 of them with 400 s tokens; calls spread over all of them while the
    clock moves 10 s at a time for 6 minutes: the short ones come due (some twice), and no
    caller waits for their refreshes."""
    async with broker_stub(soaked.port) as stub:
        short = [
            (await store_grant(stub, quick, expires_in=400, user_id=f"s{n}"))[0] for n in range(5)
        ]
        long = [
            (await store_grant(stub, quick, expires_in=86_400, user_id=f"l{n}"))[0]
            for n in range(15)
        ]
        answers = []
        for _ in range(36):
            clock.advance(timedelta(seconds=10))
            answers += await asyncio.gather(
                *(token(stub, iid) for iid in short + long for _ in range(2))
            )
            # The refreshes started by this round finish before the clock moves on (the
            # provider answers in 50 ms of real time; the broker's clock stands still).
            await eventually(
                lambda: _idle(soaked), "the refreshes ahead of this round to end", timeout=30
            )
    assert len(answers) == 36 * 40
    assert not any(a.refreshed for a in answers)
    assert waited(soaked) == 0
    # Each short integration was refreshed at least once, each time by one provider call.
    refreshed = 0
    for iid in short:
        stored = await row(soaked, iid)
        assert stored.integration.version >= 2
        refreshed += stored.integration.version - 1
    assert quick.refresh_calls == refreshed
    for iid in long:
        assert (await row(soaked, iid)).integration.version == 1


async def _idle(broker: Broker) -> bool:
    return not broker.refresher.in_flight
