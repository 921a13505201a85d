"""Every failed call raises one of these; the class says what happened, never a token.

The broker answers errors with a gRPC status carrying a ``google.rpc.ErrorInfo`` (domain
``credentialbroker``); its reason picks the class. A reason this client does not know yet falls
back to the class of the status code, and an unknown code to ``BrokerError``, so a newer broker
never breaks an older client's ``except`` clauses.

    BrokerError                         .code .reason .message .metadata .request_id
    ├── InvalidArgument                 INVALID_ARGUMENT       (metadata["field"] names it)
    │   └── UnknownProvider             UNKNOWN_PROVIDER
    ├── NotFound                        NOT_FOUND
    │   ├── IntegrationNotFound         INTEGRATION_NOT_FOUND
    │   └── GrantNotFound               GRANT_NOT_FOUND
    ├── FailedPrecondition              FAILED_PRECONDITION
    │   ├── AmbiguousIntegration        AMBIGUOUS_INTEGRATION
    │   ├── ReauthorizationRequired     REAUTHORIZATION_REQUIRED (alias NeedsReauthorization)
    │   ├── IntegrationDisconnected     INTEGRATION_DISCONNECTED
    │   ├── InsufficientScope           INSUFFICIENT_SCOPE
    │   ├── ProviderMisconfigured       PROVIDER_MISCONFIGURED
    │   ├── AuthorizationFlowInvalid    AUTHORIZATION_FLOW_INVALID
    │   ├── ProxyNotConfigured          PROXY_NOT_CONFIGURED
    │   └── MinValidityUnattainable     MIN_VALIDITY_UNATTAINABLE
    ├── Unavailable                     UNAVAILABLE (retried; .retry_delay from RetryInfo)
    │   ├── ProviderUnavailable         PROVIDER_UNAVAILABLE
    │   ├── StorageUnavailable          STORAGE_UNAVAILABLE
    │   └── AuditUnavailable            AUDIT_UNAVAILABLE
    ├── DataLoss                        DATA_LOSS
    │   └── CiphertextInvalid           CIPHERTEXT_INVALID
    ├── Unauthenticated                 UNAUTHENTICATED
    │   ├── GrantInvalid                GRANT_INVALID (not a grant token of this broker)
    │   ├── GrantExpired                GRANT_EXPIRED
    │   └── GrantRevoked                GRANT_REVOKED
    ├── PermissionDenied                PERMISSION_DENIED
    │   ├── AuthorizationUserMismatch   AUTHORIZATION_USER_MISMATCH
    │   ├── GrantRequired               GRANT_REQUIRED
    │   ├── GrantScope                  GRANT_SCOPE
    │   ├── GrantAudience               GRANT_AUDIENCE
    │   └── TokenExposureDenied         TOKEN_EXPOSURE_DENIED (proxy-only caller or grant)
    ├── DeadlineExceeded                DEADLINE_EXCEEDED
    ├── Cancelled                       CANCELLED
    ├── ResourceExhausted               RESOURCE_EXHAUSTED (also PROXY_REQUEST_TOO_LARGE,
    │                                   PROXY_RESPONSE_TOO_LARGE, ...)
    └── Internal                        INTERNAL, UNKNOWN (a broker bug: report it)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "credentialbroker"
_DETAILS_KEY = "grpc-status-details-bin"
_REQUEST_ID_KEY = "x-request-id"


class BrokerError(Exception):
    """A call failed. ``reason`` is the ErrorInfo reason (or the code's name without one)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    # The ErrorInfo reason this class stands for; None for the classes of a whole status code.
    REASON: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            # Instance attribute: a fallback class may stand for another code than its own.
            self.code = code
        self.reason = reason or self.REASON or self.code.name
        self.metadata: dict[str, str] = dict(metadata or {})
        self.request_id = request_id
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        text = f"{self.reason}: {self.message}"
        return f"{text} (request_id={self.request_id})" if self.request_id else text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r}, metadata={self.metadata!r}, "
            f"request_id={self.request_id!r})"
        )


