"""Three broker processes on one PostgreSQL: one refresh per rotation, the grant survives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from sqlalchemy import update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings
from broker.storage.engine import create_engine, touch
from broker.storage.tables import integrations
from tests.conftest import ADMIN, KEYS, PostgresFactory
from tests.fakeauth import FakeAuthServer
from tests.processes import BrokerProcess, replica_set

pytestmark = pytest.mark.postgres


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    with FakeAuthServer(expires_in=3600, latency=0.05) as server:
        yield server


@pytest.fixture
async def replicas(
    postgres: PostgresFactory, fake: FakeAuthServer, tmp_path: Path
) -> AsyncIterator[tuple[str, list[BrokerProcess]]]:
    url = await postgres.new()
    sections = {
        "refresh": {"background": False, "margin_seconds": 30},
        "providers": {
            "acme": {
                "token_url": fake.token_url,
                "client_id": fake.client_id,
                "client_secret_env": "ACME_SECRET",
                "rotates_refresh_tokens": True,
            }
        },
    }
    env = {"BROKER_KEYS": KEYS, "ACME_SECRET": fake.client_secret}
    async with replica_set(tmp_path, url, sections, env) as processes:
        yield url, processes


async def expire_all(url: str, stubs: list[pb_grpc.CredentialBrokerAsyncStub], iid: str) -> None:
    """Expire the tokens as a write would: announced to every replica's cache (NOTIFY), and
    seen by each of them before the test goes on. (Changing the row behind the brokers' backs
    left a replica answering from its cache — with the old expiry — when it had cached the row
    after the last invalidation: no refresh in that rotation, the old flake "assert 2 == 3".)"""
    engine = create_engine(DatabaseSettings(url=url))
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(update(integrations).values(expires_at=now))
        await touch(conn, iid)
    await engine.dispose()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    for stub in stubs:
        while True:
            got = await stub.GetIntegration(
                pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN
            )
            if got.integration.expires_at.ToDatetime(UTC) <= now:
                break
            assert loop.time() < deadline, "a replica never heard of the write"
            await asyncio.sleep(0.05)


async def test_one_refresh_per_rotation_across_three_processes(
    replicas: tuple[str, list[BrokerProcess]], fake: FakeAuthServer
) -> None:
    url, processes = replicas
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p.port}") for p in processes]
    stubs = [pb_grpc.CredentialBrokerStub(c) for c in channels]
    try:
        access, refresh = fake.issue_grant()
        stored = await stubs[0].StoreIntegration(
            pb.StoreIntegrationRequest(
                user_id="u",
                provider="acme",
                access_token=access,
                refresh_token=refresh,
                expires_in_seconds=0,
            ),
            metadata=ADMIN,
        )
        iid = stored.integration.id
        request = pb.GetAccessTokenRequest(integration_id=iid)
        for rotation in (1, 2, 3):
            calls = [stubs[n % 3].GetAccessToken(request, metadata=ADMIN) for n in range(90)]
            results = await asyncio.gather(*calls)
            tokens = {r.access_token for r in results}
            assert len(tokens) == 1, "every caller got the same new token"
            assert fake.refresh_calls == rotation, "exactly one provider call per rotation"
            assert fake.is_access_token_active(tokens.pop())
            assert fake.is_grant_active(refresh), "the grant survived"
            await expire_all(url, stubs, iid)
    finally:
        for channel in channels:
            await channel.close(None)
