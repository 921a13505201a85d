"""The blocking client (plain ``grpc``): for scripts, WSGI apps and worker threads."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, Unpack, cast

import grpc
from google.protobuf.message import Message

from credentialbroker_client._base import ClientBase
from credentialbroker_client._config import Tls
from credentialbroker_client._proto.credentialbroker.v1 import broker_pb2 as pb
from credentialbroker_client._proxy import ProxyArgs, ProxyResponse, proxy_request, proxy_response
from credentialbroker_client._requests import (
    BeginAuthorizationArgs,
    CallOptions,
    CompleteAuthorizationArgs,
    CreateGrantArgs,
    DisconnectArgs,
    GetAccessTokenArgs,
    GetGrantArgs,
    GetIntegrationArgs,
    ListGrantsArgs,
    ListIntegrationEventsArgs,
    ListIntegrationsArgs,
    RevokeGrantArgs,
    StoreIntegrationArgs,
    WatchIntegrationEventsArgs,
    split,
)
from credentialbroker_client.errors import from_call

R = TypeVar("R", bound=Message)
T = TypeVar("T")


class Stream(Generic[T]):
    """A server-streaming call: iterate it; failures raise the client's exceptions."""

    def __init__(self, call: Any, request_id: str) -> None:
        self._call = call
        self.request_id = request_id

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        try:
            return cast(T, next(self._call))
        except grpc.RpcError as exc:
            error = from_call(cast(Any, exc))
            error.request_id = error.request_id or self.request_id
            raise error from None

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class BrokerClient(ClientBase[grpc.Channel]):
    """Calls the broker and blocks; thread-safe, one per process is plenty.

    Same arguments and methods as ``AsyncBrokerClient``, without ``await``.
    """

    @staticmethod
    def _open(target: str, tls: Tls | None, options: list[tuple[str, Any]]) -> grpc.Channel:
        if tls is not None:
            return grpc.secure_channel(target, tls.credentials(), options)
        return grpc.insecure_channel(target, options)

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- any RPC -----------------------------------------------------------------------------

    def call(
        self, name: str, request: Message | Mapping[str, Any], **options: Unpack[CallOptions]
    ) -> Any:
        """Call unary RPC ``name`` (e.g. "GetAccessToken") with a request message or a mapping
        of its fields, with this client's credentials, deadline, retries and errors."""
        rpc, message, metadata, attempts = self._prepare(name, request, options, stream=False)
        while True:
            try:
                return rpc(message, timeout=attempts.remaining(), metadata=metadata)
            except grpc.RpcError as exc:
                error, wait = attempts.failed(exc)
            if wait is None:
                raise error from None
            time.sleep(wait)

    def stream(
        self, name: str, request: Message | Mapping[str, Any], **options: Unpack[CallOptions]
    ) -> Stream[Any]:
        """The messages of server-streaming RPC ``name``. Not retried (resume from your last
        cursor instead); no deadline unless ``timeout`` is given. Use it in ``with`` (or call
        ``cancel()``) to end the call when you stop reading early."""
        rpc, message, metadata, attempts = self._prepare(name, request, options, stream=True)
        call = rpc(message, timeout=attempts.remaining(), metadata=metadata)
        return Stream(call, attempts.request_id)

    def _pages(self, name: str, items: str, kwargs: Mapping[str, Any]) -> Iterator[Any]:
        """Every item of a paginated List RPC, page after page."""
        fields, options = split(kwargs)
        while True:
            page = self.call(name, fields, **options)
            yield from getattr(page, items)
            if not page.next_page_token:
                return
            fields["page_token"] = page.next_page_token

    def _typed(self, name: str, kwargs: Mapping[str, Any], _: type[R]) -> R:
        fields, options = split(kwargs)
        return cast(R, self.call(name, fields, **options))

    # -- the broker's RPCs -------------------------------------------------------------------

    def proxy(self, **kwargs: Unpack[ProxyArgs]) -> ProxyResponse:
        """Have the broker call the provider's API with the integration's credential (which
        never reaches this process): ``path`` relative to the provider's API base, ``method``
        (GET), ``query``, ``request_headers``, ``body`` or ``json``. The provider's answer
        comes back as it is, errors included (check ``status``): a 429/503 is not raised.
        Only idempotent methods are retried on UNAVAILABLE."""
        fields, options = split(kwargs)
        message = self.call("Proxy", proxy_request(fields), **options)
        return proxy_response(message)

    def get_access_token(self, **kwargs: Unpack[GetAccessTokenArgs]) -> pb.GetAccessTokenResponse:
        """An access token valid for at least ``min_valid_for``, refreshed by the broker if
        needed. Select by ``integration_id`` or ``user_id`` + ``provider`` (+ ``account_id``)."""
        return self._typed("GetAccessToken", kwargs, pb.GetAccessTokenResponse)

    def store_integration(
        self, **kwargs: Unpack[StoreIntegrationArgs]
    ) -> pb.StoreIntegrationResponse:
        return self._typed("StoreIntegration", kwargs, pb.StoreIntegrationResponse)

    def get_integration(self, **kwargs: Unpack[GetIntegrationArgs]) -> pb.GetIntegrationResponse:
        return self._typed("GetIntegration", kwargs, pb.GetIntegrationResponse)

    def list_integrations(
        self, **kwargs: Unpack[ListIntegrationsArgs]
    ) -> pb.ListIntegrationsResponse:
        """One page; ``iter_integrations`` walks them all."""
        return self._typed("ListIntegrations", kwargs, pb.ListIntegrationsResponse)

    def iter_integrations(self, **kwargs: Unpack[ListIntegrationsArgs]) -> Iterator[pb.Integration]:
        return self._pages("ListIntegrations", "integrations", kwargs)

    def create_grant(self, **kwargs: Unpack[CreateGrantArgs]) -> pb.CreateGrantResponse:
        """A run-scoped grant for one user's integrations; its ``grant_token`` is shown once.
        Hand it to the workflow runner, which calls ``with_grant(grant_token)``."""
        return self._typed("CreateGrant", kwargs, pb.CreateGrantResponse)

    def revoke_grant(self, **kwargs: Unpack[RevokeGrantArgs]) -> pb.RevokeGrantResponse:
        return self._typed("RevokeGrant", kwargs, pb.RevokeGrantResponse)

    def get_grant(self, **kwargs: Unpack[GetGrantArgs]) -> pb.GetGrantResponse:
        return self._typed("GetGrant", kwargs, pb.GetGrantResponse)

    def list_grants(self, **kwargs: Unpack[ListGrantsArgs]) -> pb.ListGrantsResponse:
        """One page; ``iter_grants`` walks them all."""
        return self._typed("ListGrants", kwargs, pb.ListGrantsResponse)

    def iter_grants(self, **kwargs: Unpack[ListGrantsArgs]) -> Iterator[pb.Grant]:
        return self._pages("ListGrants", "grants", kwargs)

    def watch_integration_events(
        self, **kwargs: Unpack[WatchIntegrationEventsArgs]
    ) -> Stream[pb.WatchIntegrationEventsResponse]:
        """Events after ``after_event_id``, then live, with heartbeats while idle (each
        response has ``event`` or ``heartbeat``). Not retried: to resume, watch again after the
        last event id seen. No deadline unless ``timeout`` is given."""
        fields, options = split(kwargs)
        return self.stream("WatchIntegrationEvents", fields, **options)

    def list_integration_events(
        self, **kwargs: Unpack[ListIntegrationEventsArgs]
    ) -> pb.ListIntegrationEventsResponse:
        """One page of stored events, oldest first; ``iter_integration_events`` walks them all."""
        return self._typed("ListIntegrationEvents", kwargs, pb.ListIntegrationEventsResponse)

    def iter_integration_events(
        self, **kwargs: Unpack[ListIntegrationEventsArgs]
    ) -> Iterator[pb.IntegrationEvent]:
        return self._pages("ListIntegrationEvents", "events", kwargs)

    def disconnect(self, **kwargs: Unpack[DisconnectArgs]) -> pb.DisconnectResponse:
        return self._typed("Disconnect", kwargs, pb.DisconnectResponse)

    def begin_authorization(
        self, **kwargs: Unpack[BeginAuthorizationArgs]
    ) -> pb.BeginAuthorizationResponse:
        return self._typed("BeginAuthorization", kwargs, pb.BeginAuthorizationResponse)

    def complete_authorization(
        self, **kwargs: Unpack[CompleteAuthorizationArgs]
    ) -> pb.CompleteAuthorizationResponse:
        return self._typed("CompleteAuthorization", kwargs, pb.CompleteAuthorizationResponse)
