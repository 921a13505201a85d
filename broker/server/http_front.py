"""The HTTP front of Proxy, for runners in any language: ``ANY /proxy/{provider}/{path}``.

    X-Broker-Authorization: Bearer <caller token>      who calls (required)
    X-Broker-Grant: cbg_...                            the run's grant, when it has one
    X-Broker-User / X-Broker-Account                   whose integration (or X-Broker-Integration)
    X-Broker-Api-Host                                  one of providers.NAME.api_hosts (optional)

The rest of the request (method, path under the provider's API base, query, headers, body)
is the provider request, and the provider's answer comes back as plain HTTP. It is the RPC's
code path after the transport: the same admission (caller, method permission, grant), the same
domain call with its checks and limits, the same audit event and access line. The broker's own
refusals are JSON ``{"code", "reason", "message", "request_id"}`` with an ``X-Broker-Error``
header naming the reason, so a runner tells them from the provider's answers.

HTTP/1.1 over asyncio with h11 (already installed with httpx): no framework, one small loop
per connection. The caller is admitted from the headers before the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import grpc
import h11

from broker.config import ProxySettings
from broker.domain.proxy import ProxyCall, ProxyResult, ProxyService
from broker.errors import BrokerError, InvalidArgument, ProviderUnavailable, ProxyRequestTooLarge
from broker.model import Selector
from broker.server.interceptors import AuthInterceptor

log = logging.getLogger("broker.server")

PREFIX = "/proxy/"
# The broker's headers; never sent on to the provider.
_OWN = "x-broker-"
# Set by HTTP itself or by the client's connection to the broker, not meant for the provider.
_TRANSPORT = frozenset({"host", "content-length", "transfer-encoding", "connection", "expect"})
_IDLE_SECONDS = 30.0
_HEADER_BYTES = 32 * 1024
# The mapping Google APIs use between gRPC codes and HTTP statuses.
_STATUS_FOR_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class HttpFront:
    def __init__(
        self, interceptor: AuthInterceptor, proxy: ProxyService, settings: ProxySettings
    ) -> None:
        self.interceptor = interceptor
        self.proxy = proxy
        self.settings = settings
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        self.server = await asyncio.start_server(
            self._connection, host, port, reuse_port=reuse_port or None
        )
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
            self.server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_HEADER_BYTES)
        try:
            while True:
                event = await self._next(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                await self._exchange(conn, event, reader, writer)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("HTTP front: unexpected error on a connection")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(_IDLE_SECONDS):
                data = await reader.read(64 * 1024)
            conn.receive_data(data)

    async def _exchange(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers]
        own = {k: v for k, v in headers if k.startswith(_OWN)}
        request_id = own.get("x-request-id") or dict(headers).get("x-request-id")
        try:
            call = await self.interceptor.admit_plain(
                "Proxy",
                own.get("x-broker-authorization"),
                own.get("x-broker-grant"),
                request_id,
            )
        except BrokerError as error:
            await self._error(conn, writer, error, request_id)
            return
        try:
            body = await self._body(conn, reader, writer)
            proxy_call = _proxy_call(request, headers, own, body)
        except BrokerError as error:
            # Refused before the proxy ran: audited as the gRPC path audits a bad request.
            with contextlib.suppress(BrokerError):
                await self.interceptor.run_plain(call, _raise(error))
            await self._error(conn, writer, error, call.request_id)
            return
        try:
            result = await self.interceptor.run_plain(call, lambda: self.proxy.call(proxy_call))
        except BrokerError as error:
            await self._error(conn, writer, error, call.request_id)
            return
        await self._answer(conn, writer, result, call.request_id)

    async def _body(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        limit = self.settings.max_request_bytes
        if conn.they_are_waiting_for_100_continue:
            # curl asks before a larger body and would otherwise wait a second for it.
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            await writer.drain()
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next(conn, reader)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise ProxyRequestTooLarge(
                        f"the request body is larger than proxy.max_request_bytes ({limit}); "
                        "nothing was sent",
                        "proxy.max_request_bytes",
                        limit,
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                raise InvalidArgument("body", "the request ended before its body")

    async def _answer(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, result: ProxyResult, rid: str
    ) -> None:
        headers = [(k, v) for k, v in result.headers.items() if k not in _TRANSPORT]
        headers += [("content-length", str(len(result.body))), ("x-request-id", rid)]
        await self._send(conn, writer, result.status, headers, result.body)

    async def _error(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        error: BrokerError,
        request_id: str | None,
    ) -> None:
        body = json.dumps(
            {
                "code": error.code.name,
                "reason": error.reason,
                "message": error.message,
                "metadata": error.metadata,
                "request_id": request_id,
            }
        ).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("x-broker-error", error.reason),
        ]
        if request_id:
            headers.append(("x-request-id", request_id))
        if isinstance(error, ProviderUnavailable):
            headers.append(("retry-after", str(max(1, round(error.retry_after)))))
        if conn.their_state is not h11.DONE:
            # The body was not read: the connection cannot be reused.
            headers.append(("connection", "close"))
        await self._send(conn, writer, _STATUS_FOR_CODE.get(error.code, 500), headers, body)

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        data = conn.send(h11.Response(status_code=status, headers=headers))
        if body:
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        writer.write(data)
        await writer.drain()


def _raise(error: BrokerError) -> Any:
    async def fail() -> None:
        raise error

    return fail


def _proxy_call(
    request: h11.Request, headers: list[tuple[str, str]], own: dict[str, str], body: bytes
) -> ProxyCall:
    target = request.target.decode("latin-1")
    split = urlsplit(target)
    if not split.path.startswith(PREFIX):
        raise InvalidArgument("path", "use /proxy/{provider}/{path under its API base}")
    provider, slash, rest = split.path[len(PREFIX) :].partition("/")
    provider = unquote(provider)
    if not provider:
        raise InvalidArgument("provider", "is required: /proxy/{provider}/{path}")
    integration_id = own.get("x-broker-integration", "")
    account = own.get("x-broker-account")
    selector = Selector(
        integration_id=integration_id,
        user_id="" if integration_id else own.get("x-broker-user", ""),
        provider="" if integration_id else provider,
        account_id=account if account is not None and not integration_id else None,
    )
    passed = {
        name: value
        for name, value in headers
        if not name.startswith(_OWN) and name not in _TRANSPORT and name != "x-request-id"
    }
    return ProxyCall(
        selector=selector,
        method=request.method.decode("latin-1"),
        # The path as the runner wrote it (still percent-encoded): checked by the proxy.
        path="/" + rest if slash or rest else "/",
        query=parse_qsl(split.query, keep_blank_values=True),
        headers=passed,
        body=body,
        api_host=own.get("x-broker-api-host", ""),
        expected_provider=provider if integration_id else "",
    )
