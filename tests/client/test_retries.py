"""Retries: UNAVAILABLE only, waiting what RetryInfo says, never past the deadline; the broker's
audit rows (one per attempt, same request id) count the attempts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from broker.server.app import Broker
from broker.server.callers import hash_token
from broker_devtools.fakeauth import FakeAuthServer
from credentialbroker_client import (
    AsyncBrokerClient,
    ProviderUnavailable,
    ReauthorizationRequired,
    Retry,
    Unavailable,
)
from tests.client.conftest import audited, store_grant
from tests.helpers.processes import BrokerProcess, free_port, write_toml
from tests.helpers.settings import ADMIN_TOKEN, KEYS


async def test_unavailable_is_retried_after_the_retry_info_delay(
    broker: Broker, client: AsyncBrokerClient, fake: FakeAuthServer
) -> None:
    iid = await store_grant(client, fake, expires_in=10)
    fake.fail_next("unavailable", times=2)
    started = time.monotonic()
    got = await client.get_access_token(integration_id=iid, min_valid_for=60, request_id="retry-1")
    elapsed = time.monotonic() - started
    assert got.refreshed
    assert fake.refresh_calls == 3
    # Every attempt carried the same request id; the broker asked for >= 1 s between them.
    assert await audited(broker, "retry-1", 3) == 3
    assert elapsed >= 2.0


async def test_no_retry_when_retry_info_outlasts_the_deadline(
    broker: Broker, client: AsyncBrokerClient, fake: FakeAuthServer
) -> None:
    iid = await store_grant(client, fake, expires_in=10)
    fake.fail_always("rate_limited", retry_after="30")
    with pytest.raises(ProviderUnavailable) as caught:
        await client.get_access_token(
            integration_id=iid, min_valid_for=60, timeout=5, request_id="late-1"
        )
    error = caught.value
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.retry_delay is not None
    assert error.retry_delay >= 30
    assert error.metadata["integration_id"] == iid
    assert fake.refresh_calls == 1
    assert await audited(broker, "late-1") == 1


async def test_attempts_are_bounded(
    broker: Broker, fake: FakeAuthServer, client: AsyncBrokerClient
) -> None:
    iid = await store_grant(client, fake, expires_in=10)
    fake.fail_always("unavailable")
    async with AsyncBrokerClient(
        f"127.0.0.1:{broker.port}", token=ADMIN_TOKEN, retry=Retry(attempts=2), timeout=20
    ) as twice:
        with pytest.raises(ProviderUnavailable):
            await twice.get_access_token(integration_id=iid, min_valid_for=60, request_id="b-1")
    assert fake.refresh_calls == 2
    assert await audited(broker, "b-1", 2) == 2


async def test_other_codes_are_never_retried(
    broker: Broker, client: AsyncBrokerClient, fake: FakeAuthServer
) -> None:
    iid = await store_grant(client, fake, expires_in=10)
    fake.fail_always("invalid_grant")
    with pytest.raises(ReauthorizationRequired):
        await client.get_access_token(integration_id=iid, min_valid_for=60, request_id="once-1")
    assert fake.refresh_calls == 1
    assert await audited(broker, "once-1") == 1


@pytest.fixture
def backend() -> str:
    """Storage plays no part in a broker that is not there yet."""
    return "sqlite"


async def test_a_broker_that_comes_up_late_is_reached_within_the_deadline(
    tmp_path: Path, database_url: str
) -> None:
    """A real broker process started after the first attempts failed with UNAVAILABLE."""
    port = free_port()
    config = write_toml(
        tmp_path / "broker.toml",
        {
            "server": {"listen": f"127.0.0.1:{port}", "environment": "test"},
            "database": {"url": database_url},
            "keys": {"keys": KEYS},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
        },
    )
    process = BrokerProcess(config)
    retry = Retry(attempts=100, initial_backoff=0.2, max_backoff=0.5)
    async with AsyncBrokerClient(f"127.0.0.1:{port}", token=ADMIN_TOKEN, retry=retry) as client:
        with pytest.raises(Unavailable) as down:
            await client.list_integrations(user_id="u1", timeout=1)
        assert down.value.code == grpc.StatusCode.UNAVAILABLE
        assert down.value.request_id, "even an unanswered call names its request id"
        call = asyncio.create_task(client.list_integrations(user_id="u1", timeout=60))
        await asyncio.sleep(1)
        assert not call.done()
        await process.start()
        try:
            page = await call
            assert list(page.integrations) == []
        finally:
            assert await process.stop() == 0