class InvalidArgument(BrokerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    REASON = "INVALID_ARGUMENT"


class UnknownProvider(InvalidArgument):
    REASON = "UNKNOWN_PROVIDER"


class NotFound(BrokerError):
    code = grpc.StatusCode.NOT_FOUND


class IntegrationNotFound(NotFound):
    REASON = "INTEGRATION_NOT_FOUND"


class GrantNotFound(NotFound):
    REASON = "GRANT_NOT_FOUND"


class FailedPrecondition(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AmbiguousIntegration(FailedPrecondition):
    REASON = "AMBIGUOUS_INTEGRATION"


class ReauthorizationRequired(FailedPrecondition):
    """The user must authorize again (refresh token rejected, or expired without one)."""

    REASON = "REAUTHORIZATION_REQUIRED"


NeedsReauthorization = ReauthorizationRequired


class IntegrationDisconnected(FailedPrecondition):
    REASON = "INTEGRATION_DISCONNECTED"


class InsufficientScope(FailedPrecondition):
    REASON = "INSUFFICIENT_SCOPE"


class ProviderMisconfigured(FailedPrecondition):
    REASON = "PROVIDER_MISCONFIGURED"


class AuthorizationFlowInvalid(FailedPrecondition):
    REASON = "AUTHORIZATION_FLOW_INVALID"


class ProxyNotConfigured(FailedPrecondition):
    """The provider has no API base for Proxy (providers.NAME.api_base_url)."""

    REASON = "PROXY_NOT_CONFIGURED"


class MinValidityUnattainable(FailedPrecondition):
    REASON = "MIN_VALIDITY_UNATTAINABLE"


class Unavailable(BrokerError):
    """Retried by the client within the deadline; raised once retrying cannot help."""

    code = grpc.StatusCode.UNAVAILABLE


class ProviderUnavailable(Unavailable):
    REASON = "PROVIDER_UNAVAILABLE"


class StorageUnavailable(Unavailable):
    REASON = "STORAGE_UNAVAILABLE"


class AuditUnavailable(Unavailable):
    REASON = "AUDIT_UNAVAILABLE"


class DataLoss(BrokerError):
    code = grpc.StatusCode.DATA_LOSS


class CiphertextInvalid(DataLoss):
    REASON = "CIPHERTEXT_INVALID"


class Unauthenticated(BrokerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    REASON = "UNAUTHENTICATED"


class GrantInvalid(Unauthenticated):
    REASON = "GRANT_INVALID"


class GrantExpired(Unauthenticated):
    REASON = "GRANT_EXPIRED"


class GrantRevoked(Unauthenticated):
    REASON = "GRANT_REVOKED"


class PermissionDenied(BrokerError):
    code = grpc.StatusCode.PERMISSION_DENIED
    REASON = "PERMISSION_DENIED"


class AuthorizationUserMismatch(PermissionDenied):
    REASON = "AUTHORIZATION_USER_MISMATCH"


class GrantRequired(PermissionDenied):
    REASON = "GRANT_REQUIRED"


class GrantScope(PermissionDenied):
    REASON = "GRANT_SCOPE"


class GrantAudience(PermissionDenied):
    REASON = "GRANT_AUDIENCE"


class TokenExposureDenied(PermissionDenied):
    """This caller or grant may only call the provider through ``proxy``, never read a token."""

    REASON = "TOKEN_EXPOSURE_DENIED"


class DeadlineExceeded(BrokerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(BrokerError):
    code = grpc.StatusCode.CANCELLED


class ResourceExhausted(BrokerError):
    """A limit is reached; ``metadata`` names the ``setting`` and its ``limit``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    REASON = "RESOURCE_EXHAUSTED"


class FlowLimit(ResourceExhausted):
    """The caller has as many authorization flows pending as it may."""

    REASON = "FLOW_LIMIT"


class CallerStreamLimit(ResourceExhausted):
    """The caller has as many event streams open on this broker as it may."""

    REASON = "CALLER_STREAM_LIMIT"


class StreamLimit(ResourceExhausted):
    """This broker has as many event streams open as it serves."""

    REASON = "STREAM_LIMIT"


class ProxyRequestTooLarge(ResourceExhausted):
    """The proxied request body is over proxy.max_request_bytes; nothing was sent."""

    REASON = "PROXY_REQUEST_TOO_LARGE"


class ProxyResponseTooLarge(ResourceExhausted):
    """The provider's answer is over proxy.max_response_bytes; it was not returned."""

    REASON = "PROXY_RESPONSE_TOO_LARGE"


class Internal(BrokerError):
    code = grpc.StatusCode.INTERNAL


def _subclasses(cls: type[BrokerError]) -> list[type[BrokerError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


BY_REASON: dict[str, type[BrokerError]] = {
    cls.REASON: cls for cls in _subclasses(BrokerError) if cls.REASON is not None
}
# The class for a status code when the reason is missing or unknown: the shallowest one.
BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {}
for _cls in _subclasses(BrokerError):
    BY_CODE.setdefault(_cls.code, _cls)
BY_CODE[grpc.StatusCode.UNKNOWN] = Internal


class _FailedCall(Protocol):
    """What grpc.RpcError (sync) and grpc.aio.AioRpcError both offer."""

    def code(self) -> grpc.StatusCode: ...
    def details(self) -> str | None: ...
    def trailing_metadata(self) -> Any: ...


def from_call(call: _FailedCall) -> BrokerError:
    """The exception for a failed call: by ErrorInfo reason, else by status code."""
    code = call.code()
    message = call.details() or code.name
    reason: str | None = None
    metadata: Mapping[str, str] = {}
    retry_delay: float | None = None
    request_id: str | None = None
    for key, value in call.trailing_metadata() or ():
        if key == _REQUEST_ID_KEY:
            request_id = value.decode() if isinstance(value, bytes) else str(value)
        elif key == _DETAILS_KEY and isinstance(value, bytes):
            info, retry = _details(value)
            if info is not None and info.domain == DOMAIN:
                reason = info.reason
                metadata = dict(info.metadata)
            if retry is not None:
                retry_delay = retry.retry_delay.ToTimedelta().total_seconds()
    cls = BY_REASON.get(reason or "")
    if cls is None or cls.code != code:
        cls = BY_CODE.get(code, BrokerError)
    return cls(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        request_id=request_id,
        retry_delay=retry_delay,
    )


def _details(
    raw: bytes,
) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.RetryInfo | None]:
    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:  # a garbled trailer must not hide the call's own error
        return None, None
    info: error_details_pb2.ErrorInfo | None = None
    retry: error_details_pb2.RetryInfo | None = None
    for detail in status.details:
        if info is None and detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif retry is None and detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    return info, retry
