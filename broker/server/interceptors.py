"""Authentication and per-method permission, before any servicer code runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc.aio import ServerInterceptor

from broker.server.callers import Caller, CallerRegistry, current_caller

SERVICE_PREFIX = "/credentialbroker.v1.CredentialBroker/"
_OPEN = ("/grpc.health.v1.Health/",)


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> Any:
    async def unary(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    async def streaming(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


def _with_caller(handler: grpc.RpcMethodHandler, caller: Caller) -> Any:
    if handler.unary_unary is None:
        return handler
    behaviour = handler.unary_unary

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        # Set inside the handler's own task, so the servicer and domain see it.
        current_caller.set(caller)
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        call,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(ServerInterceptor):
    """Bearer token → caller; unknown or missing → UNAUTHENTICATED; method not allowed →
    PERMISSION_DENIED. Health stays open; reflection needs any authenticated caller."""

    def __init__(self, registry: CallerRegistry) -> None:
        self.registry = registry

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_OPEN):
            return handler
        header = _metadata_value(handler_call_details.invocation_metadata, "authorization")
        if header is None:
            return _deny(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send metadata 'authorization: Bearer <token>'",
            )
        scheme, _, token = header.partition(" ")
        caller = self.registry.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            return _deny(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid credentials: the bearer token is not one of this broker's callers",
            )
        if method.startswith(SERVICE_PREFIX):
            name = method[len(SERVICE_PREFIX) :]
            if not caller.may_call(name):
                return _deny(
                    handler,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"caller {caller.name!r} may not call {name}",
                )
            return _with_caller(handler, caller)
        return handler
