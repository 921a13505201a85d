"""Helpers for several brokers on one database: expiring tokens so every replica sees it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from sqlalchemy import update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings
from broker.storage.engine import create_engine, touch
from broker.storage.tables import integrations
from tests.helpers.settings import ADMIN


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
