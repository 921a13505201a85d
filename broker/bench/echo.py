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
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc


class EchoServicer(pb_grpc.CredentialBrokerServicer):
    def __init__(self, response: pb.GetAccessTokenResponse) -> None:
        self.response = response

    async def GetAccessToken(  # type: ignore[override]
        self, request: pb.GetAccessTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAccessTokenResponse:
        return self.response


async def _serve(conn: Connection, response_bytes: bytes) -> None:
    response = pb.GetAccessTokenResponse.FromString(response_bytes)
    server = grpc.aio.server()
    pb_grpc.add_CredentialBrokerServicer_to_server(EchoServicer(response), server)
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
