"""Fuzzing every CredentialBroker RPC, on both backends: INTERNAL and UNKNOWN are for bugs only.

Two kinds of input, each authenticated and not:
- field values: a strategy built from each request message's descriptor (every field, with
  the extremes of its type: NUL and oversized strings, int64 limits, Timestamps and Durations
  far outside their ranges, NaN, nested Structs), mixed with values that reach deeper code
  (configured providers, an existing integration, a real page token);
- raw bytes: arbitrary request bodies sent through a generic channel method (no serializer),
  plus hand-made ones: truncated messages, invalid UTF-8 in a string field, Structs nested
  past protobuf's recursion limit.

Server-streaming RPCs (WatchIntegrationEvents) are read for a few messages (heartbeats come
every 50 ms here) under a short deadline of our own, then cancelled: DEADLINE_EXCEEDED and
CANCELLED from our side are fine, the status the stream ends with otherwise is checked.

Every answer must be a status other than INTERNAL/UNKNOWN, and the broker's log must hold no
traceback. Hypothesis runs derandomized with no example database, so CI sees the same inputs
every time; the broker runs in the test's event loop while hypothesis drives a synchronous
client from a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections import Counter
from typing import Any

import grpc
import hypothesis
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.config import Settings
from broker.server.app import Broker
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.integrations import store_request
from tests.helpers.leaks import tracebacks
from tests.helpers.providers import CALLBACK, acme
from tests.helpers.settings import ADMIN, RUNNER, make_settings
from tests.helpers.wire import field_bytes, nested_struct, varint

FD = pb_descriptor.FieldDescriptor
SERVICE = pb.DESCRIPTOR.services_by_name["CredentialBroker"]
METHODS = [m.name for m in SERVICE.methods]
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

# Examples per RPC: field values and raw bytes.
VALUE_EXAMPLES = 100
RAW_EXAMPLES = 40

# A server stream is read for this many messages, or until this deadline of ours.
STREAM_MESSAGES = 3
STREAM_SECONDS = 2.0

# Mostly authenticated, so most calls get past the interceptor into the servicer and domain.
CREDENTIALS = [
    ADMIN,
    ADMIN,
    ADMIN,
    ADMIN,
    RUNNER,
    (),
    (("authorization", "Bearer not-a-caller"),),
    (("authorization", "Basic " + "x" * 300),),
]


class Target:
    """What the strategies aim at: one stored integration and a page token of its owner."""

    integration_id = ""
    page_token = ""


TARGET = Target()

# -- field values -------------------------------------------------------------------------------

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def _interesting_strings() -> st.SearchStrategy[str]:
    return st.sampled_from(
        [
            "",
            "\x00",
            "a\x00b",
            "user-1",
            "twitter",
            "google",
            "acme",
            "x",
            " ",
            "é" * 200,
            "\U0001f600",
            "a" * 256,
            "b" * 70_000,
            "-" * 1024,
            "read write",
            CALLBACK,
            "https://evil.example/",
            "9999-12-31T23:59:59",
        ]
    )


def _strings(field: FD) -> st.SearchStrategy[str]:
    base: st.SearchStrategy[str] = st.one_of(_interesting_strings(), st.text(max_size=40))
    if field.name in ("integration_id", "page_token"):
        attr = field.name
        base = st.one_of(base, st.just(None).map(lambda _: str(getattr(TARGET, attr))))
    return base


def _scalar(field: FD) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        return st.one_of(
            st.integers(low, high), st.sampled_from([low, high, 0, -1, 1, 3600, 86_401])
        )
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if kind == 1 else 32)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return _strings(field)
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FD.TYPE_ENUM:
        # proto3 enums are open: any int32 travels.
        assert field.enum_type is not None
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for {field.full_name}")


def _templates() -> dict[str, Any]:
    """A valid request per RPC: half the examples start from it and change a few fields, so
    they get past the first check into the domain and storage."""
    return {
        "StoreIntegration": store_request(
            user_id="fuzz-user", access_token="at-fuzz", refresh_token="rt-fuzz"
        ),
        "GetAccessToken": pb.GetAccessTokenRequest(integration_id=TARGET.integration_id),
        "Disconnect": pb.DisconnectRequest(user_id="fuzz-user", provider="google"),
        "GetIntegration": pb.GetIntegrationRequest(integration_id=TARGET.integration_id),
        "ListIntegrations": pb.ListIntegrationsRequest(
            user_id="fuzz-user", page_size=1, page_token=TARGET.page_token
        ),
        "BeginAuthorization": pb.BeginAuthorizationRequest(
            user_id="fuzz-user", provider="acme", redirect_uri=CALLBACK
        ),
        "CompleteAuthorization": pb.CompleteAuthorizationRequest(
            state="s" * 43, code="c", user_id="fuzz-user"
        ),
        "CreateGrant": pb.CreateGrantRequest(user_id="fuzz-user", providers=["google"]),
        "RevokeGrant": pb.RevokeGrantRequest(run_id="fuzz-run"),
        "GetGrant": pb.GetGrantRequest(grant_id="00000000-0000-0000-0000-000000000000"),
        "ListGrants": pb.ListGrantsRequest(user_id="fuzz-user", page_size=1),
        "WatchIntegrationEvents": pb.WatchIntegrationEventsRequest(
            after_event_id=1, user_id="fuzz-user", provider="google"
        ),
        "ListIntegrationEvents": pb.ListIntegrationEventsRequest(user_id="fuzz-user", page_size=1),
    }


def requests(method: pb_descriptor.MethodDescriptor) -> st.SearchStrategy[Any]:
    """Requests for ``method``: from scratch, or a valid one with some fields changed."""
    changes = messages(method.input_type)

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        changed = draw(changes)
        if not draw(st.booleans()):
            return changed
        request = _templates()[method.name]
        request.MergeFrom(changed)
        return request

    return build()


def messages(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of ``descriptor`` with any subset of fields set; nested messages (Struct,
    Value, ListValue) down to a small depth so examples stay small."""
    cls = _message_class(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        strategy = _field(field, depth)
        if strategy is not None:
            fields[field.name] = strategy

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        message = cls()
        for name, strategy in fields.items():
            if draw(st.booleans()):
                _assign(message, descriptor.fields_by_name[name], draw(strategy))
        return message

    return build()


def _field(field: FD, depth: int) -> st.SearchStrategy[Any] | None:
    if field.type == FD.TYPE_MESSAGE:
        if depth >= 3:
            return None
        sub = _submessage(field)
        if sub.GetOptions().map_entry:
            value = sub.fields_by_name["value"]
            inner = _field(value, depth + 1)
            if inner is None:
                return None
            return st.dictionaries(
                st.one_of(st.text(max_size=8), st.just("\x00")), inner, max_size=3
            )
        special = _special(sub)
        single = special if special is not None else messages(sub, depth + 1)
    else:
        single = _scalar(field)
    if field.is_repeated:
        return st.lists(single, max_size=4)
    return single


def _special(descriptor: pb_descriptor.Descriptor) -> st.SearchStrategy[Any] | None:
    """Timestamps and Durations at and beyond the ends of their ranges."""
    if descriptor.full_name not in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return None
    cls = _message_class(descriptor)
    seconds = st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.sampled_from([0, 1, -1, 3600, 86_400, 86_401, 253_402_300_799, -62_135_596_800]),
        st.integers(1_600_000_000, 1_900_000_000),
    )
    nanos = st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1))
    return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, nanos)


