"""A client stub for a broker the test started itself (an in-process one, or a process)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc


@contextlib.asynccontextmanager
async def broker_stub(
    port: int, host: str = "127.0.0.1"
) -> AsyncIterator[pb_grpc.CredentialBrokerAsyncStub]:
    """A plaintext channel to ``host:port`` for the length of the block, and its stub."""
    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        yield pb_grpc.CredentialBrokerStub(channel)
