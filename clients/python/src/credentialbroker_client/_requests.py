"""Keyword arguments → request messages, driven by the proto descriptors.

Each typed method takes the request's fields as keyword arguments (the ``*Args`` TypedDicts
below) plus the call options. Conversion follows the field's type, so it also works for RPCs
added later: ``timedelta`` or seconds for a Duration, ``datetime`` for a Timestamp, a mapping for
a Struct, an enum value or its name for an enum. A field left out stays unset (for ``optional``
fields such as ``account_id`` that is not the same as an empty string).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Required, TypeAlias, TypedDict

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from credentialbroker_client._config import method
from credentialbroker_client._proto.credentialbroker.v1 import broker_pb2

Status: TypeAlias = "broker_pb2.IntegrationStatus.ValueType | str"
EventType: TypeAlias = "broker_pb2.IntegrationEventType.ValueType | str"


class CallOptions(TypedDict, total=False):
    timeout: float | None  # seconds for the whole call, retries included; None: no deadline
    request_id: str  # sent as x-request-id (generated when absent); errors carry it back
    grant: str  # x-broker-grant for this call, instead of the client's
    headers: Sequence[tuple[str, str]]  # any other metadata


OPTION_NAMES = frozenset(CallOptions.__annotations__)


class _Selector(CallOptions, total=False):
    """integration_id, or user_id + provider (+ account_id when the user has several)."""

    integration_id: str
    user_id: str
    provider: str
    account_id: str


class GetAccessTokenArgs(_Selector, total=False):
    min_valid_for: timedelta | float
    force_refresh: bool
    required_scopes: Sequence[str]


class GetIntegrationArgs(_Selector, total=False):
    pass


class DisconnectArgs(_Selector, total=False):
    reason: str
    skip_provider_revocation: bool


class StoreIntegrationArgs(CallOptions, total=False):
    """OAuth tokens (access_token, refresh_token, ...) or one ``credential`` of another kind,
    e.g. ``credential={"api_key": {"key": ..., "header": "X-Api-Key"}}``."""

    user_id: Required[str]
    provider: Required[str]
    access_token: str
    account_id: str
    refresh_token: str
    token_type: str
    expires_at: datetime
    expires_in_seconds: int
    scopes: Sequence[str]
    metadata: Mapping[str, Any]
    credential: broker_pb2.Credential | Mapping[str, Any]


class ListIntegrationsArgs(CallOptions, total=False):
    user_id: Required[str]
    provider: str
    status: Status
    page_size: int
    page_token: str


class BeginAuthorizationArgs(CallOptions, total=False):
    user_id: Required[str]
    provider: Required[str]
    redirect_uri: Required[str]
    scopes: Sequence[str]
    account_id: str
    metadata: Mapping[str, Any]


class CompleteAuthorizationArgs(CallOptions, total=False):
    state: Required[str]
    code: str
    error: str
    error_description: str
    user_id: str  # the user of the session that received the callback


class CreateGrantArgs(CallOptions, total=False):
    user_id: Required[str]
    providers: Sequence[str]
    integration_ids: Sequence[str]
    ttl: timedelta | float
    run_id: str
    audience: Sequence[str]
    proxy_only: bool  # the runner may call the provider through proxy() but not read a token


class RevokeGrantArgs(CallOptions, total=False):
    """grant_id, or run_id for every grant of a run."""

    grant_id: str
    run_id: str


class GetGrantArgs(CallOptions, total=False):
    grant_id: Required[str]


class ListGrantsArgs(CallOptions, total=False):
    user_id: str
    run_id: str
    include_inactive: bool
    page_size: int
    page_token: str


def split(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], CallOptions]:
    fields = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
    options: CallOptions = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}  # type: ignore[assignment]
    return fields, options


def request_for(name: str, request: Message | Mapping[str, Any]) -> Message:
    """The request message of RPC ``name``, given as a message or as a mapping of its fields."""
    descriptor = method(name).input_type
    if isinstance(request, Message):
        if request.DESCRIPTOR is not descriptor:
            raise TypeError(f"{name} takes {descriptor.name}, not {request.DESCRIPTOR.name}")
        return request
    message_type: type[Message] = getattr(broker_pb2, descriptor.name)
    converted = {}
    for key, value in request.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            raise TypeError(f"{descriptor.name} has no field {key!r}")
        converted[key] = _convert(field.message_type.full_name if field.message_type else "", value)
    return message_type(**converted)


def _convert(message_type: str, value: Any) -> Any:
    if message_type == "google.protobuf.Duration" and not isinstance(value, Message):
        duration = duration_pb2.Duration()
        seconds = value if isinstance(value, timedelta) else timedelta(seconds=value)
        duration.FromTimedelta(seconds)
        return duration
    if message_type == "google.protobuf.Timestamp" and isinstance(value, datetime):
        timestamp = timestamp_pb2.Timestamp()
        timestamp.FromDatetime(value)
        return timestamp
    if message_type == "google.protobuf.Struct" and isinstance(value, Mapping):
        struct = struct_pb2.Struct()
        struct.update(value)
        return struct
    return value


class WatchIntegrationEventsArgs(CallOptions, total=False):
    after_event_id: int  # the cursor: the last event id seen (0: the oldest retained)
    user_id: str
    provider: str
    types: Sequence[EventType]


class ListIntegrationEventsArgs(WatchIntegrationEventsArgs, total=False):
    page_size: int
    page_token: str
