"""BrokerError → gRPC status with a ``google.rpc.ErrorInfo`` (and RetryInfo where it helps)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.errors import DOMAIN, BrokerError, ProviderUnavailable


def to_status(error: BrokerError, request_id: str | None = None) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    )
    details = [info]
    if isinstance(error, ProviderUnavailable):
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, int(error.retry_after * 1000)))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    code: int = error.code.value[0]
    status = status_pb2.Status(code=code, message=error.message, details=details)
    result = rpc_status.to_status(status)
    if request_id is None:
        return result
    # Aborting replaces trailing metadata, so the request id has to travel with the status.
    return _WithMetadata(
        result.code, result.details, (*result.trailing_metadata, ("x-request-id", request_id))
    )


def plain_status(code: grpc.StatusCode, message: str, reason: str | None = None) -> grpc.Status:
    details = []
    if reason:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
        details.append(info)
    value: int = code.value[0]
    return rpc_status.to_status(status_pb2.Status(code=value, message=message, details=details))


class _WithMetadata(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


# Trailing metadata of an OK Proxy call whose provider answered 429/503 with Retry-After: the
# serialized google.rpc.RetryInfo (an OK status carries no status details to put it in).
RETRY_INFO_KEY = "google.rpc.retryinfo-bin"


def retry_info(seconds: float) -> bytes:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(0, int(seconds * 1000)))
    data: bytes = error_details_pb2.RetryInfo(retry_delay=delay).SerializeToString()
    return data
