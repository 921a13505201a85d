"""Authentication, per-method permission, the audit event and the access-log line of every
RPC, before and after the servicer runs.

Health stays open; reflection needs any authenticated caller; every CredentialBroker method
needs a caller allowed to call it. Identity comes from a client certificate (mTLS, the SAN
mapped to a configured caller) or from ``authorization: Bearer <token>``. A call's request
body is read from the transport only once the call is admitted (see broker.server.decoding),
so a refused caller cannot make the broker buffer or parse what it sends.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc

from broker import metrics
from broker.domain import ids
from broker.domain.audit import Auditor
from broker.domain.context import Call, Caller, current_call
from broker.domain.grants import GrantService
from broker.errors import AuditUnavailable, BrokerError, PermissionDenied, Unauthenticated
from broker.grant import METADATA_KEY
from broker.server import decoding
from broker.server.callers import CallerRegistry
from broker.server.status import to_status

SERVICE_PREFIX = "/credentialbroker.v1.CredentialBroker/"
_OPEN = ("/grpc.health.v1.Health/",)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

T = TypeVar("T")

access_log = logging.getLogger("broker.access")
log = logging.getLogger("broker.server")


class _Denied(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _headers(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str | None, ...]:
    """(authorization, x-request-id, x-broker-grant): the first of each, in one pass over the
    call's metadata (every call needs all three; the metadata tuple is built per access)."""
    authorization = request_id = grant = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            if authorization is None:
                authorization = _text(value)
        elif key == "x-request-id":
            if request_id is None:
                request_id = _text(value)
        elif key == METADATA_KEY and grant is None:
            grant = _text(value)
    return authorization, request_id, grant


