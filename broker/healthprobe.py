"""``broker health``: ask a broker's ``grpc.health.v1.Health`` service whether it is SERVING.

Meant for probes that run a command (Docker HEALTHCHECK, systemd, scripts): it needs no
settings, no key and no database, only the address. Exit 0 only on SERVING.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_ANY = ("0.0.0.0", "[::]", "::", "")  # noqa: S104 - names of "every interface", not a bind


def default_address() -> str:
    """Where this machine's broker listens: BROKER_LISTEN, with "every interface" as loopback."""
    listen = os.environ.get("BROKER_LISTEN", DEFAULT_ADDRESS)
    host, _, port = listen.rpartition(":")
    return f"127.0.0.1:{port}" if host in _ANY else listen


def check(
    address: str, *, service: str = "", timeout: float = 3.0, ca_file: Path | None = None
) -> tuple[bool, str]:
    """(serving, what to print)."""
    if ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read_bytes())
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            return False, f"{address}: no answer ({name})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"
