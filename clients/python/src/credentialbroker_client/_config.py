"""What the sync and async clients share: credentials, retry policy, per-call metadata."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor

from credentialbroker_client._proto.credentialbroker.v1 import broker_pb2
from credentialbroker_client.errors import BrokerError, from_call

SERVICE = broker_pb2.DESCRIPTOR.services_by_name["CredentialBroker"]
GRANT_HEADER = "x-broker-grant"
REQUEST_ID_HEADER = "x-request-id"
DEFAULT_TIMEOUT = 30.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, repr=False)
class Tls:
    """TLS to the broker; with ``certificate_chain`` and ``private_key`` it is mTLS (the
    certificate's SAN is the caller's identity, no bearer token needed)."""

    root_certificates: bytes | None = None  # PEM; None: the system's roots
    certificate_chain: bytes | None = None  # PEM client certificate (mTLS)
    private_key: bytes | None = None  # PEM key of the client certificate
    server_name: str | None = None  # expected name in the broker's certificate, if not the host

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> Tls:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(read(ca), read(cert), read(key), server_name)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("Tls: give certificate_chain and private_key together (mTLS)")

    def __repr__(self) -> str:  # never print a private key
        return f"Tls(mtls={self.certificate_chain is not None}, server_name={self.server_name!r})"

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass(frozen=True)
class Retry:
    """Retries of UNAVAILABLE only, always inside the call's deadline.

    The wait is the broker's RetryInfo delay when it sends one, else exponential backoff with
    full jitter. A retry that could not start before the deadline is not made: the last
    UNAVAILABLE error is raised instead of a DEADLINE_EXCEEDED that would hide its cause.
    """

    attempts: int = 5  # in total, the first one included; 1 disables retries
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be at least 1")

    def delay(self, error: BrokerError, attempt: int, remaining: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None when it must not be made."""
        if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.attempts:
            return None
        if error.retry_delay is not None:
            wait = error.retry_delay
        else:
            ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
            wait = random.uniform(0, ceiling)
        if remaining is not None and wait >= remaining:
            return None
        return wait


NO_RETRY = Retry(attempts=1)


def check_target(target: str, tls: Tls | None, allow_insecure: bool) -> None:
    """Plaintext only to loopback (or a Unix socket) unless asked for, as the broker itself does:
    bearer tokens and access tokens would otherwise cross the network in clear."""
    if tls is not None or allow_insecure or target.startswith("unix:"):
        return
    address = target.split("///", 1)[-1]
    host = address.rpartition(":")[0] if address.count(":") == 1 or "]" in address else address
    if host not in _LOOPBACK and not host.startswith("127."):
        raise ValueError(
            f"{target} is not a loopback address: pass tls=Tls(...), or allow_insecure=True "
            "behind a mesh that encrypts"
        )


def method(name: str) -> descriptor.MethodDescriptor:
    found = SERVICE.methods_by_name.get(name)
    if found is None:
        known = ", ".join(sorted(SERVICE.methods_by_name))
        raise ValueError(f"{SERVICE.full_name} has no RPC {name!r} (known: {known})")
    return found


@dataclass(frozen=True, repr=False)
class Identity:
    """Per-client credentials sent as metadata on every call."""

    token: str | None = None
    grant: str | None = None

    def __repr__(self) -> str:  # tokens stay out of reprs and logs
        token, grant = ("***" if value else None for value in (self.token, self.grant))
        return f"Identity(token={token}, grant={grant})"

    def metadata(
        self,
        request_id: str | None,
        grant: str | None = None,
        extra: Sequence[tuple[str, str]] = (),
    ) -> tuple[Metadata, str]:
        request_id = request_id or uuid.uuid4().hex
        items: list[tuple[str, str]] = [(REQUEST_ID_HEADER, request_id)]
        if self.token:
            items.append(("authorization", f"Bearer {self.token}"))
        grant = grant if grant is not None else self.grant
        if grant:
            items.append((GRANT_HEADER, grant))
        items.extend(extra)
        return tuple(items), request_id


class Attempts:
    """The retry loop's bookkeeping for one call: deadline, attempt count, the next wait."""

    def __init__(self, retry: Retry, timeout: float | None, request_id: str) -> None:
        self.retry = retry
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.request_id = request_id
        self.attempt = 0

    def remaining(self) -> float | None:
        """The next attempt's gRPC timeout: whatever is left of the call's deadline."""
        self.attempt += 1
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def failed(self, call: Any) -> tuple[BrokerError, float | None]:
        """The error for a failed attempt and the wait before the next one (None: raise)."""
        error = from_call(call)
        if error.request_id is None:
            # Not answered by the broker (connection refused, deadline): still name the call.
            error.request_id = self.request_id
        left = None if self.deadline is None else self.deadline - time.monotonic()
        return error, self.retry.delay(error, self.attempt, left)
