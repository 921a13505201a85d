"""Request bodies: read only once the call is admitted; those that do not decode answered
INVALID_ARGUMENT, with one rate-limited log line and no traceback.

For a unary method grpc.aio receives the body and calls the ``request_deserializer`` before
any handler code runs: every unauthenticated body would be read whole and parsed. The
broker's methods are therefore served as request-streaming handlers (the wire format is the
same) and the guard ``receive``s the one request only after authentication and permission;
a refused call's body is never read from the transport, let alone parsed.

If the deserializer raises (garbage bytes, invalid UTF-8 in a string field, a truncated
message, nesting past protobuf's recursion limit), gRPC answers UNKNOWN with the exception
text and logs a traceback for every such request. ``tolerant`` wraps the deserializer so a
failure becomes an ``Undecodable`` value instead, which the guard ``reject``s.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import grpc

from broker.server.status import plain_status

log = logging.getLogger("broker.server")

# At most one log line per interval, however many undecodable requests arrive.
LOG_INTERVAL_SECONDS = 60.0


class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


class Missing:
    """Stands in for a request that never arrived: gRPC refused a body over
    ``server.max_receive_bytes`` (it has already answered RESOURCE_EXHAUSTED), or the client
    half-closed without sending one, which no gRPC client does for a unary method."""

    __slots__ = ()


MISSING = Missing()
# What context.read() returns at the end of the requests (not in grpc-stubs).
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


async def receive(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """The call's request message (or ``Undecodable``, or ``MISSING``), read from the
    transport now; a second message, which no unary client sends, is never read."""
    request = await context.read()
    return MISSING if request is _EOF else request


def too_large(method: str) -> grpc.Status:
    """The status of a call whose request did not arrive (see ``Missing``)."""
    return plain_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"no {method} request message arrived: a body over the broker's limit "
        "(server.max_receive_bytes) is refused unread",
        reason="REQUEST_TOO_LARGE",
    )


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, RecursionError, UnicodeDecodeError, ...
            # The exception text can quote the input; only its class is kept.
            return Undecodable(type(exc).__name__)

    return decode


class _RateLimitedLog:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def note(self, method: str, problem: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        log.warning(
            "undecodable request body for %s (%s); answered INVALID_ARGUMENT "
            "(%d more since the last such line)",
            method,
            problem,
            self.suppressed,
        )
        self.suppressed = 0
        self.next_at = now + self.interval


_log = _RateLimitedLog(LOG_INTERVAL_SECONDS)


async def reject(
    request: Undecodable, method: str, context: grpc.aio.ServicerContext[Any, Any]
) -> None:
    """Abort the call with INVALID_ARGUMENT (reason INVALID_ARGUMENT)."""
    await cast(Any, context).abort_with_status(refusal(request, method))


def refusal(request: Undecodable, method: str) -> grpc.Status:
    """The INVALID_ARGUMENT status for an undecodable request (logged, rate-limited); for
    server-streaming calls, which end with a status set on the context rather than an abort."""
    _log.note(method, request.problem)
    return plain_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request body is not a valid {method} request message",
        reason="INVALID_ARGUMENT",
    )


def guard(handler: Any) -> Any:
    """The same unary-request handler, rejecting undecodable bodies before it runs (for the
    open services, health, which have no authentication step to wait for)."""
    if handler is None or handler.request_streaming:
        return handler
    kwargs = {
        "request_deserializer": tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:
        streaming = handler.unary_stream
        if inspect.isasyncgenfunction(streaming):

            async def generate(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    await reject(request, "health", context)
                async for response in streaming(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(generate, **kwargs)

        # A coroutine that answers through context.write (grpc's health Watch).
        async def write(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Undecodable):
                await reject(request, "health", context)
            return await streaming(request, context)

        return grpc.unary_stream_rpc_method_handler(write, **kwargs)
    behaviour = handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await reject(request, "health", context)
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


class UndecodableInStream(Exception):
    """A request of a client stream did not decode (see ``screened``)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


async def screened(requests: Any) -> Any:
    """A client stream's requests, stopping at the first one that did not decode: the
    servicer reading it never sees an ``Undecodable``, and the caller ends the call cleanly."""
    async for request in requests:
        if isinstance(request, Undecodable):
            raise UndecodableInStream(request.problem)
        yield request


def end_stream(problem: str, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """End a bidirectional stream with INVALID_ARGUMENT (set, not abort: see the interceptor)."""
    _log.note(method, problem)
    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
    context.set_details("the request body could not be decoded as the method's request message")
