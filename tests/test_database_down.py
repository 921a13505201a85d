"""PostgreSQL going away and coming back, through a TCP proxy the test can cut.

A database that is down gives UNAVAILABLE STORAGE_UNAVAILABLE; the server keeps running, health
says NOT_SERVING, and both recover on their own when the database is reachable again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import SERVICE_NAME, Broker, start
from tests.helpers.databases import PostgresFactory
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.proxy import Proxy
from tests.helpers.settings import ADMIN, make_settings
from tests.helpers.stubs import broker_stub
from tests.helpers.waiting import eventually

pytestmark = pytest.mark.postgres

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def database(postgres: PostgresFactory) -> str:
    return await postgres.new()


@pytest.fixture
async def proxy(database: str) -> AsyncIterator[Proxy]:
    url = make_url(database)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def broker(database: str, proxy: Proxy) -> AsyncIterator[Broker]:
    """The broker reaches PostgreSQL only through the proxy."""
    proxied = make_url(database).set(host="127.0.0.1", port=proxy.port)
    running = await start(make_settings(proxied.render_as_string(hide_password=False)))
    yield running
    await running.stop(0)


def health_is(channel: grpc.aio.Channel, status: int) -> Callable[[], Awaitable[bool]]:
    stub = health_pb2_grpc.HealthStub(channel)

    async def check() -> bool:
        for service in ("", SERVICE_NAME):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            if response.status != status:
                return False
        return True

    return check


def token_works(
    stub: pb_grpc.CredentialBrokerAsyncStub, iid: str, expected: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            response = await stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN, timeout=10
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        assert response.access_token == expected
        return True

    return check


async def expect_storage_unavailable(stub: pb_grpc.CredentialBrokerAsyncStub, iid: str) -> None:
    """Every kind of call fails fast with UNAVAILABLE STORAGE_UNAVAILABLE and a plain message."""
    calls = [
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN, timeout=10
        ),
        stub.GetIntegration(
            pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN, timeout=10
        ),
        stub.ListIntegrations(
            pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN, timeout=10
        ),
        stub.StoreIntegration(store_request(user_id="user-2"), metadata=ADMIN, timeout=10),
    ]
    # More calls than pooled connections, so each dead pooled connection is met once.
    for call in [*calls, *calls, *calls]:
        error = await expect_error(call, grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE")
        details = error.details() or ""
        assert "Traceback" not in details
        assert "postgres" not in details.lower()


async def test_database_down_then_back(
    broker: Broker, proxy: Proxy, channel: grpc.aio.Channel, stub: pb_grpc.CredentialBrokerAsyncStub
) -> None:
    stored = await stub.StoreIntegration(store_request(access_token="at-survives"), metadata=ADMIN)
    iid = stored.integration.id
    await eventually(health_is(channel, SERVING), "health is SERVING")

    await proxy.stop()
    await expect_storage_unavailable(stub, iid)
    await eventually(health_is(channel, NOT_SERVING), "health is NOT_SERVING")
    # Still serving: another round of calls gets the same clean answer, not a dead server.
    await expect_storage_unavailable(stub, iid)

    await proxy.start()  # same port
    await eventually(token_works(stub, iid, "at-survives"), "GetAccessToken works again")
    await eventually(health_is(channel, SERVING), "health is SERVING again")
    again = await stub.StoreIntegration(store_request(user_id="user-3"), metadata=ADMIN)
    assert again.created


async def test_unresponsive_database_times_out(
    broker: Broker, proxy: Proxy, channel: grpc.aio.Channel, stub: pb_grpc.CredentialBrokerAsyncStub
) -> None:
    """Connections stay open but nothing comes back: calls give up after database.timeout."""
    stored = await stub.StoreIntegration(store_request(access_token="at-frozen"), metadata=ADMIN)
    iid = stored.integration.id
    proxy.frozen = True
    loop = asyncio.get_running_loop()
    began = loop.time()
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN, timeout=15
        ),
        grpc.StatusCode.UNAVAILABLE,
        "STORAGE_UNAVAILABLE",
    )
    timeout = broker.settings.database.timeout_seconds
    assert loop.time() - began < timeout * 3
    await eventually(health_is(channel, NOT_SERVING), "health is NOT_SERVING")

    await proxy.stop()
    await proxy.start()
    await eventually(token_works(stub, iid, "at-frozen"), "GetAccessToken works again")
    await eventually(health_is(channel, SERVING), "health is SERVING again")


async def test_event_streams_stay_open_while_the_database_is_down_and_resume(
    database: str, proxy: Proxy
) -> None:
    """The streams' shared poller retries a failed poll: open streams keep their heartbeats
    through the outage (ending them all would bring them all back at once) and then deliver
    what was written after it, once each, in order."""
    proxied = make_url(database).set(host="127.0.0.1", port=proxy.port)
    settings = make_settings(
        proxied.render_as_string(hide_password=False),
        events={"poll_seconds": 0.2, "heartbeat_seconds": 0.3},
    )
    broker = await start(settings)
    try:
        async with broker_stub(broker.port) as stub:
            await stub.StoreIntegration(store_request(user_id="before"), metadata=ADMIN)
            call = stub.WatchIntegrationEvents(pb.WatchIntegrationEventsRequest(), metadata=ADMIN)
            first: Any = await call.read()
            assert first.event.user_id == "before"

            await proxy.stop()
            beats = 0
            while beats < 5:  # ~1.5 s of outage, several failed polls
                item: Any = await asyncio.wait_for(call.read(), 5)
                assert item.HasField("heartbeat")
                assert item.heartbeat.last_event_id == first.event.id
                beats += 1

            await proxy.start()
            for user in ("after-1", "after-2"):
                await eventually(stored(stub, user), f"{user} is stored")
            seen: list[str] = []
            while len(seen) < 2:
                item = await asyncio.wait_for(call.read(), 10)
                if item.HasField("event"):
                    seen.append(item.event.user_id)
            assert seen == ["after-1", "after-2"]
            call.cancel()
    finally:
        await broker.stop(0)


def stored(stub: pb_grpc.CredentialBrokerAsyncStub, user: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            await stub.StoreIntegration(store_request(user_id=user), metadata=ADMIN, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return False
        return True

    return check
