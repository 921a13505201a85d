"""What the client puts on the wire: bearer token, grant header, request id, extra headers,
deadline. A recording CredentialBroker servicer on a real grpc.aio server shows it; the grant
header is checked here because a broker enforcing grants is being built elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from credentialbroker_client import (
    AsyncBrokerClient,
    BrokerClient,
    DeadlineExceeded,
    Tls,
    broker_pb2,
)


class Recorder:
    """Serves GetAccessToken only, remembering each call's metadata and deadline."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], float | None]] = []
        self.delay = 0.0  # seconds before answering

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            "credentialbroker.v1.CredentialBroker",
            {
                "GetAccessToken": grpc.unary_unary_rpc_method_handler(
                    self.get_access_token,
                    request_deserializer=broker_pb2.GetAccessTokenRequest.FromString,
                    response_serializer=broker_pb2.GetAccessTokenResponse.SerializeToString,
                )
            },
        )

    async def get_access_token(
        self, request: broker_pb2.GetAccessTokenRequest, context: Any
    ) -> broker_pb2.GetAccessTokenResponse:
        headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append((headers, context.time_remaining()))
        await asyncio.sleep(self.delay)
        return broker_pb2.GetAccessTokenResponse(access_token="at", integration_id="i")


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, int]]:
    server = grpc.aio.server()
    servicer = Recorder()
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, port
    await server.stop(0)


async def test_credentials_grant_and_request_id_on_the_wire(
    recorder: tuple[Recorder, int],
) -> None:
    servicer, port = recorder
    async with AsyncBrokerClient(f"127.0.0.1:{port}", token="tok", grant="grant-a") as client:
        await client.get_access_token(integration_id="i", request_id="w-1")
        await client.get_access_token(
            integration_id="i", grant="grant-b", headers=[("x-extra", "1")], timeout=7
        )
        runner = client.with_grant("grant-c")
        await runner.get_access_token(integration_id="i", timeout=None)
        await runner.close()  # shares the channel: closing it closes nothing
        await client.get_access_token(integration_id="i")
    (first, deadline1), (second, deadline2), (third, deadline3), (fourth, _) = servicer.calls
    assert first["authorization"] == "Bearer tok"
    assert first["x-broker-grant"] == "grant-a"
    assert first["x-request-id"] == "w-1"
    assert deadline1 is not None
    assert 8 < deadline1 <= 31  # the default deadline (30 s)
    assert second["x-broker-grant"] == "grant-b"
    assert second["x-extra"] == "1"
    assert second["x-request-id"] not in ("", "w-1")
    assert deadline2 is not None
    assert deadline2 < 8
    assert third["x-broker-grant"] == "grant-c"
    assert third["authorization"] == "Bearer tok"
    assert deadline3 is None
    assert fourth["x-broker-grant"] == "grant-a"


async def test_sync_client_sends_the_same(recorder: tuple[Recorder, int]) -> None:
    servicer, port = recorder

    def use() -> None:
        with BrokerClient(f"127.0.0.1:{port}", token="tok", grant="g") as client:
            client.get_access_token(integration_id="i", request_id="s-1")
            with pytest.raises(TypeError, match="is unary: use call"):
                list(client.stream("GetAccessToken", {"integration_id": "i"}))

    await asyncio.to_thread(use)
    ((headers, _),) = servicer.calls
    assert headers["x-broker-grant"] == "g"
    assert headers["x-request-id"] == "s-1"


def test_plaintext_only_to_loopback() -> None:
    for target in ("127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/tmp/broker.sock"):
        BrokerClient(target).close()
    for target in ("broker.internal:50051", "10.0.0.5:50051", "dns:///broker:50051"):
        with pytest.raises(ValueError, match="not a loopback address"):
            BrokerClient(target, token="t")
    BrokerClient("broker.internal:50051", allow_insecure=True).close()
    BrokerClient("broker.internal:50051", tls=Tls()).close()


def test_tls_needs_both_halves_of_a_client_certificate() -> None:
    with pytest.raises(ValueError, match="together"):
        Tls(certificate_chain=b"cert")
    assert "KEY" not in repr(Tls(certificate_chain=b"cert", private_key=b"KEY"))


async def test_deadline_exceeded_is_not_retried(recorder: tuple[Recorder, int]) -> None:
    servicer, port = recorder
    servicer.delay = 5
    async with AsyncBrokerClient(f"127.0.0.1:{port}", token="tok") as client:
        with pytest.raises(DeadlineExceeded) as caught:
            await client.get_access_token(integration_id="i", timeout=0.5, request_id="slow-1")
    assert caught.value.request_id == "slow-1"
    assert len(servicer.calls) == 1
