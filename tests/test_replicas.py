"""Three broker processes on one PostgreSQL: one refresh per rotation, the grant survives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.helpers.databases import PostgresFactory
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.processes import BrokerProcess, replica_set
from tests.helpers.providers import SECRET_ENV, acme_from_env
from tests.helpers.replicas import expire_all
from tests.helpers.settings import ADMIN, KEYS

pytestmark = pytest.mark.postgres


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    yield from serve_fake(expires_in=3600, latency=0.05)


@pytest.fixture
async def replicas(
    postgres: PostgresFactory, fake: FakeAuthServer, tmp_path: Path
) -> AsyncIterator[tuple[str, list[BrokerProcess]]]:
    url = await postgres.new()
    sections = {
        "refresh": {"background": False, "margin_seconds": 30},
        "providers": {"acme": acme_from_env(fake)},
    }
    env = {"BROKER_KEYS": KEYS, SECRET_ENV: fake.client_secret}
    async with replica_set(tmp_path, url, sections, env) as processes:
        yield url, processes


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
