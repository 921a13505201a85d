"""Minted credentials across three broker processes on one PostgreSQL: one mint, not three."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.helpers.credentials import APP_KEY, APP_PUBLIC, SA_EMAIL, SA_PUBLIC, service_account_json
from tests.helpers.databases import PostgresFactory
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.processes import BrokerProcess, replica_set
from tests.helpers.replicas import expire_all
from tests.helpers.settings import ADMIN, KEYS

pytestmark = pytest.mark.postgres


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    # Latency widens the window in which the replicas' callers pile up on one mint.
    def register(server: FakeAuthServer) -> None:
        server.register_service_account(SA_EMAIL, SA_PUBLIC)
        server.register_app("42", APP_PUBLIC, {"7"})

    yield from serve_fake(register, expires_in=3600, latency=0.05)


@pytest.fixture
async def replicas(
    postgres: PostgresFactory, fake: FakeAuthServer, tmp_path: Path
) -> AsyncIterator[tuple[str, list[BrokerProcess]]]:
    url = await postgres.new()
    sections = {
        "refresh": {"background": False, "margin_seconds": 30},
        # expire_all edits rows behind the brokers' backs, which no cache would hear of.
        "cache": {"enabled": False},
        "providers": {
            "acme": {
                "token_url": fake.token_url,
                "api_url": fake.api_url,
                "kinds": ["client_credentials", "service_account", "github_app_installation"],
            }
        },
    }
    async with replica_set(tmp_path, url, sections, {"BROKER_KEYS": KEYS}) as processes:
        yield url, processes


@pytest.mark.parametrize("kind", ["client_credentials", "service_account", "github_app"])
async def test_one_mint_for_200_callers_across_three_processes(
    replicas: tuple[str, list[BrokerProcess]], fake: FakeAuthServer, kind: str
) -> None:
    url, processes = replicas
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p.port}") for p in processes]
    stubs = [pb_grpc.CredentialBrokerStub(c) for c in channels]
    credential = {
        "client_credentials": pb.Credential(
            client_credentials=pb.ClientCredentialsCredential(
                client_id=fake.client_id, client_secret=fake.client_secret
            )
        ),
        "service_account": pb.Credential(
            service_account=pb.ServiceAccountCredential(json_key=service_account_json())
        ),
        "github_app": pb.Credential(
            github_app_installation=pb.GitHubAppInstallationCredential(
                app_id="42", private_key=APP_KEY, installation_id="7"
            )
        ),
    }[kind]
    try:
        stored = await stubs[0].StoreIntegration(
            pb.StoreIntegrationRequest(user_id="u", provider="acme", credential=credential),
            metadata=ADMIN,
        )
        request = pb.GetAccessTokenRequest(integration_id=stored.integration.id)
        for round_ in (1, 2):
            calls = [stubs[n % 3].GetAccessToken(request, metadata=ADMIN) for n in range(200)]
            results = await asyncio.gather(*calls)
            tokens = {r.access_token for r in results}
            assert len(tokens) == 1, "every caller got the same minted token"
            assert fake.mint_calls == round_, "exactly one mint across the three processes"
            assert fake.is_minted_token_active(tokens.pop())
            # Expired again: the next round needs exactly one more mint.
            await expire_all(url, stubs, stored.integration.id)
    finally:
        for channel in channels:
            await channel.close(None)
