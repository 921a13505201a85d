"""The echo floor: a bare grpc.aio server answering GetAccessToken with a constant response.

No interceptor, no auth, no audit, no storage: what is left is gRPC, protobuf and the event
loop, i.e. the physical floor any GetAccessToken implementation in Python sits on. It runs in
its own process (spawned), on the same event loop the broker uses (uvloop when installed), and
answers a response of exactly the broker's shape (``data.sample_response``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from multiprocessing.connection import Connection
from typing import Any

import grpc

from broker.api.credentialbroker.v1 import broker_pb2 as pb

SERVICE = "credentialbroker.v1.CredentialBroker"


def _handlers(response: pb.GetAccessTokenResponse) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    async def get_access_token(
        request: pb.GetAccessTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAccessTokenResponse:
        return response

    # Registered the way the generated add_CredentialBrokerServicer_to_server registers the
    # broker's methods, so method lookup costs the same as in the broker.
    return {
        "GetAccessToken": grpc.unary_unary_rpc_method_handler(
            get_access_token,
            request_deserializer=pb.GetAccessTokenRequest.FromString,
            response_serializer=pb.GetAccessTokenResponse.SerializeToString,
        )
    }


async def _serve(conn: Connection, response_bytes: bytes) -> None:
    response = pb.GetAccessTokenResponse.FromString(response_bytes)
    server = grpc.aio.server()
    handlers = _handlers(response)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # Not in grpc-stubs yet; grpcio has had it since 1.62.
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    conn.send(port)
    await stop.wait()
    await server.stop(0)


def serve(conn: Connection, response_bytes: bytes) -> None:
    """Process entry point: send the port through ``conn``, serve until SIGTERM."""
    try:
        import uvloop

        uvloop.install()  # the broker installs it too (broker serve): same loop, fair floor
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(conn, response_bytes))