def _submessage(field: FD) -> pb_descriptor.Descriptor:
    assert field.message_type is not None
    return field.message_type


def _message_class(descriptor: pb_descriptor.Descriptor) -> Any:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _assign(message: Any, field: FD, value: Any) -> None:
    target = getattr(message, field.name)
    if field.type == FD.TYPE_MESSAGE and _submessage(field).GetOptions().map_entry:
        for key, item in value.items():
            if isinstance(item, pb_message.Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        if field.type == FD.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FD.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


# -- raw bodies ---------------------------------------------------------------------------------


def crafted_bodies() -> list[bytes]:
    valid = store_request(access_token="at-fuzz", refresh_token="rt-fuzz").SerializeToString()
    return [
        b"",
        valid[: len(valid) // 2],  # truncated mid-field
        valid[:-1],
        field_bytes(1, b"\xff\xfe\xfd"),  # field 1 (a string everywhere) with invalid UTF-8
        field_bytes(2, b"\xc3\x28"),
        field_bytes(10, nested_struct(2000)),  # StoreIntegration.metadata
        field_bytes(6, nested_struct(2000)),  # BeginAuthorization.metadata
        b"\xff" * 12,  # an endless varint
        varint(1 << 3 | 2) + varint(2**31),  # a length far past the body
        varint(7 << 3 | 3),  # a start-group that never ends
    ]


def bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), st.sampled_from(crafted_bodies()))


# -- the fixtures -------------------------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, fake: FakeAuthServer) -> Settings:
    """A provider the authorization flow can really start with (the fake server); event
    streams that heartbeat quickly, so reading a few messages of one takes no time."""
    return make_settings(
        database_url,
        providers={"acme": acme(fake)},
        events={"heartbeat_seconds": 0.05, "poll_seconds": 0.05},
    )


