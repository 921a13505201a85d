"""Three broker processes on one PostgreSQL: a stream on one of them sees every event the
others write — many integrations failing at once — in id order, and a stream dropped and
resumed from its last id misses none and repeats none (ids become visible in commit order)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.helpers.databases import PostgresFactory
from tests.helpers.events import read_resuming
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.processes import replica_set
from tests.helpers.providers import SECRET_ENV, acme_from_env
from tests.helpers.settings import ADMIN, KEYS

pytestmark = pytest.mark.postgres
T = pb.IntegrationEventType


@pytest.fixture
async def stubs(
    postgres: PostgresFactory, fake: FakeAuthServer, tmp_path: Path
) -> AsyncIterator[list[pb_grpc.CredentialBrokerAsyncStub]]:
    url = await postgres.new()
    sections = {
        "refresh": {"background": False, "max_attempts": 1},
        "events": {"poll_seconds": 2, "heartbeat_seconds": 1},
        "providers": {"acme": acme_from_env(fake)},
    }
    env = {"BROKER_KEYS": KEYS, SECRET_ENV: fake.client_secret}
    async with replica_set(tmp_path, url, sections, env) as processes:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p.port}") for p in processes]
        yield [pb_grpc.CredentialBrokerStub(c) for c in channels]
        for channel in channels:
            await channel.close(None)


async def test_a_stream_follows_other_processes_and_resumes_without_gap_or_duplicate(
    stubs: list[pb_grpc.CredentialBrokerAsyncStub], fake: FakeAuthServer
) -> None:
    reader, *writers = stubs

    async def store(i: int) -> str:
        access, refresh = fake.issue_grant()
        response = await writers[i % 2].StoreIntegration(
            pb.StoreIntegrationRequest(
                user_id=f"u{i}", provider="acme", access_token=access, refresh_token=refresh
            ),
            metadata=ADMIN,
        )
        return response.integration.id

    ids = await asyncio.gather(*(store(i) for i in range(40)))
    first = await reader.ListIntegrationEvents(
        pb.ListIntegrationEventsRequest(page_size=500), metadata=ADMIN
    )
    assert len(first.events) == 40
    cursor = first.events[9].id  # a stream opened at cursor N
    fake.fail_always("invalid_grant")

    async def fail(i: int, iid: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError):
            await writers[i % 2].GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=iid, force_refresh=True), metadata=ADMIN
            )

    # Every integration fails at once, through two other processes, while the stream reads.
    writing = asyncio.gather(*(fail(i, iid) for i, iid in enumerate(ids)))
    seen = await read_resuming(reader, cursor, writing)
    stored = await reader.ListIntegrationEvents(
        pb.ListIntegrationEventsRequest(after_event_id=first.events[9].id, page_size=500),
        metadata=ADMIN,
    )
    assert [e.id for e in seen] == [e.id for e in stored.events], "no gap, no duplicate"
    assert len(stored.events) >= 30 + 20
    reauth = [e for e in seen if e.type == T.INTEGRATION_EVENT_TYPE_NEEDS_REAUTHORIZATION]
    # Each integration the provider rejected has its one event (a refresh that timed out under
    # load has none).
    assert len({e.integration_id for e in reauth}) == len(reauth) >= 20
