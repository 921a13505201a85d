"""Inputs that used to reach a bug (INTERNAL or UNKNOWN), on both backends: each is now
INVALID_ARGUMENT naming the field, writes nothing, and leaves no traceback in the log."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from sqlalchemy import func, select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import Broker
from broker.storage.tables import integrations
from tests.helpers.errors import error_info, expect_error
from tests.helpers.integrations import store_request
from tests.helpers.leaks import tracebacks
from tests.helpers.settings import ADMIN
from tests.helpers.wire import nested_struct

Code = grpc.StatusCode
METHOD = "/credentialbroker.v1.CredentialBroker/"


def page_token(*items: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(items)).encode()).decode().rstrip("=")


def deep_page_token(depth: int) -> str:
    return base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).decode()


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(value)
    return result


async def count_integrations(broker: Broker) -> int:
    async with broker.engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(integrations))).scalar() or 0
        )


# Each test below tries all its inputs against one broker: one database per backend, not one
# per input (every PostgreSQL database is dropped again at the end of the session).

DURATIONS = [
    duration_pb2.Duration(seconds=2**63 - 1),
    duration_pb2.Duration(seconds=-(2**63)),
    duration_pb2.Duration(seconds=10**12),
    duration_pb2.Duration(seconds=1, nanos=-(2**31)),
]


async def test_duration_out_of_range(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    stored = await stub.StoreIntegration(store_request(), metadata=ADMIN)
    for duration in DURATIONS:
        await expect_error(
            stub.GetAccessToken(
                pb.GetAccessTokenRequest(
                    integration_id=stored.integration.id, min_valid_for=duration
                ),
                metadata=ADMIN,
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            contains="min_valid_for",
        )


FORGED_TOKENS = [
    deep_page_token(30_000),
    deep_page_token(400),
    page_token("0001-01-01T00:00:00+00:00", "x"),
    page_token("0001-01-01T00:00:00+14:00", "x"),
    page_token("9999-12-31T23:59:59.999999+00:00", "x"),
    page_token("9999-12-31T23:59:59-14:00", "x"),
    page_token("2026-01-01T00:00:00", "x"),  # no time zone
    page_token("2026-01-01T00:00:00+00:00", 5),
    page_token("2026-01-01T00:00:00+00:00", "a\x00b"),
    page_token({"a": 1}, "x"),
    page_token("2026-01-01T00:00:00+00:00"),
    "%%%",
    "A" * 100_000,
]


async def test_page_token_forged(stub: pb_grpc.CredentialBrokerAsyncStub) -> None:
    await stub.StoreIntegration(store_request(), metadata=ADMIN)
    for token in FORGED_TOKENS:
        await expect_error(
            stub.ListIntegrations(
                pb.ListIntegrationsRequest(user_id="user-1", page_token=token), metadata=ADMIN
            ),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            contains="page_token",
        )


BAD_STORES: list[tuple[str, dict[str, Any]]] = [
    ("expires_at", {"expires_at": timestamp_pb2.Timestamp(seconds=-62_135_596_800)}),
    ("expires_at", {"expires_at": timestamp_pb2.Timestamp(seconds=253_402_300_799)}),
    ("expires_at", {"expires_at": timestamp_pb2.Timestamp(seconds=2**62)}),
    ("expires_at", {"expires_at": timestamp_pb2.Timestamp(seconds=0, nanos=-1)}),
    ("expires_in_seconds", {"expires_in_seconds": 2**63 - 1}),
    ("expires_in_seconds", {"expires_in_seconds": -(2**63)}),
    ("metadata", {"metadata": struct({"k": float("nan")})}),
    ("metadata", {"metadata": struct({"k": "x" * 70_000})}),
    ("user_id", {"user_id": "a\x00b"}),
    ("token_type", {"token_type": "Bearer\x00"}),
    ("scopes", {"scopes": ["read\x00"]}),
]


def bad_store(fields: dict[str, Any]) -> pb.StoreIntegrationRequest:
    request = store_request()
    if "expires_at" in fields:
        request.ClearField("expires_in_seconds")
    for name, value in fields.items():
        if name in ("expires_at", "metadata"):
            getattr(request, name).CopyFrom(value)
        elif name == "scopes":
            del request.scopes[:]
            request.scopes.extend(value)
        else:
            setattr(request, name, value)
    return request


async def test_store_rejects_and_writes_nothing(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    for field, fields in BAD_STORES:
        error = await expect_error(
            stub.StoreIntegration(bad_store(fields), metadata=ADMIN),
            Code.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        info = error_info(error)
        assert info is not None
        assert info.metadata["field"] == field, fields
    assert await count_integrations(broker) == 0
    assert not tracebacks(caplog.records)


async def test_nul_in_metadata_is_json_and_round_trips(
    stub: pb_grpc.CredentialBrokerAsyncStub,
) -> None:
    """Metadata is any JSON object; NUL is a legal JSON string character (stored as \\u0000,
    which PostgreSQL's json type takes), unlike in the identifying text fields."""
    metadata = {"k": "a\x00b", "a\x00b": "v"}
    stored = await stub.StoreIntegration(store_request(metadata=struct(metadata)), metadata=ADMIN)
    got = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=stored.integration.id), metadata=ADMIN
    )
    assert dict(got.integration.metadata) == metadata


UNDECODABLE = [
    ("StoreIntegration", b"\x0a\x03\xff\xfe\xfd"),  # invalid UTF-8 in user_id
    ("StoreIntegration", b"\x52" + nested_struct(2000)[:40]),  # truncated metadata
    ("StoreIntegration", b"\x52\x8a\xfa\x01" + nested_struct(4000)[:32010]),
    ("GetAccessToken", b"\xff" * 12),
    ("ListIntegrations", b"garbage that is no protobuf"),
    ("BeginAuthorization", b"\x32\xfa\x3e" + nested_struct(1000)[:8000]),
]


async def test_undecodable_body_is_invalid_argument_after_authentication(
    channel: grpc.aio.Channel, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for method, body in UNDECODABLE:
        call = channel.unary_unary(METHOD + method, None, None)
        # Without credentials the body is not even looked at.
        await expect_error(call(body), Code.UNAUTHENTICATED)
        for _ in range(3):
            error = await expect_error(
                call(body, metadata=ADMIN), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT"
            )
            message = error.details() or ""
            assert "\n" not in message
            assert "Error parsing" not in message, "the protobuf exception text leaked"
    assert await count_integrations(broker) == 0
    assert not tracebacks(caplog.records)
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) <= 1, "the log line for undecodable bodies is not rate-limited"


async def test_undecodable_health_request_is_invalid_argument(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    check = channel.unary_unary("/grpc.health.v1.Health/Check", None, None)
    await expect_error(check(b"\x0a\x02\xc3\x28"), Code.INVALID_ARGUMENT)
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch", None, None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in watch(b"\x0a\x02\xc3\x28"):
            pass
    assert caught.value.code() == Code.INVALID_ARGUMENT
    # A well-formed Watch still streams (the health servicer answers through context.write).
    async for response in watch(b""):
        assert response is not None
        break
    assert not tracebacks(caplog.records)


async def test_undecodable_reflection_request_ends_the_stream_cleanly(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None
    )

    async def garbage() -> Any:
        yield b"\x0a\x02\xc3\x28"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in reflect(garbage(), metadata=ADMIN):
            pass
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert not tracebacks(caplog.records)
