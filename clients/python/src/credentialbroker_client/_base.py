"""The part of a client that does not depend on sync or async gRPC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.message import Message

from credentialbroker_client._config import (
    NO_RETRY,
    Attempts,
    Identity,
    Metadata,
    Retry,
    Tls,
    check_target,
    method,
)
from credentialbroker_client._requests import CallOptions, request_for


class ClientBase:
    def __init__(
        self,
        identity: Identity,
        timeout: float | None,
        retry: Retry,
        stub: Any,
        owns_channel: bool,
    ) -> None:
        self._identity = identity
        self._timeout = timeout
        self._retry = retry
        self._stub = stub
        self._owns_channel = owns_channel

    @staticmethod
    def _channel_options(
        target: str, tls: Tls | None, allow_insecure: bool, options: Sequence[tuple[str, Any]]
    ) -> list[tuple[str, Any]]:
        check_target(target, tls, allow_insecure)
        return [*(tls.options() if tls is not None else []), *options]

    def _prepare(
        self, name: str, request: Message | Mapping[str, Any], options: CallOptions, stream: bool
    ) -> tuple[Any, Message, Metadata, Attempts]:
        """What one call needs: the stub's callable, the request, metadata, retry state."""
        rpc = method(name)
        if rpc.client_streaming:
            raise TypeError(f"{name} is client-streaming, which this client does not offer")
        if rpc.server_streaming != stream:
            use = "stream()" if rpc.server_streaming else "call()"
            raise TypeError(
                f"{name} {'streams' if rpc.server_streaming else 'is unary'}: use {use}"
            )
        message = request_for(name, request)
        metadata, request_id = self._identity.metadata(
            options.get("request_id"), options.get("grant"), options.get("headers", ())
        )
        # Streams (watching for events) have no deadline unless one is asked for.
        default = None if stream else self._timeout
        timeout = options.get("timeout", default)
        attempts = Attempts(self._retry if not stream else NO_RETRY, timeout, request_id)
        return getattr(self._stub, name), message, metadata, attempts
