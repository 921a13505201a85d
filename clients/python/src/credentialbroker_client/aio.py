"""The asyncio client (``grpc.aio``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
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


class AsyncStream(Generic[T]):
    """A server-streaming call: iterate it; failures raise the client's exceptions."""

    def __init__(self, call: Any, request_id: str) -> None:
        self._call = call
        self._messages: AsyncIterator[T] = call.__aiter__()
        self.request_id = request_id

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._messages.__anext__()
        except grpc.aio.AioRpcError as exc:
            error = from_call(exc)
            error.request_id = error.request_id or self.request_id
            raise error from None

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


class AsyncBrokerClient(ClientBase[grpc.aio.Channel]):
    """Calls the broker from asyncio code; one client (one channel) per process is plenty.
    Create it inside the event loop that uses it."""

    @staticmethod
    def _open(target: str, tls: Tls | None, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        if tls is not None:
            return grpc.aio.secure_channel(target, tls.credentials(), options)
        return grpc.aio.insecure_channel(target, options)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- any RPC -----------------------------------------------------------------------------

    async def call(
        self, name: str, request: Message | Mapping[str, Any], **options: Unpack[CallOptions]
    ) -> Any:
        """Call unary RPC ``name`` (e.g. "GetAccessToken") with a request message or a mapping
        of its fields, with this client's credentials, deadline, retries and errors."""
        rpc, message, metadata, attempts = self._prepare(name, request, options, stream=False)
        while True:
            try:
                return await rpc(message, timeout=attempts.remaining(), metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                error, wait = attempts.failed(exc)
            if wait is None:
                raise error from None
            await asyncio.sleep(wait)

    def stream(
        self, name: str, request: Message | Mapping[str, Any], **options: Unpack[CallOptions]
    ) -> AsyncStream[Any]:
        """The messages of server-streaming RPC ``name``. Not retried (resume from your last
        cursor instead); no deadline unless ``timeout`` is given. Use it in ``async with`` (or
        call ``cancel()``) to end the call when you stop reading early."""
        rpc, message, metadata, attempts = self._prepare(name, request, options, stream=True)
        call = rpc(message, timeout=attempts.remaining(), metadata=metadata)
        return AsyncStream(call, attempts.request_id)

    async def _pages(self, name: str, items: str, kwargs: Mapping[str, Any]) -> AsyncIterator[Any]:
        """Every item of a paginated List RPC, page after page."""
        fields, options = split(kwargs)
        while True:
            page = await self.call(name, fields, **options)
            for item in getattr(page, items):
                yield item
            if not page.next_page_token:
                return
            fields["page_token"] = page.next_page_token

    async def _typed(self, name: str, kwargs: Mapping[str, Any], _: type[R]) -> R:
        fields, options = split(kwargs)
        return cast(R, await self.call(name, fields, **options))

    # -- the broker's RPCs -------------------------------------------------------------------

    async def proxy(self, **kwargs: Unpack[ProxyArgs]) -> ProxyResponse:
        """Have the broker call the provider's API with the integration's credential (which
        never reaches this process): ``path`` relative to the provider's API base, ``method``
        (GET), ``query``, ``request_headers``, ``body`` or ``json``. The provider's answer
        comes back as it is, errors included (check ``status``): a 429/503 is not raised.
        Only idempotent methods are retried on UNAVAILABLE."""
        fields, options = split(kwargs)
        message = await self.call("Proxy", proxy_request(fields), **options)
        return proxy_response(message)

    async def get_access_token(
        self, **kwargs: Unpack[GetAccessTokenArgs]
    ) -> pb.GetAccessTokenResponse:
        """An access token valid for at least ``min_valid_for``, refreshed by the broker if
        needed. Select by ``integration_id`` or ``user_id`` + ``provider`` (+ ``account_id``)."""
        return await self._typed("GetAccessToken", kwargs, pb.GetAccessTokenResponse)

    async def store_integration(
        self, **kwargs: Unpack[StoreIntegrationArgs]
    ) -> pb.StoreIntegrationResponse:
        return await self._typed("StoreIntegration", kwargs, pb.StoreIntegrationResponse)

    async def get_integration(
        self, **kwargs: Unpack[GetIntegrationArgs]
    ) -> pb.GetIntegrationResponse:
        return await self._typed("GetIntegration", kwargs, pb.GetIntegrationResponse)

    async def list_integrations(
        self, **kwargs: Unpack[ListIntegrationsArgs]
    ) -> pb.ListIntegrationsResponse:
        """One page; ``iter_integrations`` walks them all."""
        return await self._typed("ListIntegrations", kwargs, pb.ListIntegrationsResponse)

    def iter_integrations(
        self, **kwargs: Unpack[ListIntegrationsArgs]
    ) -> AsyncIterator[pb.Integration]:
        return self._pages("ListIntegrations", "integrations", kwargs)

    async def create_grant(self, **kwargs: Unpack[CreateGrantArgs]) -> pb.CreateGrantResponse:
        """A run-scoped grant for one user's integrations; its ``grant_token`` is shown once.
        Hand it to the workflow runner, which calls ``with_grant(grant_token)``."""
        return await self._typed("CreateGrant", kwargs, pb.CreateGrantResponse)

    async def revoke_grant(self, **kwargs: Unpack[RevokeGrantArgs]) -> pb.RevokeGrantResponse:
        return await self._typed("RevokeGrant", kwargs, pb.RevokeGrantResponse)

    async def get_grant(self, **kwargs: Unpack[GetGrantArgs]) -> pb.GetGrantResponse:
        return await self._typed("GetGrant", kwargs, pb.GetGrantResponse)

    async def list_grants(self, **kwargs: Unpack[ListGrantsArgs]) -> pb.ListGrantsResponse:
        """One page; ``iter_grants`` walks them all."""
        return await self._typed("ListGrants", kwargs, pb.ListGrantsResponse)

    def iter_grants(self, **kwargs: Unpack[ListGrantsArgs]) -> AsyncIterator[pb.Grant]:
        return self._pages("ListGrants", "grants", kwargs)

    def watch_integration_events(
        self, **kwargs: Unpack[WatchIntegrationEventsArgs]
    ) -> AsyncStream[pb.WatchIntegrationEventsResponse]:
        """Events after ``after_event_id``, then live, with heartbeats while idle (each
        response has ``event`` or ``heartbeat``). Not retried: to resume, watch again after the
        last event id seen. No deadline unless ``timeout`` is given."""
        fields, options = split(kwargs)
        return self.stream("WatchIntegrationEvents", fields, **options)

    async def list_integration_events(
        self, **kwargs: Unpack[ListIntegrationEventsArgs]
    ) -> pb.ListIntegrationEventsResponse:
        """One page of stored events, oldest first; ``iter_integration_events`` walks them all."""
        return await self._typed("ListIntegrationEvents", kwargs, pb.ListIntegrationEventsResponse)

    def iter_integration_events(
        self, **kwargs: Unpack[ListIntegrationEventsArgs]
    ) -> AsyncIterator[pb.IntegrationEvent]:
        return self._pages("ListIntegrationEvents", "events", kwargs)

    async def disconnect(self, **kwargs: Unpack[DisconnectArgs]) -> pb.DisconnectResponse:
        return await self._typed("Disconnect", kwargs, pb.DisconnectResponse)

    async def begin_authorization(
        self, **kwargs: Unpack[BeginAuthorizationArgs]
    ) -> pb.BeginAuthorizationResponse:
        return await self._typed("BeginAuthorization", kwargs, pb.BeginAuthorizationResponse)

    async def complete_authorization(
        self, **kwargs: Unpack[CompleteAuthorizationArgs]
    ) -> pb.CompleteAuthorizationResponse:
        return await self._typed("CompleteAuthorization", kwargs, pb.CompleteAuthorizationResponse)
