"""Proxy (issue 22): the broker calls the provider's API with the integration's credential, so
the token never leaves it. A real broker, a real fake authorization server and a real HTTP API
on loopback that records what reaches it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import h11
import pytest
from google.rpc import error_details_pb2
from sqlalchemy import select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import ProxySettings, Settings
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from broker.storage.tables import audit_events
from broker_devtools.fakeapi import FakeApi, RecordedApiRequest
from tests.helpers.credentials import (
    APP_PUBLIC,
    SA_EMAIL,
    SA_PUBLIC,
    credential,
    minted_credential,
    store_credential,
)
from tests.helpers.errors import error_info, expect_error, retry_info
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.grpcurl import Grpcurl, grpcurl_binary
from tests.helpers.processes import BrokerProcess, free_port, write_toml
from tests.helpers.settings import (
    ADMIN,
    ADMIN_TOKEN,
    ENVIRONMENT,
    KEYS,
    RUNNER_TOKEN,
    make_settings,
)

Code = grpc.StatusCode
PROXY_TOKEN = "proxy-only-runner-token"
PROXY_ONLY = (("authorization", f"Bearer {PROXY_TOKEN}"),)
GET_ONLY_TOKEN = "get-only-runner-token"
GET_ONLY = (("authorization", f"Bearer {GET_ONLY_TOKEN}"),)
RUNNER = (("authorization", f"Bearer {RUNNER_TOKEN}"),)
REQUEST_CAP = 4096
RESPONSE_CAP = 64 * 1024


def _register(server: FakeAuthServer) -> None:
    server.register_service_account(SA_EMAIL, SA_PUBLIC)
    server.register_app("42", APP_PUBLIC, {"1001", "1002"})


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    yield from serve_fake(_register, expires_in=3600, rotate=True)


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer, api: FakeApi) -> Settings:
    return make_settings(
        database_url,
        providers={
            "acme": {
                "token_url": fake.token_url,
                "client_id": fake.client_id,
                "client_secret": fake.client_secret,
                "kinds": [
                    "authorization_code",
                    "client_credentials",
                    "service_account",
                    "github_app_installation",
                ],
                "api_url": fake.api_url,
                "api_base_url": api.url + "/v1",
            },
            "keysonly": {"kinds": ["api_key", "basic"], "api_base_url": api.url + "/k/"},
            "nobase": {"kinds": ["api_key"]},
        },
        callers={
            "runner": {
                "token_sha256": hash_token(RUNNER_TOKEN),
                "methods": ["GetAccessToken", "Proxy"],
                "requires_grant": True,
            },
            "proxyonly": {
                "token_sha256": hash_token(PROXY_TOKEN),
                "methods": ["GetAccessToken", "Proxy"],
                "proxy_only": True,
            },
            "getonly": {
                "token_sha256": hash_token(GET_ONLY_TOKEN),
                "methods": ["Proxy"],
                "proxy_methods": ["GET"],
            },
        },
        proxy={"max_request_bytes": REQUEST_CAP, "max_response_bytes": RESPONSE_CAP},
        refresh={"provider_timeout_seconds": 2, "max_attempts": 2},
    )


def proxy_request(iid: str, method: str = "GET", path: str = "/things", **fields: Any) -> Any:
    return pb.ProxyRequest(integration_id=iid, method=method, path=path, **fields)


async def store_tokens(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, user: str = "user-1"
) -> tuple[str, str, str]:
    access, refresh = fake.issue_grant()
    response = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id=user,
            provider="acme",
            access_token=access,
            refresh_token=refresh,
            expires_in_seconds=3600,
        ),
        metadata=ADMIN,
    )
    return response.integration.id, access, refresh


def bearer(request: RecordedApiRequest) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ")


async def audit_rows(broker: Broker) -> list[Any]:
    async with broker.engine.connect() as conn:
        return list((await conn.execute(select(audit_events))).mappings())


def static_credentials() -> dict[str, tuple[pb.Credential, str, str]]:
    """name: (credential, where the API finds it, the value it finds there)."""
    pair = base64.b64encode(b"robot:pa55word").decode()
    return {
        "api_key_header": (
            credential("api_key", key="sk-header-key", header="X-Api-Key"),
            "header:x-api-key",
            "sk-header-key",
        ),
        "api_key_query": (
            credential("api_key", key="sk-query-key", query_parameter="api_key"),
            "query:api_key",
            "sk-query-key",
        ),
        "basic": (
            credential("basic", username="robot", password="pa55word"),
            "header:authorization",
            f"Basic {pair}",
        ),
    }


def found(request: RecordedApiRequest, where: str) -> str:
    kind, _, name = where.partition(":")
    if kind == "header":
        return request.headers.get(name, "")
    return dict(request.query).get(name, "")


# -- the credential reaches the API, and nothing else does --------------------------------


async def test_every_kind_reaches_the_api_with_its_credential_and_no_token_comes_back(
    broker: Broker,
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    api: FakeApi,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets: list[str] = []
    cases: list[tuple[str, str, str, str]] = []  # (iid, base path, where, value)
    for cred, where, value in static_credentials().values():
        stored = await store_credential(stub, cred, provider="keysonly", user=f"user-{len(cases)}")
        cases.append((stored.id, "/k", where, value))
        secrets.append(value.removeprefix("Basic "))
    iid, access, refresh = await store_tokens(stub, fake)
    cases.append((iid, "/v1", "header:authorization", f"Bearer {access}"))
    secrets += [access, refresh]
    for n, kind in enumerate(("client_credentials", "service_account", "github_app_installation")):
        stored = await store_credential(stub, minted_credential(kind, fake), user=f"minted-{n}")
        # The minted token is only known once the broker mints it: compared below.
        cases.append((stored.id, "/v1", "header:authorization", ""))

    for iid, prefix, where, value in cases:
        for method, body in (("GET", b""), ("POST", b'{"text": "hello"}')):
            response = await stub.Proxy(
                proxy_request(
                    iid,
                    method,
                    "/things/1",
                    query=[pb.QueryParameter(name="q", value="hidden-query-value")],
                    request_headers={"Content-Type": "application/json", "Connection": "close"},
                    body=body,
                ),
                metadata=ADMIN,
            )
            assert response.status == 200
            assert response.body.startswith(b'{"ok": true')
            assert "set-cookie" not in response.headers
            got = api.requests[-1]
            assert (got.method, got.path) == (method, f"{prefix}/things/1")
            assert ("q", "hidden-query-value") in got.query
            assert got.body == body
            assert "connection" not in got.headers or got.headers["connection"] != "close"
            seen = found(got, where)
            if value:
                assert seen == value
            else:
                token = seen.removeprefix("Bearer ")
                assert token
                assert fake.is_minted_token_active(token)
                secrets.append(token)
            text = repr(response)
            for secret in secrets:
                assert secret not in text
    for row in await audit_rows(broker):
        for secret in [*secrets, "hidden-query-value", "hello"]:
            assert secret not in str(dict(row))
    for record in caplog.records:
        for secret in secrets:
            assert secret not in record.getMessage()


async def test_each_proxied_call_is_audited_with_method_host_path_status_and_sizes(
    broker: Broker, stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    await stub.Proxy(
        proxy_request(
            iid, "POST", "/items", body=b"12345", request_headers={"X-Trace": "t-secret"}
        ),
        metadata=ADMIN,
    )
    rows = [r for r in await audit_rows(broker) if r["method"] == "Proxy"]
    assert len(rows) == 1
    detail = rows[0]["detail"]
    assert detail.startswith("POST 127.0.0.1 /items status=200 sent=5 received=")
    assert rows[0]["integration_id"] == iid
    assert rows[0]["outcome"] == "OK"
    assert "t-secret" not in detail


# -- refresh inside the call ---------------------------------------------------------------


async def test_a_401_refreshes_once_and_replays_once(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, access, _ = await store_tokens(stub, fake)
    # The provider no longer takes the stored token (revoked elsewhere): only newer ones.
    api.accept = lambda request: (
        bearer(request) != access and fake.is_access_token_active(bearer(request))
    )
    response = await stub.Proxy(proxy_request(iid), metadata=ADMIN)
    assert response.status == 200
    assert response.refreshed
    assert fake.refresh_calls == 1
    assert [bearer(r) == access for r in api.requests] == [True, False]
    # The next call uses the refreshed token at once.
    again = await stub.Proxy(proxy_request(iid), metadata=ADMIN)
    assert again.status == 200
    assert not again.refreshed
    assert fake.refresh_calls == 1
    assert len(api.requests) == 3


async def test_a_second_401_is_returned_not_retried(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    api.accept = lambda request: False
    response = await stub.Proxy(proxy_request(iid), metadata=ADMIN)
    assert response.status == 401
    assert fake.refresh_calls == 1
    assert len(api.requests) == 2


async def test_a_static_credential_401_is_returned_without_refresh(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    cred, _, _ = static_credentials()["api_key_header"]
    stored = await store_credential(stub, cred, provider="keysonly")
    api.accept = lambda request: False
    response = await stub.Proxy(proxy_request(stored.id), metadata=ADMIN)
    assert response.status == 401
    assert len(api.requests) == 1
    assert fake.refresh_calls == 0


async def test_an_expired_token_is_refreshed_before_it_is_sent(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    access, refresh = fake.issue_grant()
    stored = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id="user-1",
            provider="acme",
            access_token=access,
            refresh_token=refresh,
            expires_in_seconds=1,
        ),
        metadata=ADMIN,
    )
    response = await stub.Proxy(proxy_request(stored.integration.id), metadata=ADMIN)
    assert response.status == 200
    assert response.refreshed
    assert fake.refresh_calls == 1
    assert bearer(api.requests[0]) != access


async def test_429_comes_back_as_it_is_with_retry_info(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    api.script("/v1/busy", 429, {"Retry-After": "7", "Content-Type": "text/plain"}, b"slow down")
    call = stub.Proxy(proxy_request(iid, path="/busy"), metadata=ADMIN)
    response = await call
    assert response.status == 429
    assert response.body == b"slow down"
    assert response.headers["retry-after"] == "7"
    trailing = dict(await call.trailing_metadata())
    info = error_details_pb2.RetryInfo.FromString(trailing["google.rpc.retryinfo-bin"])
    assert info.retry_delay.seconds == 7
    assert trailing["x-request-id"]


# -- where a request may go ----------------------------------------------------------------

ESCAPES = [
    "https://evil.example/x",
    "//evil.example/x",
    "/..",
    "/../admin",
    "/a/../../admin",
    "/a/./b",
    "/%2e%2e/admin",
    "/%2E%2E/admin",
    "/%252e%252e/admin",
    "/%25252e%25252e/admin",
    "/..%2fadmin",
    "/..;/admin",
    "/@evil.example",
    "/x@evil.example/",
    "/\\evil.example",
    "/%5c..%5cadmin",
    "/a\r\nHost: evil.example",
    "/a%0d%0aHost:%20evil",
    "/a\x00b",
    "/a%00b",
    "/%2f%2fevil.example",
    "/x?admin=1",
    "/x#frag",
    "relative/path",
    "",
]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_every_path_escape_is_refused_and_nothing_is_sent(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    for path in ESCAPES:
        error = await expect_error(
            stub.Proxy(proxy_request(iid, path=path), metadata=ADMIN),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert "path" in (error.details() or ""), path
    assert api.requests == []


async def test_a_redirect_is_returned_not_followed(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    api.script("/v1/moved", 302, {"Location": api.url + "/elsewhere"})
    response = await stub.Proxy(proxy_request(iid, path="/moved"), metadata=ADMIN)
    assert response.status == 302
    assert response.headers["location"] == api.url + "/elsewhere"
    assert [r.path for r in api.requests] == ["/v1/moved"]


async def test_a_provider_without_an_api_base_names_the_setting(
    stub: pb_grpc.CredentialBrokerAsyncStub, api: FakeApi
) -> None:
    stored = await store_credential(
        stub, credential("api_key", key="k", header="X-Key"), provider="nobase"
    )
    await expect_error(
        stub.Proxy(proxy_request(stored.id), metadata=ADMIN),
        Code.FAILED_PRECONDITION,
        "PROXY_NOT_CONFIGURED",
        contains="providers.nobase.api_base_url",
    )


# -- what a caller may send ----------------------------------------------------------------


@pytest.mark.parametrize(
    "header", ["Authorization", "cookie", "Host", "Proxy-Authorization", "X-Api-Key"]
)
async def test_credential_and_routing_headers_are_refused(
    stub: pb_grpc.CredentialBrokerAsyncStub, api: FakeApi, header: str
) -> None:
    cred, _, _ = static_credentials()["api_key_header"]
    stored = await store_credential(stub, cred, provider="keysonly")
    await expect_error(
        stub.Proxy(proxy_request(stored.id, request_headers={header: "mine"}), metadata=ADMIN),
        Code.INVALID_ARGUMENT,
        contains=f"headers.{header.lower()}",
    )
    assert api.requests == []


async def test_the_credential_query_parameter_is_refused(
    stub: pb_grpc.CredentialBrokerAsyncStub, api: FakeApi
) -> None:
    cred, _, _ = static_credentials()["api_key_query"]
    stored = await store_credential(stub, cred, provider="keysonly")
    query = [pb.QueryParameter(name="api_key", value="mine")]
    await expect_error(
        stub.Proxy(proxy_request(stored.id, query=query), metadata=ADMIN),
        Code.INVALID_ARGUMENT,
        contains="query",
    )
    assert api.requests == []


async def test_body_caps_hold_both_ways(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    error = await expect_error(
        stub.Proxy(proxy_request(iid, "POST", body=b"x" * (REQUEST_CAP + 1)), metadata=ADMIN),
        Code.RESOURCE_EXHAUSTED,
        "PROXY_REQUEST_TOO_LARGE",
    )
    assert "proxy.max_request_bytes" in (error.details() or "")
    assert api.requests == []
    exact = await stub.Proxy(proxy_request(iid, "POST", body=b"x" * REQUEST_CAP), metadata=ADMIN)
    assert exact.status == 200
    api.script(
        "/v1/big", 200, {"Content-Type": "application/octet-stream"}, b"y" * (2 * RESPONSE_CAP)
    )
    await expect_error(
        stub.Proxy(proxy_request(iid, path="/big"), metadata=ADMIN),
        Code.RESOURCE_EXHAUSTED,
        "PROXY_RESPONSE_TOO_LARGE",
    )
    api.script("/v1/fits", 200, {}, b"z" * RESPONSE_CAP)
    fits = await stub.Proxy(proxy_request(iid, path="/fits"), metadata=ADMIN)
    assert fits.body == b"z" * RESPONSE_CAP


# -- who may proxy, and who may read tokens ------------------------------------------------


async def test_a_proxy_only_caller_cannot_read_tokens_but_can_proxy(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, access, _ = await store_tokens(stub, fake)
    await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=PROXY_ONLY),
        Code.PERMISSION_DENIED,
        "TOKEN_EXPOSURE_DENIED",
    )
    response = await stub.Proxy(proxy_request(iid), metadata=PROXY_ONLY)
    assert response.status == 200
    assert bearer(api.requests[-1]) == access


async def test_proxy_methods_limit_what_a_caller_sends(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    assert (await stub.Proxy(proxy_request(iid, "GET"), metadata=GET_ONLY)).status == 200
    await expect_error(
        stub.Proxy(proxy_request(iid, "DELETE"), metadata=GET_ONLY), Code.PERMISSION_DENIED
    )
    assert [r.method for r in api.requests] == ["GET"]


async def test_a_proxy_only_grant_lets_its_runner_proxy_but_not_read_the_token(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    other, _, _ = await store_tokens(stub, fake, user="user-2")
    created = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="user-1", providers=["acme"], proxy_only=True),
        metadata=ADMIN,
    )
    assert "GetAccessToken" not in created.grant.methods
    assert "Proxy" in created.grant.methods
    runner = (*RUNNER, ("x-broker-grant", created.grant_token))
    await expect_error(
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=runner),
        Code.PERMISSION_DENIED,
        "TOKEN_EXPOSURE_DENIED",
    )
    assert (await stub.Proxy(proxy_request(iid), metadata=runner)).status == 200
    # The grant's user only, as for GetAccessToken.
    await expect_error(
        stub.Proxy(proxy_request(other), metadata=runner), Code.PERMISSION_DENIED, "GRANT_SCOPE"
    )
    # Without a grant the runner may not proxy at all.
    await expect_error(stub.Proxy(proxy_request(iid), metadata=RUNNER), Code.PERMISSION_DENIED)
    # A plain grant allows both.
    plain = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="user-1", providers=["acme"]), metadata=ADMIN
    )
    runner = (*RUNNER, ("x-broker-grant", plain.grant_token))
    assert (await stub.Proxy(proxy_request(iid), metadata=runner)).status == 200
    await stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=runner)


# -- the HTTP front --------------------------------------------------------------------------


@pytest.fixture
async def front(settings: Settings) -> AsyncIterator[Broker]:
    proxy = {**settings.proxy.model_dump(), "listen": "127.0.0.1:0"}
    running = await start(settings.model_copy(update={"proxy": ProxySettings(**proxy)}))
    yield running
    await running.stop(0)


async def http(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One request written as is (no client-side path normalisation), over a real socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    sent = {"host": f"127.0.0.1:{port}", "content-length": str(len(body)), **(headers or {})}
    data = conn.send(h11.Request(method=method, target=target, headers=list(sent.items())))
    data = (
        (data or b"")
        + (conn.send(h11.Data(data=body)) if body else b"")
        + (conn.send(h11.EndOfMessage()) or b"")
    )
    writer.write(data)
    await writer.drain()
    status, got, chunks = 0, {}, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            got = {k.decode(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    writer.close()
    return status, got, b"".join(chunks)


def admin_headers(**extra: str) -> dict[str, str]:
    return {"x-broker-authorization": f"Bearer {ADMIN_TOKEN}", **extra}


async def test_the_http_front_gives_the_same_answers_as_the_rpc(
    front: Broker, fake: FakeAuthServer, api: FakeApi
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        iid, access, _ = await store_tokens(stub, fake)
        static = await store_credential(
            stub, credential("api_key", key="k1", header="X-Key"), "keysonly"
        )
        nobase = await store_credential(
            stub, credential("api_key", key="k2", header="X-Key"), "nobase"
        )
        api.script("/v1/moved", 302, {"Location": "https://elsewhere.example/"})
        assert front.proxy_port
        selectors = {
            "acme": {"x-broker-user": "user-1"},
            "keysonly": {"x-broker-integration": static.id},
            "nobase": {"x-broker-integration": nobase.id},
        }
        ids = {"acme": iid, "keysonly": static.id, "nobase": nobase.id}
        cases = [
            ("GET", "acme", "/things?x=1", {}, b""),
            ("POST", "acme", "/things", {"content-type": "application/json"}, b"{}"),
            ("GET", "acme", "/moved", {}, b""),
            ("GET", "acme", "/a/../../admin", {}, b""),
            ("GET", "acme", "/%2e%2e/admin", {}, b""),
            ("GET", "acme", "/x", {"authorization": "Bearer mine"}, b""),
            ("POST", "acme", "/x", {}, b"x" * (REQUEST_CAP + 1)),
            ("GET", "nobase", "/x", {}, b""),
            ("GET", "keysonly", "/x", {"x-key": "mine"}, b""),
        ]
        for method, provider, target, headers, body in cases:
            path, _, query = target.partition("?")
            try:
                answer = await stub.Proxy(
                    pb.ProxyRequest(
                        integration_id=ids[provider],
                        method=method,
                        path=path,
                        query=[
                            pb.QueryParameter(name=k, value=v)
                            for k, v in (p.split("=") for p in query.split("&") if p)
                        ],
                        request_headers=headers,
                        body=body,
                    ),
                    metadata=ADMIN,
                )
                rpc: tuple[Any, ...] = ("OK", answer.status, answer.body)
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                rpc = (error.code().name, info.reason if info else None)
            status, got, content = await http(
                front.proxy_port,
                method,
                f"/proxy/{provider}{target}",
                {**admin_headers(**selectors[provider]), **headers},
                body,
            )
            if "x-broker-error" in got:
                document = json.loads(content)
                front_answer: tuple[Any, ...] = (document["code"], document["reason"])
                assert got["x-request-id"] == document["request_id"]
            else:
                front_answer = ("OK", status, content)
                assert "set-cookie" not in got
            assert front_answer == rpc, (method, target)
        assert all(r.headers["authorization"] == f"Bearer {access}" for r in api.requests[:3])


async def test_the_http_front_admits_as_the_rpc_does(
    front: Broker, fake: FakeAuthServer, api: FakeApi
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        _iid, access, _ = await store_tokens(stub, fake)
        created = await stub.CreateGrant(
            pb.CreateGrantRequest(user_id="user-1", providers=["acme"], proxy_only=True),
            metadata=ADMIN,
        )
    port = front.proxy_port
    assert port
    target = "/proxy/acme/me"
    status, got, body = await http(port, "GET", target, {"x-broker-user": "user-1"})
    assert (status, got["x-broker-error"]) == (401, "UNAUTHENTICATED")
    runner = {"x-broker-authorization": f"Bearer {RUNNER_TOKEN}", "x-broker-user": "user-1"}
    status, got, _ = await http(port, "GET", target, runner)
    assert (status, got["x-broker-error"]) == (403, "GRANT_REQUIRED")
    status, got, body = await http(
        port, "GET", target, {**runner, "x-broker-grant": created.grant_token}
    )
    assert status == 200
    assert json.loads(body)["ok"] is True
    status, got, _ = await http(
        port,
        "GET",
        target,
        {**runner, "x-broker-grant": created.grant_token, "x-broker-user": "u2"},
    )
    assert (status, got["x-broker-error"]) == (403, "GRANT_SCOPE")
    get_only = {"x-broker-authorization": f"Bearer {GET_ONLY_TOKEN}", "x-broker-user": "user-1"}
    status, got, _ = await http(port, "DELETE", target, get_only)
    assert (status, got["x-broker-error"]) == (403, "PERMISSION_DENIED")
    assert [r.path for r in api.requests] == ["/v1/me"]
    assert access not in body.decode()
    rows = [r for r in await audit_rows(front) if r["method"] == "Proxy"]
    outcomes = sorted(r["outcome"] for r in rows)
    assert outcomes == ["OK", "PERMISSION_DENIED", "PERMISSION_DENIED", "PERMISSION_DENIED"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_runner_through_grpcurl_as_the_docs_show(
    broker: Broker, stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, access, _ = await store_tokens(stub, fake)
    created = await stub.CreateGrant(
        pb.CreateGrantRequest(user_id="user-1", providers=["acme"], proxy_only=True),
        metadata=ADMIN,
    )
    run = Grpcurl(f"127.0.0.1:{broker.port}", grpcurl_binary())
    body = {
        "user_id": "user-1",
        "provider": "acme",
        "method": "GET",
        "path": "/messages",
        "query": [{"name": "maxResults", "value": "10"}],
    }
    flags = ("-H", f"x-broker-grant: {created.grant_token}")
    got = await run.call("Proxy", body, *flags, token=RUNNER_TOKEN)
    assert got.returncode == 0, got.stderr
    answer = got.json()
    assert answer["status"] == 200
    assert json.loads(base64.b64decode(answer["body"]))["ok"] is True
    assert access not in got.stdout
    assert api.requests[-1].query == [("maxResults", "10")]
    assert api.requests[-1].headers["authorization"] == f"Bearer {access}"
    denied = await run.call("GetAccessToken", {"integration_id": iid}, *flags, token=RUNNER_TOKEN)
    assert denied.returncode != 0
    assert "TOKEN_EXPOSURE_DENIED" in denied.stdout + denied.stderr


def test_body_caps_must_fit_the_grpc_messages_they_ride_in(database_url: str) -> None:
    with pytest.raises(ValueError, match=r"server\.max_receive_bytes"):
        make_settings(database_url, proxy={"max_request_bytes": 1024 * 1024})
    with pytest.raises(ValueError, match=r"server\.max_message_bytes"):
        make_settings(database_url, proxy={"max_response_bytes": 8 * 1024 * 1024})
    raised = make_settings(
        database_url,
        server={"max_message_bytes": 16 * 1024 * 1024},
        proxy={"max_response_bytes": 8 * 1024 * 1024},
    )
    assert raised.proxy.max_response_bytes == 8 * 1024 * 1024


async def test_the_http_front_answers_expect_100_continue_before_the_body(
    front: Broker, fake: FakeAuthServer, api: FakeApi
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        await store_tokens(pb_grpc.CredentialBrokerStub(channel), fake)
    assert front.proxy_port
    reader, writer = await asyncio.open_connection("127.0.0.1", front.proxy_port)
    conn = h11.Connection(h11.CLIENT)
    headers = {
        "host": "broker",
        "content-length": "2048",
        "expect": "100-continue",
        **admin_headers(**{"x-broker-user": "user-1"}),
    }
    writer.write(
        conn.send(
            h11.Request(method="POST", target="/proxy/acme/up", headers=list(headers.items()))
        )
        or b""
    )
    await writer.drain()
    # What curl waits for before it sends a body over 1 KiB.
    first = await asyncio.wait_for(reader.read(65536), 2)
    conn.receive_data(first)
    event = conn.next_event()
    assert isinstance(event, h11.InformationalResponse)
    assert event.status_code == 100
    writer.write(
        (conn.send(h11.Data(data=b"x" * 2048)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
    )
    await writer.drain()
    while not isinstance(event, h11.Response):
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await asyncio.wait_for(reader.read(65536), 5))
    assert event.status_code == 200
    writer.close()
    assert api.requests[-1].body == b"x" * 2048


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_broker_process_serves_the_http_front_to_curl(
    database_url: str, api: FakeApi, tmp_path: Path
) -> None:
    port = free_port()
    config = write_toml(
        tmp_path / "broker.toml",
        {
            "server": {"listen": "127.0.0.1:0", "environment": ENVIRONMENT},
            "database": {"url": database_url},
            "refresh": {"background": False},
            "proxy": {"listen": f"127.0.0.1:{port}"},
            "providers": {"keyed": {"kinds": ["api_key"], "api_base_url": api.url + "/api"}},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
        },
    )
    process = await BrokerProcess(config, {"BROKER_KEYS": KEYS}).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{process.port}") as channel:
            stub = pb_grpc.CredentialBrokerStub(channel)
            await store_credential(
                stub, credential("api_key", key="sk-curl", header="X-Key"), "keyed"
            )
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-i", "--data-binary", "@-",
            "-H", f"X-Broker-Authorization: Bearer {ADMIN_TOKEN}",
            "-H", "X-Broker-User: user-1",
            "-H", "Content-Type: text/plain",
            f"http://127.0.0.1:{port}/proxy/keyed/v2/notes?tag=a",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(curl.communicate(b"n" * 4000), 30)
    finally:
        assert await process.stop() == 0
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["ok"] is True
    assert b"sk-curl" not in out
    got = api.requests[-1]
    assert (got.method, got.path, got.query) == ("POST", "/api/v2/notes", [("tag", "a")])
    assert got.headers["x-key"] == "sk-curl"
    assert got.body == b"n" * 4000
    assert "x-broker-authorization" not in got.headers


async def test_a_retry_after_holds_back_the_providers_next_proxied_calls(
    stub: pb_grpc.CredentialBrokerAsyncStub, fake: FakeAuthServer, api: FakeApi
) -> None:
    iid, _, _ = await store_tokens(stub, fake)
    api.script("/v1/busy", 503, {"Retry-After": "30"}, times=1)
    assert (await stub.Proxy(proxy_request(iid, path="/busy"), metadata=ADMIN)).status == 503
    error = await expect_error(
        stub.Proxy(proxy_request(iid), metadata=ADMIN, timeout=2),
        Code.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
    )
    delay = retry_info(error)
    assert delay is not None
    assert delay.retry_delay.seconds >= 20
    assert len(api.requests) == 1
