"""Proto ↔ domain conversion. Nothing here decides anything."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.domain.events import Event, EventFilter, EventType, Heartbeat
from broker.errors import InvalidArgument
from broker.grant import Grant
from broker.model import Credential, Integration, Kind, Revocation, Selector, Status

STATUS_TO_PB = {
    Status.CONNECTED: pb.INTEGRATION_STATUS_CONNECTED,
    Status.EXPIRED: pb.INTEGRATION_STATUS_EXPIRED,
    Status.NEEDS_REAUTHORIZATION: pb.INTEGRATION_STATUS_NEEDS_REAUTHORIZATION,
    Status.DISCONNECTED: pb.INTEGRATION_STATUS_DISCONNECTED,
}
STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}
KIND_TO_PB = {
    Kind.AUTHORIZATION_CODE: pb.CREDENTIAL_TYPE_AUTHORIZATION_CODE,
    Kind.API_KEY: pb.CREDENTIAL_TYPE_API_KEY,
    Kind.BASIC: pb.CREDENTIAL_TYPE_BASIC,
    Kind.CLIENT_CREDENTIALS: pb.CREDENTIAL_TYPE_CLIENT_CREDENTIALS,
    Kind.SERVICE_ACCOUNT: pb.CREDENTIAL_TYPE_SERVICE_ACCOUNT,
    Kind.GITHUB_APP_INSTALLATION: pb.CREDENTIAL_TYPE_GITHUB_APP_INSTALLATION,
}
REVOCATION_TO_PB = {
    Revocation.REVOKED: pb.REVOCATION_OUTCOME_REVOKED,
    Revocation.NOT_SUPPORTED: pb.REVOCATION_OUTCOME_NOT_SUPPORTED,
    Revocation.FAILED: pb.REVOCATION_OUTCOME_FAILED,
    Revocation.PENDING: pb.REVOCATION_OUTCOME_PENDING,
    Revocation.SKIPPED: pb.REVOCATION_OUTCOME_SKIPPED,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    # Arithmetic instead of Timestamp.FromDatetime (calendar.timegm and a copy): it runs on
    # every GetAccessToken. A naive value is UTC, as FromDatetime takes it.
    delta = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)) - _EPOCH
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1_000
    )


def from_timestamp(field: str, ts: timestamp_pb2.Timestamp) -> datetime:
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "is not a valid timestamp") from None


def from_duration(field: str, value: duration_pb2.Duration) -> timedelta:
    """A Duration as a timedelta; seconds beyond what timedelta holds (about 2.7 million
    years) are bad input, not a bug."""
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "is not a valid duration") from None


def struct_to_dict(field: str, value: struct_pb2.Struct) -> dict[str, Any]:
    try:
        result = json_format.MessageToDict(value)
    except (ValueError, TypeError, json_format.Error):
        raise InvalidArgument(field, "is not a valid JSON object") from None
    if not isinstance(result, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return result


def dict_to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def integration(value: Integration) -> pb.Integration:
    message = pb.Integration(
        id=value.id,
        user_id=value.user_id,
        provider=value.provider,
        account_id=value.account_id,
        status=STATUS_TO_PB[value.status],
        scopes=value.scopes,
        metadata=dict_to_struct(value.metadata),
        created_at=timestamp(value.created_at),
        updated_at=timestamp(value.updated_at),
        disconnect_reason=value.disconnect_reason or "",
        token_type=value.token_type,
        has_refresh_token=value.has_refresh_token,
        credential_type=KIND_TO_PB[value.credential_type],
    )
    if value.expires_at is not None:
        message.expires_at.CopyFrom(timestamp(value.expires_at))
    if value.last_refreshed_at is not None:
        message.last_refreshed_at.CopyFrom(timestamp(value.last_refreshed_at))
    if value.refresh_token_expires_at is not None:
        message.refresh_token_expires_at.CopyFrom(timestamp(value.refresh_token_expires_at))
    if value.last_used_at is not None:
        message.last_used_at.CopyFrom(timestamp(value.last_used_at))
    if value.disconnected_at is not None:
        message.disconnected_at.CopyFrom(timestamp(value.disconnected_at))
    return message


def selector(request: Any) -> Selector:
    return Selector(
        integration_id=request.integration_id,
        user_id=request.user_id,
        provider=request.provider,
        account_id=request.account_id if request.HasField("account_id") else None,
    )


def status_filter(value: int) -> Status | None:
    if value == pb.INTEGRATION_STATUS_UNSPECIFIED:
        return None
    status = STATUS_FROM_PB.get(pb.IntegrationStatus.ValueType(value))
    if status is None:
        raise InvalidArgument("status", f"unknown status {value}")
    return status


def credential(request: pb.StoreIntegrationRequest) -> Credential | None:
    """The request's credential oneof as a domain Credential (unchecked), or None."""
    if not request.HasField("credential"):
        return None
    which = request.credential.WhichOneof("kind")
    if which is None:
        raise InvalidArgument("credential", "set one of its kinds")
    message = getattr(request.credential, which)
    fields = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return Credential(Kind(which), fields)


def grant(value: Grant, now: datetime) -> pb.Grant:
    if value.revoked_at is not None:
        state = pb.GRANT_STATE_REVOKED
    elif value.expired(now):
        state = pb.GRANT_STATE_EXPIRED
    else:
        state = pb.GRANT_STATE_ACTIVE
    message = pb.Grant(
        id=value.id,
        user_id=value.user_id,
        providers=sorted(value.providers),
        integration_ids=sorted(value.integration_ids),
        audience=sorted(value.audience),
        run_id=value.run_id,
        issuer=value.issuer,
        created_at=timestamp(value.created_at),
        expires_at=timestamp(value.expires_at),
        methods=sorted(value.methods),
        state=state,
    )
    if value.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(value.revoked_at))
    return message


def duration(field: str, value: duration_pb2.Duration) -> timedelta:
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "is not a valid duration") from None


EVENT_TYPE_TO_PB = {
    t: pb.IntegrationEventType.Value(f"INTEGRATION_EVENT_TYPE_{t.value}") for t in EventType
}
EVENT_TYPE_FROM_PB = {v: k for k, v in EVENT_TYPE_TO_PB.items()}


def event_filter(request: Any) -> EventFilter:
    types = []
    for value in request.types:
        found = EVENT_TYPE_FROM_PB.get(value)
        if found is None:
            raise InvalidArgument("types", f"unknown event type {value}")
        types.append(found)
    return EventFilter(user_id=request.user_id, provider=request.provider, types=tuple(types))


def event(value: Event) -> pb.IntegrationEvent:
    message = pb.IntegrationEvent(
        id=value.id,
        occurred_at=timestamp(value.occurred_at),
        integration_id=value.integration_id,
        user_id=value.user_id,
        provider=value.provider,
        account_id=value.account_id,
        type=EVENT_TYPE_TO_PB[value.type],
        reason=value.reason,
        message=value.message,
        message_source=value.message_source,
        failure_count=value.failure_count or 0,
    )
    if value.revocation:
        message.revocation = REVOCATION_TO_PB[Revocation(value.revocation)]
    return message


def watch_item(item: Event | Heartbeat, now: datetime) -> pb.WatchIntegrationEventsResponse:
    if isinstance(item, Event):
        return pb.WatchIntegrationEventsResponse(event=event(item))
    return pb.WatchIntegrationEventsResponse(
        heartbeat=pb.WatchIntegrationEventsResponse.Heartbeat(
            last_event_id=item.last_event_id, sent_at=timestamp(now)
        )
    )
