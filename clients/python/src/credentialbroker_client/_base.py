"""The part of a client that does not depend on sync or async gRPC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Generic, Self, TypeVar

from google.protobuf.message import Message

from credentialbroker_client._config import (
    DEFAULT_TIMEOUT,
    NO_RETRY,
    Attempts,
    Identity,
    Metadata,
    Retry,
    Tls,
    check_target,
    method,
)
from credentialbroker_client._proto.credentialbroker.v1 import broker_pb2_grpc
from credentialbroker_client._proxy import IDEMPOTENT
from credentialbroker_client._requests import CallOptions, request_for

C = TypeVar("C")  # grpc.Channel or grpc.aio.Channel


class ClientBase(Generic[C]):
    _channel: C
    _identity: Identity
    _timeout: float | None
    _retry: Retry
    _stub: Any
    _owns_channel: bool

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: Tls | None = None,
        grant: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
        allow_insecure: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """``token`` is a bearer token; ``tls`` with a client certificate is mTLS. ``grant`` is
        sent as ``x-broker-grant`` on every call. ``timeout`` is each call's default deadline in
        seconds, retries included; ``retry`` says how UNAVAILABLE is retried. Plaintext goes to
        loopback only unless ``allow_insecure``. ``options`` are gRPC channel options."""
        check_target(target, tls, allow_insecure)
        channel_options = [*(tls.options() if tls is not None else []), *options]
        channel = self._open(target, tls, channel_options)
        self._attach(channel, Identity(token, grant), timeout, retry, owns_channel=True)

    @staticmethod
    def _open(target: str, tls: Tls | None, options: list[tuple[str, Any]]) -> C:
        raise NotImplementedError

    def _attach(
        self,
        channel: C,
        identity: Identity,
        timeout: float | None,
        retry: Retry | None,
        owns_channel: bool,
    ) -> None:
        self._channel = channel
        self._identity = identity
        self._timeout = timeout
        self._retry = retry or Retry()
        # The generated stub serves grpc and grpc.aio channels alike.
        self._stub = broker_pb2_grpc.CredentialBrokerStub(channel)  # type: ignore[call-overload]
        self._owns_channel = owns_channel

    @classmethod
    def from_channel(
        cls,
        channel: C,
        *,
        token: str | None = None,
        grant: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
    ) -> Self:
        """A client on a channel you made (and close) yourself."""
        client = cls.__new__(cls)
        client._attach(channel, Identity(token, grant), timeout, retry, owns_channel=False)
        return client

    def with_grant(self, grant: str | None) -> Self:
        """The same client (same channel) presenting ``grant`` as ``x-broker-grant``, e.g. one
        per workflow run; closing it closes nothing."""
        return self.from_channel(
            self._channel,
            token=self._identity.token,
            grant=grant,
            timeout=self._timeout,
            retry=self._retry,
        )

    def _prepare(
        self, name: str, request: Message | Mapping[str, Any], options: CallOptions, stream: bool
    ) -> tuple[Any, Message, Metadata, Attempts]:
        """What one call needs: the stub's callable, the request, metadata, retry state."""
        rpc = method(name)
        if rpc.client_streaming:
            raise TypeError(f"{name} is client-streaming, which this client does not offer")
        if rpc.server_streaming != stream:
            kind = "streams: use stream()" if rpc.server_streaming else "is unary: use call()"
            raise TypeError(f"{name} {kind}")
        message = request_for(name, request)
        metadata, request_id = self._identity.metadata(
            options.get("request_id"), options.get("grant"), options.get("headers", ())
        )
        # Streams (watching for events) have no deadline unless one is asked for.
        default = None if stream else self._timeout
        timeout = options.get("timeout", default)
        retry = self._retry
        if stream or (name == "Proxy" and getattr(message, "method", "GET") not in IDEMPOTENT):
            # A stream resumes from a cursor; a POST that may have reached the provider
            # must not be sent again behind the caller's back.
            retry = NO_RETRY
        attempts = Attempts(retry, timeout, request_id)
        return getattr(self._stub, name), message, metadata, attempts