class AuthInterceptor:
    def __init__(
        self,
        registry: CallerRegistry,
        auditor: Auditor | None = None,
        access_level: int = logging.DEBUG,
        grants: GrantService | None = None,
    ) -> None:
        # Replaced as a whole on SIGHUP; a call in flight keeps the registry it started with.
        self.registry = registry
        self.auditor = auditor
        self.access_level = access_level
        self.grants = grants
        self._wrapped: dict[str, Any] = {}
        # Metric children per (method, code): labels() takes a lock, so look each up once.
        self._series: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

    def guard(self, method: str, handler: Any) -> Any:
        """``handler`` (of the full ``method`` name) behind authentication, policy, grants,
        audit and the access log; one wrapper per method, made once."""
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            if method.startswith(_OPEN):
                wrapped = decoding.guard(handler)
            else:
                wrapped = self._guard(handler, method)
            self._wrapped[method] = wrapped
        return wrapped

    def guarding(self, server: grpc.aio.Server) -> GuardedRegistrar:
        """Something to hand the generated ``add_*_to_server`` functions (and health and
        reflection) instead of the server: it registers their handlers already guarded."""
        return GuardedRegistrar(server, self)

    # -- identity --------------------------------------------------------------------------

    def identify(
        self, context: grpc.aio.ServicerContext[Any, Any], header: str | None = None
    ) -> Caller:
        """The caller: its client certificate's identity, else ``header`` (the authorization
        metadata, looked up here when not given)."""
        registry = self.registry
        identities = context.peer_identities()
        if identities:
            names = [i.decode(errors="replace") for i in identities]
            caller = registry.by_certificate(context.auth_context())
            if caller is not None:
                return caller
        if header is None:
            header = _headers(context)[0]
        if header is None:
            if identities:
                raise _Denied(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"client certificate identity {names[0]!r} is not a configured caller",
                )
            raise _Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send metadata 'authorization: Bearer <token>'",
            )
        scheme, _, token = header.partition(" ")
        caller = registry.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            raise _Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid credentials: the bearer token is not one of this broker's callers",
            )
        return caller

    # -- wrapping --------------------------------------------------------------------------

    def _guard(self, handler: Any, method: str) -> Any:
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if not method.startswith(SERVICE_PREFIX):
            return self._guard_other(handler, kwargs)
        kwargs["request_deserializer"] = decoding.tolerant(handler.request_deserializer)
        name = method[len(SERVICE_PREFIX) :]
        if handler.unary_stream is not None:
            return self._guard_stream(handler, name, kwargs)
        behaviour = handler.unary_unary
        auditor = self.auditor
        stage = auditor.stage if auditor is not None else None

        # Request-streaming to gRPC, so that the body is read only after admission
        # (decoding.receive); unary on the wire and to the servicer.
        async def unary(unread: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            authorization, given_id, grant_token = _headers(context)
            try:
                caller = self.identify(context, authorization)
            except _Denied as denied:
                self._access(None, name, denied.code, started, None)
                await context.abort(denied.code, denied.message)
            if not caller.may_call(name):
                # Audited (a known caller tried something outside its policy), though no
                # integration was touched; unauthenticated calls have no caller to record.
                refused = Call(
                    caller, name, _request_id(context, given_id), detail="method refused"
                )
                self._access(caller, name, grpc.StatusCode.PERMISSION_DENIED, started, refused)
                await self._audit_failure(refused, grpc.StatusCode.PERMISSION_DENIED)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"caller {caller.name!r} may not call {name}",
                )
            call = Call(caller, name, _request_id(context, given_id))
            if self.grants is not None and (grant_token is not None or caller.requires_grant):
                await self._admit_grant(call, context, started, grant_token)
            request = await decoding.receive(context)
            if request is decoding.MISSING:
                await self._refuse_missing(call, context, started)
            current_call.set(call)
            if auditor is not None:
                call.journal = stage
                # Counted from here: the group commit holds a batch open for calls on their
                # way to the audit (broker.domain.audit).
                auditor.enter()
            try:
                if isinstance(request, decoding.Undecodable):
                    await decoding.reject(request, name, context)
                response = await behaviour(request, context)
            except BaseException:
                if auditor is not None:
                    auditor.leave()
                # The status has already gone to the client (abort sends it): log first, then
                # the best-effort audit event of the failure.
                code = context.code() or grpc.StatusCode.UNKNOWN
                self._access(caller, name, code, started, call)
                await self._audit_failure(call, code)
                raise
            if auditor is not None:
                auditor.leave()
            # A mutation's event was committed with its change (context.audit_in).
            if auditor is not None and not call.audited:
                try:
                    await auditor.record(call, "OK")
                except Exception as exc:
                    error = (
                        exc
                        if isinstance(exc, BrokerError)
                        else AuditUnavailable(
                            "the audit trail cannot be written, so the broker refuses to answer"
                        )
                    )
                    self._access(caller, name, error.code, started, call)
                    await cast(Any, context).abort_with_status(to_status(error, call.request_id))
            self._access(caller, name, grpc.StatusCode.OK, started, call)
            return response

        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)

    async def _refuse_missing(
        self, call: Call, context: grpc.aio.ServicerContext[Any, Any], started: float
    ) -> None:
        status = self._missing(call, started)
        await self._audit_failure(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
        await cast(Any, context).abort_with_status(status)

    def _missing(self, call: Call, started: float) -> grpc.Status:
        metrics.REQUESTS_TOO_LARGE.labels(call.method).inc()
        self._access(call.caller, call.method, grpc.StatusCode.RESOURCE_EXHAUSTED, started, call)
        return decoding.too_large(call.method)

    def _guard_stream(self, handler: Any, name: str, kwargs: dict[str, Any]) -> Any:
        """Server-streaming methods (WatchIntegrationEvents): the same identity, permission
        and audit as unary calls. A refusal ends the stream with its status; the audit event
        is written when the stream opens (fail closed), the access line when it ends."""
        inner = handler.unary_stream

        # Bidirectional to gRPC for the same reason as unary methods: the one request is
        # read after admission.
        async def stream(unread: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            authorization, given_id, grant_token = _headers(context)
            try:
                caller = self.identify(context, authorization)
            except _Denied as denied:
                self._access(None, name, denied.code, started, None)
                context.set_code(denied.code)
                context.set_details(denied.message)
                return
            if not caller.may_call(name):
                refused = Call(
                    caller, name, _request_id(context, given_id), detail="method refused"
                )
                self._access(caller, name, grpc.StatusCode.PERMISSION_DENIED, started, refused)
                await self._audit_failure(refused, grpc.StatusCode.PERMISSION_DENIED)
                context.set_code(grpc.StatusCode.PERMISSION_DENIED)
                context.set_details(f"caller {caller.name!r} may not call {name}")
                return
            call = Call(caller, name, _request_id(context, given_id))
            if self.grants is not None and (grant_token is not None or caller.requires_grant):
                # As for unary calls: a caller that must present a grant cannot stream
                # without one, and a presented grant is checked (and narrows the call).
                grant_refused = await self._grant_refusal(call, started, grant_token)
                if grant_refused is not None:
                    _end(context, grant_refused)
                    return
            request = await decoding.receive(context)
            if request is decoding.MISSING:
                status = self._missing(call, started)
                await self._audit_failure(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
                _end(context, status)
                return
            current_call.set(call)
            if isinstance(request, decoding.Undecodable):
                self._access(caller, name, grpc.StatusCode.INVALID_ARGUMENT, started, call)
                await self._audit_failure(call, grpc.StatusCode.INVALID_ARGUMENT)
                _end(context, decoding.refusal(request, name))
                return
            if self.auditor is not None:
                try:
                    await self.auditor.record(call, "OK")
                except Exception:
                    error = AuditUnavailable(
                        "the audit trail cannot be written, so the broker refuses to answer"
                    )
                    self._access(caller, name, error.code, started, call)
                    _end(context, to_status(error, call.request_id))
                    return
            try:
                async for item in inner(request, context):
                    yield item
            finally:
                self._access(caller, name, context.code() or grpc.StatusCode.OK, started, call)

        return grpc.stream_stream_rpc_method_handler(stream, **kwargs)

    def _guard_other(self, handler: Any, kwargs: dict[str, Any]) -> Any:
        """Reflection (and anything else not ours): any authenticated caller."""

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            try:
                self.identify(context)
            except _Denied as denied:
                await context.abort(denied.code, denied.message)

        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream
            kwargs["request_deserializer"] = decoding.tolerant(handler.request_deserializer)

            async def stream(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    self.identify(context)
                except _Denied as denied:
                    # End the stream with the status rather than abort(): aborting a
                    # bidirectional stream whose client is still sending races in gRPC core
                    # ("Internal error from Core") instead of delivering UNAUTHENTICATED.
                    context.set_code(denied.code)
                    context.set_details(denied.message)
                    return
                try:
                    async for response in inner(decoding.screened(requests), context):
                        yield response
                except decoding.UndecodableInStream as bad:
                    decoding.end_stream(bad.problem, "reflection", context)

            return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await check(context)
                return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        return handler

    async def _admit_grant(
        self,
        call: Call,
        context: grpc.aio.ServicerContext[Any, Any],
        started: float,
        token: str | None,
    ) -> None:
        """A grant presented (or required): it narrows the call, or the call is refused."""
        refused = await self._grant_refusal(call, started, token)
        if refused is not None:
            await cast(Any, context).abort_with_status(refused)

    async def _grant_refusal(
        self, call: Call, started: float, token: str | None
    ) -> grpc.Status | None:
        """Admit the call's grant (``call.grant``, ``token`` the x-broker-grant metadata), or
        log and audit the refusal and return the status to end the call with."""
        assert self.grants is not None
        if token is None and not call.caller.requires_grant:
            return None
        try:
            grant = await self.grants.admit(call.caller, call.method, token)
        except BrokerError as error:
            call.detail = f"grant refused: {error.reason}"
            call.grant_id = error.metadata.get("grant_id")
            call.run_id = error.metadata.get("run_id") or None
            self._access(call.caller, call.method, error.code, started, call)
            await self._audit_failure(call, error.code)
            return to_status(error, call.request_id)
        call.grant = grant
        call.grant_id = grant.id
        call.run_id = grant.run_id or None
        return None

    # -- the HTTP front (broker.server.http_front) --------------------------------------------

    async def admit_plain(
        self, name: str, authorization: str | None, grant_token: str | None, given_id: str | None
    ) -> Call:
        """The checks a gRPC call of ``name`` passes before its servicer runs, for a request
        that did not come over gRPC (bearer tokens only: the HTTP front has no client
        certificates). Raises BrokerError (audited like the gRPC refusals) when refused."""
        started = time.perf_counter()
        request_id = given_id if given_id and _REQUEST_ID.fullmatch(given_id) else ids.request_id()
        scheme, _, token = (authorization or "").partition(" ")
        caller = self.registry.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            self._access(None, name, grpc.StatusCode.UNAUTHENTICATED, started, None)
            raise Unauthenticated(
                "missing or invalid credentials: send 'X-Broker-Authorization: Bearer <token>' "
                "with one of this broker's caller tokens"
            )
        call = Call(caller, name, request_id)
        if not caller.may_call(name):
            call.detail = "method refused"
            self._access(caller, name, grpc.StatusCode.PERMISSION_DENIED, started, call)
            await self._audit_failure(call, grpc.StatusCode.PERMISSION_DENIED)
            raise PermissionDenied(f"caller {caller.name!r} may not call {name}")
        if self.grants is not None and (grant_token is not None or caller.requires_grant):
            try:
                grant = await self.grants.admit(caller, name, grant_token)
            except BrokerError as error:
                call.detail = f"grant refused: {error.reason}"
                call.grant_id = error.metadata.get("grant_id")
                call.run_id = error.metadata.get("run_id") or None
                self._access(caller, name, error.code, started, call)
                await self._audit_failure(call, error.code)
                raise
            call.grant = grant
            call.grant_id = grant.id
            call.run_id = grant.run_id or None
        return call

    async def run_plain(self, call: Call, behaviour: Callable[[], Awaitable[T]]) -> T:
        """Run an admitted call's work with the gRPC path's audit event and access line."""
        started = time.perf_counter()
        auditor = self.auditor
        current_call.set(call)
        if auditor is not None:
            call.journal = auditor.stage
            auditor.enter()
        try:
            result = await behaviour()
        except BaseException as exc:
            if auditor is not None:
                auditor.leave()
            code = exc.code if isinstance(exc, BrokerError) else grpc.StatusCode.INTERNAL
            self._access(call.caller, call.method, code, started, call)
            await self._audit_failure(call, code)
            raise
        if auditor is not None:
            auditor.leave()
            if not call.audited:
                try:
                    await auditor.record(call, "OK")
                except Exception as exc:
                    error = (
                        exc
                        if isinstance(exc, BrokerError)
                        else AuditUnavailable(
                            "the audit trail cannot be written, so the broker refuses to answer"
                        )
                    )
                    self._access(call.caller, call.method, error.code, started, call)
                    raise error from None
        self._access(call.caller, call.method, grpc.StatusCode.OK, started, call)
        return result

    # -- bookkeeping -----------------------------------------------------------------------

    async def _audit_failure(self, call: Call, code: grpc.StatusCode) -> None:
        if self.auditor is None:
            return
        try:
            await self.auditor.record(call, code.name)
        except Exception:
            # The call already failed; its own error is what the caller must see.
            log.warning("audit event for a failed %s could not be written", call.method)

    def _access(
        self,
        caller: Caller | None,
        method: str,
        code: grpc.StatusCode,
        started: float,
        call: Call | None,
    ) -> None:
        elapsed = time.perf_counter() - started
        key = (method, code)
        series = self._series.get(key)
        if series is None:
            series = (
                metrics.RPCS.labels(method, code.name),
                metrics.RPC_LATENCY.labels(method),
            )
            self._series[key] = series
        series[0].inc()
        series[1].observe(elapsed)
        if not access_log.isEnabledFor(self.access_level):
            return
        access_log.log(
            self.access_level,
            "rpc %s caller=%s code=%s latency_ms=%.2f request_id=%s integration=%s",
            method,
            caller.name if caller else "-",
            code.name,
            (time.perf_counter() - started) * 1000,
            call.request_id if call else "-",
            (call.integration_id if call else None) or "-",
            extra={
                "rpc_method": method,
                "caller": caller.name if caller else None,
                "code": code.name,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                "request_id": call.request_id if call else None,
                "integration_id": call.integration_id if call else None,
            },
        )


def _request_id(context: grpc.aio.ServicerContext[Any, Any], given: str | None) -> str:
    """The caller's x-request-id when it is a sane one, else a fresh id; returned to the
    caller in the trailing metadata either way."""
    request_id = given if given and _REQUEST_ID.fullmatch(given) else ids.request_id()
    context.set_trailing_metadata((("x-request-id", request_id),))
    return request_id


# The methods registered with gRPC by name; every other one is found through the generic
# handlers (the generated code adds both). grpc.aio keeps one task waiting for each registered
# method, and its server loop waits on all of them again after every call, so each registered
# method costs every call: CredentialBroker's 14, Health's 2 and reflection's cost
# 80,000-90,000 instructions of each GetAccessToken, 8 % of it
# (`python -m broker_devtools.bench.hotpath --callgrind`). The generic lookup the others
# take instead costs a few microseconds of their own calls.
REGISTERED = frozenset({f"{SERVICE_PREFIX}GetAccessToken", f"{SERVICE_PREFIX}Proxy"})


class GuardedRegistrar:
    """Stands in for the server while services are added: every handler is wrapped by the
    guard before the server sees it. Wrapping at registration rather than with a grpc.aio
    interceptor spares each call grpc's interceptor chain (a coroutine, a partial and a
    handler lookup per call: about 8 us of CPU per call, measured against the echo floor)."""

    def __init__(self, server: grpc.aio.Server, guard: AuthInterceptor) -> None:
        self.server = server
        self.guard = guard

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(tuple(_Guarded(h, self.guard) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        guarded = {
            name: self.guard.guard(f"/{service}/{name}", handler)
            for name, handler in handlers.items()
            if f"/{service}/{name}" in REGISTERED
        }
        if not guarded:
            return
        # Not in grpc-stubs yet; grpcio has had it since 1.62.
        self.server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]


class _Guarded(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose handlers come out guarded (once per method)."""

    def __init__(self, inner: Any, guard: AuthInterceptor) -> None:
        self.inner = inner
        self.guard = guard

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        return self.guard.guard(handler_call_details.method, handler)


def _end(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    """End a server stream with this status (abort from a generator races in gRPC core)."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
