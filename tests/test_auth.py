"""Bearer-token authentication and per-method permission; health open, reflection closed.

Auth sits in front of storage, so one backend (SQLite) is enough here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import func, select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import SERVICE_NAME, Broker
from broker.server.callers import CallerRegistry
from broker.server.interceptors import AuthInterceptor
from broker.storage.tables import integrations
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, RUNNER


@pytest.fixture
def backend() -> str:
    """Overrides the sqlite/postgres parameter: authentication never reaches storage."""
    return "sqlite"


Code = grpc.StatusCode

SERVICE = pb.DESCRIPTOR.services_by_name["CredentialBroker"]
# Requests that would succeed for an allowed caller; any other RPC gets an empty request, which
# is enough, since authentication and permission are decided before the request is looked at.
VALID: dict[str, Message] = {
    "StoreIntegration": store_request(access_token="at-auth-test"),
    "GetAccessToken": pb.GetAccessTokenRequest(user_id="user-1", provider="twitter"),
    "Disconnect": pb.DisconnectRequest(user_id="user-1", provider="twitter"),
    "GetIntegration": pb.GetIntegrationRequest(user_id="user-1", provider="twitter"),
    "ListIntegrations": pb.ListIntegrationsRequest(user_id="user-1"),
}
REQUESTS: dict[str, Message] = {
    method.name: VALID.get(method.name) or getattr(pb, method.input_type.name)()
    for method in SERVICE.methods
}


def call(stub: pb_grpc.CredentialBrokerAsyncStub, method: str, metadata: Any) -> Any:
    result = getattr(stub, method)(REQUESTS[method], metadata=metadata)
    if SERVICE.methods_by_name[method].server_streaming:
        return _drain(result)  # a stream's error arrives when it is read
    return result


async def _drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


async def row_count(broker: Broker) -> int:
    async with broker.engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(integrations))).scalar_one()
        )


def test_every_rpc_is_covered() -> None:
    assert set(VALID) <= set(REQUESTS), "the core RPCs are missing from the service"


@pytest.mark.parametrize("method", sorted(REQUESTS))
@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong-token"),),
        (("authorization", f"Basic {ADMIN_TOKEN}"),),
        (("authorization", ADMIN_TOKEN),),
        (("authorization", "Bearer "),),
        (("authorization", f"Bearer {ADMIN_TOKEN}x"),),
        (("x-api-key", ADMIN_TOKEN),),
    ],
    ids=["missing", "wrong", "basic-scheme", "no-scheme", "empty", "prefix", "other-header"],
)
async def test_unauthenticated(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, method: str, metadata: Any
) -> None:
    error = await expect_error(call(stub, method, metadata), Code.UNAUTHENTICATED)
    details = error.details() or ""
    assert "authorization: Bearer" in details or "not one of this broker's callers" in details
    assert ADMIN_TOKEN not in details
    assert "wrong-token" not in details
    assert await row_count(broker) == 0


async def test_scheme_is_case_insensitive(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    response = await stub.StoreIntegration(
        store_request(), metadata=(("authorization", f"bearer {ADMIN_TOKEN}"),)
    )
    assert response.created


@pytest.mark.parametrize("method", sorted(set(REQUESTS) - {"GetAccessToken"}))
async def test_runner_may_only_get_access_tokens(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, method: str
) -> None:
    stored = await stub.StoreIntegration(store_request(access_token="at-runner"), metadata=ADMIN)
    error = await expect_error(call(stub, method, RUNNER), Code.PERMISSION_DENIED)
    details = error.details() or ""
    assert method in details
    assert "'runner'" in details
    assert "runner-token" not in details
    assert await row_count(broker) == 1
    after = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=stored.integration.id), metadata=ADMIN
    )
    assert after.integration == stored.integration, "a refused call changed the integration"
    token = await call(stub, "GetAccessToken", RUNNER)
    assert token.access_token == "at-runner"


async def test_admin_may_call_everything(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    for method in ("StoreIntegration", "GetAccessToken", "GetIntegration", "ListIntegrations"):
        await call(stub, method, ADMIN)
    disconnected = await call(stub, "Disconnect", ADMIN)
    assert disconnected.integration.status == pb.INTEGRATION_STATUS_DISCONNECTED


# -- health and reflection --------------------------------------------------------------------


async def health_status(health: health_pb2_grpc.HealthStub, service: str) -> int | None:
    """The service's status, or None while the server does not know the service yet."""
    try:
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
    except grpc.aio.AioRpcError as exc:
        if exc.code() != Code.NOT_FOUND:
            raise
        return None
    return int(response.status)


async def test_health_needs_no_credentials(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(health, "") == serving
    # The per-service status is set by the database watcher's first ping.
    deadline = asyncio.get_running_loop().time() + 5
    while await health_status(health, SERVICE_NAME) != serving:
        assert asyncio.get_running_loop().time() < deadline, "service never became SERVING"
        await asyncio.sleep(0.05)
    assert await health_status(health, "no.such.Service") is None


async def list_services(channel: grpc.aio.Channel, metadata: Any) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    async for response in stub.ServerReflectionInfo(requests(), metadata=metadata):
        names += [s.name for s in response.list_services_response.service]
    return names


@pytest.mark.parametrize(
    "metadata", [None, (("authorization", "Bearer wrong-token"),)], ids=["missing", "wrong"]
)
async def test_reflection_refused_without_credentials(
    channel: grpc.aio.Channel, metadata: Any
) -> None:
    await expect_error(list_services(channel, metadata), Code.UNAUTHENTICATED)


@pytest.mark.parametrize("metadata", [ADMIN, RUNNER], ids=["admin", "runner"])
async def test_reflection_open_to_any_caller(channel: grpc.aio.Channel, metadata: Any) -> None:
    names = await list_services(channel, metadata)
    assert SERVICE_NAME in names
    assert "grpc.health.v1.Health" in names


class _RecordingServer:
    """Takes the registrations a grpc.aio server would (generic and by name)."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.by_name: dict[str, set[str]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.by_name[service] = set(handlers)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_only_the_hot_methods_are_registered_by_name_and_every_method_is_guarded() -> None:
    """grpc.aio's server loop waits on one task per method registered by name after every
    call, so only GetAccessToken and Proxy are; every other method (and Health) is found
    through the generic handlers — guarded just the same."""
    recording = _RecordingServer()
    guard = AuthInterceptor(CallerRegistry({}))
    # As app.start hands them over: the registrar stands in for the server.
    registrar: Any = guard.guarding(cast(grpc.aio.Server, recording))
    servicer: Any = pb_grpc.CredentialBrokerServicer
    pb_grpc.add_CredentialBrokerServicer_to_server(servicer(), registrar)
    health_pb2_grpc.add_HealthServicer_to_server(health_pb2_grpc.HealthServicer(), registrar)
    assert recording.by_name == {SERVICE_NAME: {"GetAccessToken", "Proxy"}}
    methods = pb.DESCRIPTOR.services_by_name["CredentialBroker"].methods
    assert len(methods) > 2
    for method in methods:
        name = f"/{SERVICE_NAME}/{method.name}"
        found = [h.service(_Details(name)) for h in recording.generic]
        handler = next(h for h in found if h is not None)
        # The guarded handler (made once per method), never the servicer's own.
        assert handler is guard.guard(name, None)
