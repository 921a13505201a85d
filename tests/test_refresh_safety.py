"""What a refresh does when the provider is slow or its answer is lost, and validity that no
refresh can give: a sent refresh token is never sent again because of a timeout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf import duration_pb2

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import Broker, start
from tests.helpers.errors import error_info, expect_error, retry_info
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.integrations import row, store_grant
from tests.helpers.providers import provider_settings
from tests.helpers.settings import ADMIN, make_settings

Code = grpc.StatusCode


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    yield from serve_fake(expires_in=120)


@pytest.fixture
async def broker(database_url: str, fake: FakeAuthServer) -> AsyncIterator[Broker]:
    running = await start(
        make_settings(
            database_url,
            providers=provider_settings(fake),
            refresh={
                "margin_seconds": 30,
                "provider_timeout_seconds": 3,
                "provider_connect_timeout_seconds": 1,
                "outcome_unknown_retry_seconds": 2,
                # Shorter than that pause: the pause is what the cool-down test waits out.
                "failure_backoff_seconds": 1,
                "max_attempts": 3,
                "background": False,
            },
        )
    )
    yield running
    await running.stop(0)


def seconds(n: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(n))


async def eventually_stored(broker: Broker, iid: str, version: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (await row(broker, iid)).integration.version < version:
        assert loop.time() < deadline, "the refresh was never stored"
        await asyncio.sleep(0.05)


async def test_a_caller_deadline_shorter_than_the_provider_does_not_lose_the_rotation(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, _, refresh = await store_grant(stub, fake)
    fake.latency = 1.5  # longer than the caller waits, shorter than the read timeout
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid),
            metadata=ADMIN,
            timeout=0.7,
        )
    error = caught.value
    assert error.code() == Code.UNAVAILABLE, error.details()
    info = retry_info(error)
    assert info is not None, "UNAVAILABLE comes with RetryInfo"
    # The refresh went on in its own task and was stored: one rotation, nothing re-sent.
    await eventually_stored(broker, iid, 2)
    fake.latency = 0.0
    got = await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    assert not got.refreshed
    assert fake.is_access_token_active(got.access_token)
    assert fake.refresh_calls == 1
    assert fake.is_grant_active(refresh)


async def test_an_unanswered_refresh_is_not_sent_again_until_the_cool_down(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, _, refresh = await store_grant(stub, fake)
    # The provider rotates, but answers after the read timeout: the outcome is unknown.
    fake.fail_next("slow", delay=4.0)
    request = pb.GetAccessTokenRequest(integration_id=iid)
    error = await expect_error(
        stub.GetAccessToken(request, metadata=ADMIN, timeout=15),
        Code.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    )
    assert retry_info(error) is not None
    stored = await row(broker, iid)
    assert stored.last_refresh_error == "outcome_unknown"
    assert stored.next_refresh_at is not None
    assert fake.refresh_calls == 1, "a sent refresh is never retried within the call"
    # Inside the cool-down the refresh token is not presented again.
    await expect_error(
        stub.GetAccessToken(request, metadata=ADMIN, timeout=15),
        Code.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    )
    assert fake.refresh_calls == 1
    # After it, one more try: this strict provider had rotated, so it sees reuse and the
    # integration needs reauthorization (the documented outcome of an unknown answer).
    await asyncio.sleep(2.2)
    await expect_error(
        stub.GetAccessToken(request, metadata=ADMIN, timeout=15),
        Code.FAILED_PRECONDITION,
        "REAUTHORIZATION_REQUIRED",
    )
    assert fake.refresh_calls == 2
    assert not fake.is_grant_active(refresh)


async def test_a_503_is_retried_at_once(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, broker: Broker
) -> None:
    iid, _, refresh = await store_grant(stub, fake)
    fake.fail_next("unavailable", 2, retry_after="0")
    got = await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN)
    assert got.refreshed
    assert fake.refresh_calls == 3
    assert fake.is_grant_active(refresh)
    assert (await row(broker, iid)).last_refresh_error is None


async def test_min_valid_for_beyond_the_token_lifetime_is_an_error_once(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer
) -> None:
    iid, _, _ = await store_grant(stub, fake)
    request = pb.GetAccessTokenRequest(integration_id=iid, min_valid_for=seconds(600))
    error = await expect_error(
        stub.GetAccessToken(request, metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "MIN_VALIDITY_UNATTAINABLE",
    )
    info = error_info(error)
    assert info is not None
    assert info.metadata["token_lifetime_seconds"] == "120"
    assert fake.refresh_calls == 1
    # Remembered: the same impossible request does not call the provider again.
    for _ in range(3):
        await expect_error(
            stub.GetAccessToken(request, metadata=ADMIN),
            Code.FAILED_PRECONDITION,
            "MIN_VALIDITY_UNATTAINABLE",
        )
    assert fake.refresh_calls == 1
    # What the provider can give is served from the token refreshed then.
    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=iid, min_valid_for=seconds(60)),
        metadata=ADMIN,
    )
    assert not got.refreshed
    assert fake.refresh_calls == 1
