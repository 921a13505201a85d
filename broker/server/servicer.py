"""The CredentialBroker servicer: proto in, domain call, proto out; BrokerError → status."""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import grpc

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.domain.authorization import AuthorizationService
from broker.domain.context import current_call
from broker.domain.events import EventLog
from broker.domain.grants import GrantService
from broker.domain.integrations import IntegrationService
from broker.domain.proxy import ProxyCall, ProxyService
from broker.errors import BrokerError
from broker.model import NewTokens, StoreCommand, TokenRequest
from broker.server import convert
from broker.server.status import RETRY_INFO_KEY, plain_status, retry_info, to_status

log = logging.getLogger("broker.server")
_NO_MIN_VALIDITY = timedelta(0)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def _rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await method(self, request, context)
        except BrokerError as error:
            # grpc-stubs lags grpc.aio: abort_with_status exists but is not declared.
            call = current_call.get()
            await cast(Any, context).abort_with_status(
                to_status(error, call.request_id if call else None)
            )
        except Exception:
            # The traceback stays in the server log; the caller gets an id to quote, never
            # the exception text (it could carry anything).
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (incident %s)", method.__name__, incident)
            await cast(Any, context).abort_with_status(
                plain_status(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")
            )
        raise AssertionError("unreachable")  # pragma: no cover - abort always raises

    return wrapper


class CredentialBrokerServicer(pb_grpc.CredentialBrokerServicer):
    def __init__(
        self,
        service: IntegrationService,
        authorization: AuthorizationService,
        grants: GrantService,
        events: EventLog,
        proxy: ProxyService | None = None,
    ) -> None:
        self.proxy = proxy
        self.service = service
        self.authorization = authorization
        self.grants = grants
        self.events = events

    async def WatchIntegrationEvents(
        self,
        request: pb.WatchIntegrationEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.WatchIntegrationEventsResponse]:
        try:
            watch = self.events.watch(request.after_event_id, convert.event_filter(request))
            # Closed here, not whenever it is collected: closing gives back its stream slot.
            async with contextlib.aclosing(watch):
                async for item in watch:
                    yield convert.watch_item(item, datetime.now(UTC))
        except BrokerError as error:
            # A stream ends with its status (abort from a generator races in gRPC core).
            call = current_call.get()
            status = to_status(error, call.request_id if call else None)
            context.set_code(status.code)
            context.set_details(status.details)
            context.set_trailing_metadata(status.trailing_metadata)
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error in WatchIntegrationEvents (incident %s)", incident)
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(f"internal error (incident {incident})")

    @_rpc
    async def ListIntegrationEvents(
        self,
        request: pb.ListIntegrationEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.ListIntegrationEventsResponse:
        page = await self.events.list(
            request.after_event_id,
            convert.event_filter(request),
            request.page_size,
            request.page_token,
        )
        return pb.ListIntegrationEventsResponse(
            events=[convert.event(e) for e in page.events], next_page_token=page.next_page_token
        )

    @_rpc
    async def StoreIntegration(
        self, request: pb.StoreIntegrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StoreIntegrationResponse:
        expires_at = (
            convert.from_timestamp("expires_at", request.expires_at)
            if request.HasField("expires_at")
            else None
        )
        credential = convert.credential(request)
        command = StoreCommand(
            user_id=request.user_id,
            provider=request.provider,
            account_id=request.account_id,
            tokens=NewTokens(
                access_token=request.access_token,
                refresh_token=request.refresh_token or None,
                token_type=request.token_type or ("" if credential else "Bearer"),
                expires_at=expires_at,
                scopes=tuple(request.scopes),
                refresh_token_expires_at=(
                    convert.from_timestamp(
                        "refresh_token_expires_at", request.refresh_token_expires_at
                    )
                    if request.HasField("refresh_token_expires_at")
                    else None
                ),
            ),
            metadata=convert.struct_to_dict("metadata", request.metadata),
            expires_in_seconds=(
                request.expires_in_seconds if request.HasField("expires_in_seconds") else None
            ),
            credential=credential,
            refresh_token_expires_in_seconds=(
                request.refresh_token_expires_in_seconds
                if request.HasField("refresh_token_expires_in_seconds")
                else None
            ),
        )
        integration, created = await self.service.store(command)
        return pb.StoreIntegrationResponse(
            integration=convert.integration(integration), created=created
        )

    @_rpc
    async def GetAccessToken(
        self, request: pb.GetAccessTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAccessTokenResponse:
        min_valid = (
            convert.from_duration("min_valid_for", request.min_valid_for)
            if request.HasField("min_valid_for")
            else _NO_MIN_VALIDITY
        )
        token = await self.service.get_access_token(
            TokenRequest(
                selector=convert.selector(request),
                min_valid_for=min_valid,
                force_refresh=request.force_refresh,
                required_scopes=tuple(request.required_scopes),
                deadline_seconds=context.time_remaining(),
            )
        )
        expires_at = token.expires_at
        response = pb.GetAccessTokenResponse(
            access_token=token.access_token,
            token_type=token.token_type,
            scopes=token.scopes,
            integration_id=token.integration_id,
            refreshed=token.refreshed,
            credential_type=convert.KIND_TO_PB[token.credential_type],
            expires_at=None if expires_at is None else convert.timestamp(expires_at),
        )
        # Map fields item by item: as constructor arguments each map goes through the
        # generic MutableMapping.update, several times slower for these one-entry maps.
        for name, value in token.headers.items():
            response.headers[name] = value
        for name, value in token.query.items():
            response.query[name] = value
        return response

    @_rpc
    async def Disconnect(
        self, request: pb.DisconnectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DisconnectResponse:
        integration, outcome = await self.service.disconnect(
            convert.selector(request), request.reason, request.skip_provider_revocation
        )
        return pb.DisconnectResponse(
            integration=convert.integration(integration),
            revocation=convert.REVOCATION_TO_PB[outcome],
        )

    @_rpc
    async def GetIntegration(
        self, request: pb.GetIntegrationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetIntegrationResponse:
        integration = await self.service.get(convert.selector(request))
        return pb.GetIntegrationResponse(integration=convert.integration(integration))

    @_rpc
    async def ListIntegrations(
        self, request: pb.ListIntegrationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListIntegrationsResponse:
        page = await self.service.list(
            request.user_id,
            request.provider,
            convert.status_filter(request.status),
            request.page_size,
            request.page_token,
        )
        return pb.ListIntegrationsResponse(
            integrations=[convert.integration(i) for i in page.integrations],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def BeginAuthorization(
        self, request: pb.BeginAuthorizationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.BeginAuthorizationResponse:
        result = await self.authorization.begin(
            user_id=request.user_id,
            provider=request.provider,
            redirect_uri=request.redirect_uri,
            scopes=tuple(request.scopes),
            account_id=request.account_id,
            metadata=convert.struct_to_dict("metadata", request.metadata),
        )
        return pb.BeginAuthorizationResponse(
            authorization_url=result.authorization_url,
            state=result.state,
            expires_at=convert.timestamp(result.expires_at),
        )

    @_rpc
    async def CompleteAuthorization(
        self,
        request: pb.CompleteAuthorizationRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.CompleteAuthorizationResponse:
        integration, created = await self.authorization.complete(
            state=request.state,
            code=request.code,
            error=request.error,
            error_description=request.error_description,
            user_id=request.user_id,
        )
        return pb.CompleteAuthorizationResponse(
            integration=convert.integration(integration), created=created
        )

    @_rpc
    async def CreateGrant(
        self, request: pb.CreateGrantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CreateGrantResponse:
        created = await self.grants.create(
            user_id=request.user_id,
            providers=tuple(request.providers),
            integration_ids=tuple(request.integration_ids),
            ttl=convert.duration("ttl", request.ttl) if request.HasField("ttl") else None,
            run_id=request.run_id,
            audience=tuple(request.audience),
            proxy_only=request.proxy_only,
        )
        grant = created.grant
        return pb.CreateGrantResponse(
            grant_token=created.token,
            grant_id=grant.id,
            expires_at=convert.timestamp(grant.expires_at),
            grant=convert.grant(grant, self.grants.clock()),
        )

    @_rpc
    async def RevokeGrant(
        self, request: pb.RevokeGrantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RevokeGrantResponse:
        revoked = await self.grants.revoke(request.grant_id, request.run_id)
        now = self.grants.clock()
        return pb.RevokeGrantResponse(grants=[convert.grant(g, now) for g in revoked])

    @_rpc
    async def GetGrant(
        self, request: pb.GetGrantRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetGrantResponse:
        grant = await self.grants.get(request.grant_id)
        return pb.GetGrantResponse(grant=convert.grant(grant, self.grants.clock()))

    @_rpc
    async def ListGrants(
        self, request: pb.ListGrantsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListGrantsResponse:
        page = await self.grants.list(
            request.user_id,
            request.run_id,
            request.include_inactive,
            request.page_size,
            request.page_token,
        )
        now = self.grants.clock()
        return pb.ListGrantsResponse(
            grants=[convert.grant(g, now) for g in page.grants],
            next_page_token=page.next_page_token,
        )

    @_rpc
    async def Proxy(
        self, request: pb.ProxyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ProxyResponse:
        if self.proxy is None:  # pragma: no cover - every served broker has one
            raise BrokerError("the proxy is not available in this process")
        result = await self.proxy.call(
            ProxyCall(
                selector=convert.selector(request),
                method=request.method,
                path=request.path,
                query=[(q.name, q.value) for q in request.query],
                headers=dict(request.request_headers),
                body=request.body,
                api_host=request.api_host,
                deadline_seconds=context.time_remaining(),
            )
        )
        if result.retry_after is not None:
            # The call itself succeeded (the provider's 429/503 is in the response); its
            # Retry-After also travels as RetryInfo, for clients that look there.
            call = current_call.get()
            trailing: list[tuple[str, str | bytes]] = [
                (RETRY_INFO_KEY, retry_info(result.retry_after))
            ]
            if call is not None:
                trailing.append(("x-request-id", call.request_id))
            context.set_trailing_metadata(tuple(trailing))
        response = pb.ProxyResponse(
            status=result.status, body=result.body, refreshed=result.refreshed
        )
        for name, value in result.headers.items():
            response.headers[name] = value
        return response
