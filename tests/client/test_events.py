"""Integration events through the client, on both backends: the paged list and the live stream
(server-streaming, through ``stream``), heartbeats, errors raised from the iteration."""

from __future__ import annotations

import asyncio

import pytest

from broker.config import Settings
from broker.server.app import Broker
from credentialbroker_client import AsyncBrokerClient, BrokerClient, Unauthenticated, broker_pb2
from tests.helpers.settings import ADMIN_TOKEN, make_settings

CONNECTED = broker_pb2.INTEGRATION_EVENT_TYPE_CONNECTED
DISCONNECTED = broker_pb2.INTEGRATION_EVENT_TYPE_DISCONNECTED


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, events={"poll_seconds": 0.2, "heartbeat_seconds": 0.5})


async def test_list_and_watch(broker: Broker) -> None:
    async with AsyncBrokerClient(f"127.0.0.1:{broker.port}", token=ADMIN_TOKEN) as client:
        first = await client.store_integration(user_id="u1", provider="twitter", access_token="a")
        iid = first.integration.id
        await client.store_integration(user_id="u2", provider="twitter", access_token="b")

        listed = [e async for e in client.iter_integration_events(user_id="u1", page_size=1)]
        assert [(e.integration_id, e.type) for e in listed] == [(iid, CONNECTED)]

        seen: list[broker_pb2.IntegrationEvent] = []
        heartbeats = 0
        async with client.watch_integration_events(user_id="u1", timeout=60) as watch:
            async for item in watch:
                if item.HasField("event"):
                    seen.append(item.event)
                    if len(seen) == 1:
                        await client.disconnect(integration_id=iid, skip_provider_revocation=True)
                else:
                    heartbeats += 1
                if len(seen) == 2 and heartbeats:
                    break
        assert [e.type for e in seen] == [CONNECTED, DISCONNECTED]
        assert seen[0].id < seen[1].id

        # Resume after the last event seen: nothing is delivered twice.
        resumed = client.watch_integration_events(after_event_id=seen[-1].id, user_id="u1")
        item = await anext(resumed)
        assert not item.HasField("event")
        assert item.heartbeat.last_event_id == seen[-1].id
        resumed.cancel()

    async with AsyncBrokerClient(f"127.0.0.1:{broker.port}", token="wrong") as stranger:
        with pytest.raises(Unauthenticated) as caught:
            async for _ in stranger.watch_integration_events(request_id="w-err"):
                pass
        assert caught.value.request_id == "w-err"


async def test_sync_watch(broker: Broker) -> None:
    def use() -> list[int]:
        with BrokerClient(f"127.0.0.1:{broker.port}", token=ADMIN_TOKEN) as client:
            client.store_integration(user_id="s1", provider="twitter", access_token="a")
            with client.watch_integration_events(user_id="s1", timeout=60) as watch:
                for item in watch:
                    if item.HasField("event"):
                        return [item.event.type]
        return []

    assert await asyncio.to_thread(use) == [CONNECTED]
