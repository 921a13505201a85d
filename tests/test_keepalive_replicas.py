"""Keep-alive across replicas: three broker processes on one PostgreSQL keep idle grants alive
at the provider, each grant refreshed once per half idle lifetime, never twice at once (the
fake rotates refresh tokens and revokes a grant whose used refresh token comes back); a refresh
token that lapses soon and cannot be renewed gets one INTEGRATION_EXPIRING event, not one per
replica or per pass."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.helpers.databases import PostgresFactory
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.processes import replica_set
from tests.helpers.providers import SECRET_ENV, acme_from_env
from tests.helpers.settings import ADMIN, KEYS
from tests.helpers.stubs import broker_stub
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.postgres

IDLE = 4  # seconds: providers.acme.refresh_token_idle_lifetime_seconds
INTERVAL = 0.5  # refresh.background_interval_seconds
GRANTS = 4
PERIODS = 3


async def test_idle_grants_are_kept_alive_once_per_period_across_replicas(
    postgres: PostgresFactory, fake: FakeAuthServer, tmp_path: Path
) -> None:
    url = await postgres.new()
    sections = {
        "refresh": {"background_interval_seconds": INTERVAL},
        "providers": {
            "acme": {**acme_from_env(fake), "refresh_token_idle_lifetime_seconds": IDLE},
            # LinkedIn-like: refresh tokens with an absolute expiry, never rotated.
            "linked": {**acme_from_env(fake), "rotates_refresh_tokens": False},
        },
    }
    env = {"BROKER_KEYS": KEYS, SECRET_ENV: fake.client_secret}
    async with replica_set(tmp_path, url, sections, env) as processes:
        first: list[str] = []
        async with broker_stub(processes[0].port) as stub:
            for n in range(GRANTS):
                first.append(await store(stub, fake, f"user-{n}"))
            # Lapses in six days: inside the notice time (seven) from the first pass on.
            lapsing = await store(stub, fake, "user-x", provider="linked", lapses_in=6 * 86400)

            async def kept_alive() -> bool:
                return all(len(fake.refresh_times(rt)) >= PERIODS for rt in first)

            # Nobody asks for an access token: only keep-alive refreshes them.
            await eventually(kept_alive, "every grant kept alive for several periods", timeout=60)
            # Many passes of three replicas later: one EXPIRING event, and no refresh for it.
            events = await stub.ListIntegrationEvents(
                pb.ListIntegrationEventsRequest(
                    provider="linked", types=[pb.INTEGRATION_EVENT_TYPE_EXPIRING]
                ),
                metadata=ADMIN,
            )
            assert len(events.events) == 1, events
            assert fake.refresh_times(lapsing) == []
    assert fake.reuse_revocations == 0, "no refresh token was presented twice"
    for rt in first:
        assert fake.is_grant_active(rt)
        times = fake.refresh_times(rt)
        # One refresh per period, whichever replica made it: the next is claimed only once
        # the refresh token has been idle for half its lifetime (less one pass of look-ahead).
        gaps = [later - earlier for earlier, later in pairwise(times)]
        assert min(gaps) >= IDLE / 2 - INTERVAL - 0.25, gaps


async def store(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    user: str,
    provider: str = "acme",
    lapses_in: int | None = None,
) -> str:
    access, refresh = fake.issue_grant()
    await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id=user,
            provider=provider,
            access_token=access,
            refresh_token=refresh,
            # The access token outlives the test: only the refresh token's upkeep is due.
            expires_in_seconds=86400,
            refresh_token_expires_in_seconds=lapses_in,
        ),
        metadata=ADMIN,
    )
    return refresh
