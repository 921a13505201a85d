"""The client against real brokers: in-process grpc.aio servers on port 0 (both backends),
the fake authorization server on loopback as the provider."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select

from broker.config import Settings
from broker.server.app import Broker
from broker.storage.tables import audit_events
from broker_devtools.fakeauth import FakeAuthServer
from credentialbroker_client import AsyncBrokerClient, Retry
from tests.helpers.providers import acme
from tests.helpers.settings import ADMIN_TOKEN, make_settings

# Quick retries, so tests that exercise them stay short on a loaded machine.
FAST = Retry(attempts=5, initial_backoff=0.05, max_backoff=0.2)


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    # One provider call per broker call: the client's retries are what the tests count (and
    # a back-off after a failure shorter than the RetryInfo the provider's 503 brings).
    return make_settings(
        database_url,
        providers={"acme": acme(fake), "keyed": {"kinds": ["api_key"]}},
        refresh={
            "background": False,
            "max_attempts": 1,
            "provider_timeout_seconds": 5,
            "failure_backoff_seconds": 0.5,
        },
    )


@pytest.fixture
async def client(broker: Broker) -> AsyncIterator[AsyncBrokerClient]:
    async with AsyncBrokerClient(
        f"127.0.0.1:{broker.port}", token=ADMIN_TOKEN, retry=FAST, timeout=20
    ) as client:
        yield client


async def audited(broker: Broker, request_id: str, at_least: int = 1) -> int:
    """How many calls with this request id reached the broker (one audit row each). A failed
    call is audited just after its status went out, so wait for ``at_least`` rows first."""
    query = select(func.count()).where(audit_events.c.request_id == request_id)
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        async with broker.engine.connect() as conn:
            count = int((await conn.execute(query)).scalar_one())
        if count >= at_least or asyncio.get_running_loop().time() > deadline:
            return count
        await asyncio.sleep(0.05)


async def store_grant(
    client: AsyncBrokerClient, fake: FakeAuthServer, expires_in: int = 3600, user: str = "u1"
) -> str:
    access, refresh = fake.issue_grant(scopes=("read",))
    stored = await client.store_integration(
        user_id=user,
        provider="acme",
        access_token=access,
        refresh_token=refresh,
        expires_in_seconds=expires_in,
        scopes=["read"],
    )
    return stored.integration.id