class Tally:
    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.bad: list[str] = []
        self.streamed = 0  # messages read from server streams

    def check(self, method: str, what: str, call: Any) -> None:
        try:
            answer = call()
            if isinstance(answer, int):
                self.streamed += answer
            code = grpc.StatusCode.OK
            details = ""
        except grpc.RpcError as error:
            code = error.code()
            details = error.details() or ""
        self.codes[code.name] += 1
        if code in FORBIDDEN:
            self.bad.append(f"{method} {what}: {code.name} {details[:200]}")


async def test_fuzz_every_rpc(
    broker: Broker, caplog: pytest.LogCaptureFixture, backend: str
) -> None:
    caplog.set_level(logging.INFO)
    target = f"127.0.0.1:{broker.port}"
    tally = Tally()

    def run() -> None:
        with grpc.insecure_channel(target) as channel:
            stub_store = channel.unary_unary(
                "/credentialbroker.v1.CredentialBroker/StoreIntegration",
                request_serializer=pb.StoreIntegrationRequest.SerializeToString,
                response_deserializer=pb.StoreIntegrationResponse.FromString,
            )
            stored = stub_store(store_request(user_id="fuzz-user"), metadata=ADMIN, timeout=10)
            TARGET.integration_id = stored.integration.id
            stub_store(store_request(user_id="fuzz-user", provider="google"), metadata=ADMIN)
            created = stored.integration.created_at.ToJsonString()
            TARGET.page_token = (
                base64.urlsafe_b64encode(json.dumps([created, stored.integration.id]).encode())
                .decode()
                .rstrip("=")
            )
            for method in SERVICE.methods:
                fuzz_values(channel, method, tally)
                fuzz_raw(channel, method, tally)

    await asyncio.to_thread(run)
    print(f"\nfuzz [{backend}] {sum(tally.codes.values())} calls: {dict(tally.codes)}")
    assert not tally.bad, "\n".join(tally.bad)
    assert not tracebacks(caplog.records), tracebacks(caplog.records)
    assert sum(tally.codes.values()) >= len(METHODS) * (VALUE_EXAMPLES + RAW_EXAMPLES)
    # The streaming RPC was really read (its valid requests stream), not only refused.
    assert tally.streamed > 0


FUZZ = hypothesis.settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def _caller(
    channel: grpc.Channel,
    method: pb_descriptor.MethodDescriptor,
    serializer: Any = None,
    deserializer: Any = None,
) -> Any:
    """A callable (request, credentials) that raises grpc.RpcError with the call's status.
    A server stream is read for a few messages, then cancelled."""
    path = f"/{SERVICE.full_name}/{method.name}"
    if not method.server_streaming:
        unary = channel.unary_unary(path, serializer, deserializer)
        return lambda request, credentials: unary(request, metadata=credentials, timeout=10)
    stream = channel.unary_stream(path, serializer, deserializer)

    def read(request: Any, credentials: Any) -> int:
        responses: Any = stream(request, metadata=credentials, timeout=STREAM_SECONDS)
        count = 0
        try:
            for _ in responses:
                count += 1
                if count >= STREAM_MESSAGES:
                    break
        finally:
            responses.cancel()
        return count

    return read


def fuzz_values(
    channel: grpc.Channel, method: pb_descriptor.MethodDescriptor, tally: Tally
) -> None:
    call = _caller(
        channel,
        method,
        _message_class(method.input_type).SerializeToString,
        _message_class(method.output_type).FromString,
    )

    @hypothesis.settings(FUZZ, max_examples=VALUE_EXAMPLES)
    @given(request=requests(method), credentials=st.sampled_from(CREDENTIALS))
    def one(request: Any, credentials: Any) -> None:
        tally.check(
            method.name,
            f"{request!r:.300}",
            lambda: call(request, credentials),
        )

    one()


def fuzz_raw(channel: grpc.Channel, method: pb_descriptor.MethodDescriptor, tally: Tally) -> None:
    # No serializer: the bytes go to the server as they are.
    call = _caller(channel, method)

    @hypothesis.settings(FUZZ, max_examples=RAW_EXAMPLES)
    @given(body=bodies(), credentials=st.sampled_from(CREDENTIALS))
    def one(body: bytes, credentials: Any) -> None:
        tally.check(method.name, f"raw {body[:60]!r}", lambda: call(body, credentials))

    one()


def test_strategies_reach_the_extremes() -> None:
    """The value strategy can produce what the bugs were made of (a guard against a strategy
    that silently stops generating them)."""
    field = pb.GetAccessTokenRequest.DESCRIPTOR.fields_by_name["min_valid_for"]
    special = _special(_submessage(field))
    assert special is not None
    seen: list[int] = []

    @hypothesis.settings(derandomize=True, database=None, max_examples=200)
    @given(special)
    def collect(value: Any) -> None:
        seen.append(value.seconds)

    collect()
    assert any(abs(s) > 10**15 for s in seen)
