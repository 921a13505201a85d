"""One error tree for the broker; each class knows its gRPC status code and ErrorInfo reason.

    BrokerError
    ├── InvalidArgument              INVALID_ARGUMENT     INVALID_ARGUMENT
    │   └── UnknownProvider          INVALID_ARGUMENT     UNKNOWN_PROVIDER
    ├── IntegrationNotFound          NOT_FOUND            INTEGRATION_NOT_FOUND
    ├── AmbiguousIntegration         FAILED_PRECONDITION  AMBIGUOUS_INTEGRATION
    ├── ReauthorizationRequired      FAILED_PRECONDITION  REAUTHORIZATION_REQUIRED
    │   └── GrantRejected            (provider said invalid_grant/invalid_scope; the refresh
    │                                 engine re-reads the row before believing it)
    ├── IntegrationDisconnected      FAILED_PRECONDITION  INTEGRATION_DISCONNECTED
    ├── InsufficientScope            FAILED_PRECONDITION  INSUFFICIENT_SCOPE
    ├── ProviderMisconfigured        FAILED_PRECONDITION  PROVIDER_MISCONFIGURED
    ├── ProxyNotConfigured           FAILED_PRECONDITION  PROXY_NOT_CONFIGURED (no API base)
    ├── AuthorizationFlowInvalid     FAILED_PRECONDITION  AUTHORIZATION_FLOW_INVALID
    ├── GrantNotFound                NOT_FOUND            GRANT_NOT_FOUND
    ├── MinValidityUnattainable      FAILED_PRECONDITION  MIN_VALIDITY_UNATTAINABLE
    ├── ProviderUnavailable          UNAVAILABLE          PROVIDER_UNAVAILABLE (+ RetryInfo)
    │   ├── ProviderAskedToWait      (429/503 with Retry-After: for every refresh of it)
    │   ├── ProviderOutcomeUnknown   (sent, no usable answer: the provider may have rotated)
    │   └── Throttled                (the provider's turn would outlast the budget; not sent)
    ├── StorageUnavailable           UNAVAILABLE          STORAGE_UNAVAILABLE
    │   └── AuditUnavailable         UNAVAILABLE          AUDIT_UNAVAILABLE (fail closed)
    ├── ResourceExhausted            RESOURCE_EXHAUSTED   RESOURCE_EXHAUSTED
    │   ├── FlowLimit                RESOURCE_EXHAUSTED   FLOW_LIMIT (pending flows per caller)
    │   ├── CallerStreamLimit        RESOURCE_EXHAUSTED   CALLER_STREAM_LIMIT (watches per caller)
    │   ├── StreamLimit              RESOURCE_EXHAUSTED   STREAM_LIMIT (watches per process)
    │   ├── ProxyRequestTooLarge     RESOURCE_EXHAUSTED   PROXY_REQUEST_TOO_LARGE
    │   └── ProxyResponseTooLarge    RESOURCE_EXHAUSTED   PROXY_RESPONSE_TOO_LARGE
    ├── CiphertextInvalid            DATA_LOSS            CIPHERTEXT_INVALID
    ├── Unauthenticated              UNAUTHENTICATED      UNAUTHENTICATED
    │   ├── GrantInvalid             UNAUTHENTICATED      GRANT_INVALID (not a grant we know)
    │   ├── GrantExpired             UNAUTHENTICATED      GRANT_EXPIRED
    │   └── GrantRevoked             UNAUTHENTICATED      GRANT_REVOKED
    └── PermissionDenied             PERMISSION_DENIED    PERMISSION_DENIED
        ├── GrantRequired            PERMISSION_DENIED    GRANT_REQUIRED
        ├── GrantScope               PERMISSION_DENIED    GRANT_SCOPE
        ├── GrantAudience            PERMISSION_DENIED    GRANT_AUDIENCE
        ├── TokenExposureDenied      PERMISSION_DENIED    TOKEN_EXPOSURE_DENIED (proxy only)
        └── AuthorizationUserMismatch PERMISSION_DENIED   AUTHORIZATION_USER_MISMATCH

    ConfigError                      start-up only: a setting is missing or wrong

Messages are shown to callers: they name fields, ids and providers, never a token or a key.
"""

from __future__ import annotations

import grpc

DOMAIN = "credentialbroker"


class BrokerError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidArgument(BrokerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)
        self.field = field


class UnknownProvider(InvalidArgument):
    reason = "UNKNOWN_PROVIDER"

    def __init__(self, provider: str) -> None:
        super().__init__("provider", f"provider {provider!r} is not configured on this broker")


class IntegrationNotFound(BrokerError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "INTEGRATION_NOT_FOUND"

    @classmethod
    def for_id(cls, integration_id: str) -> IntegrationNotFound:
        """The one answer for an id that names no integration (or one the caller may not see:
        the same words, so the answer tells nothing about other users' rows)."""
        return cls(f"no integration with id {integration_id!r}", integration_id=integration_id)


class AmbiguousIntegration(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "AMBIGUOUS_INTEGRATION"


class ReauthorizationRequired(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "REAUTHORIZATION_REQUIRED"


class GrantRejected(ReauthorizationRequired):
    def __init__(self, message: str, error: str = "invalid_grant", **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.error = error


class IntegrationDisconnected(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "INTEGRATION_DISCONNECTED"


class InsufficientScope(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "INSUFFICIENT_SCOPE"


class ProviderMisconfigured(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "PROVIDER_MISCONFIGURED"


class ProxyNotConfigured(BrokerError):
    """The provider has no API base (providers.NAME.api_base_url): Proxy has nowhere to go."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "PROXY_NOT_CONFIGURED"


class AuthorizationFlowInvalid(BrokerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "AUTHORIZATION_FLOW_INVALID"


class ProviderUnavailable(BrokerError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "PROVIDER_UNAVAILABLE"

    def __init__(self, message: str, retry_after: float = 1.0, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.retry_after = retry_after


class ProviderAskedToWait(ProviderUnavailable):
    """429 or 503 with Retry-After: nothing was processed, and the provider named how long to
    stay away (``retry_after``), for this broker's other refreshes too."""


class ProviderOutcomeUnknown(ProviderUnavailable):
    """The request reached (or may have reached) the provider and no usable answer came back.
    Never re-sent at once: a rotating provider may have used up the refresh token."""


class Throttled(ProviderUnavailable):
    """Waiting for the provider's turn would outlast the refresh's budget; nothing was sent."""


class MinValidityUnattainable(BrokerError):
    """Even a just-issued token lives shorter than the caller's min_valid_for."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MIN_VALIDITY_UNATTAINABLE"


class StorageUnavailable(BrokerError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORAGE_UNAVAILABLE"


class AuditUnavailable(StorageUnavailable):
    """The audit event of a call cannot be written: the call is refused (fail closed)."""

    reason = "AUDIT_UNAVAILABLE"


class ResourceExhausted(BrokerError):
    """A configured limit is reached; ErrorInfo names the setting and its value, so the
    caller (or its operator) knows which limit to wait out or raise."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, setting: str, limit: int) -> None:
        super().__init__(message, setting=setting, limit=str(limit))


class FlowLimit(ResourceExhausted):
    reason = "FLOW_LIMIT"


class CallerStreamLimit(ResourceExhausted):
    reason = "CALLER_STREAM_LIMIT"


class StreamLimit(ResourceExhausted):
    reason = "STREAM_LIMIT"


class ProxyRequestTooLarge(ResourceExhausted):
    reason = "PROXY_REQUEST_TOO_LARGE"


class ProxyResponseTooLarge(ResourceExhausted):
    reason = "PROXY_RESPONSE_TOO_LARGE"


class CiphertextInvalid(BrokerError):
    code = grpc.StatusCode.DATA_LOSS
    reason = "CIPHERTEXT_INVALID"


class Unauthenticated(BrokerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(BrokerError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class GrantNotFound(BrokerError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "GRANT_NOT_FOUND"


class GrantInvalid(Unauthenticated):
    reason = "GRANT_INVALID"


class GrantExpired(Unauthenticated):
    reason = "GRANT_EXPIRED"


class GrantRevoked(Unauthenticated):
    reason = "GRANT_REVOKED"


class GrantRequired(PermissionDenied):
    reason = "GRANT_REQUIRED"


class GrantScope(PermissionDenied):
    reason = "GRANT_SCOPE"


class GrantAudience(PermissionDenied):
    reason = "GRANT_AUDIENCE"


class TokenExposureDenied(PermissionDenied):
    """A proxy-only caller or grant asked for a token: it may only call through Proxy."""

    reason = "TOKEN_EXPOSURE_DENIED"


class AuthorizationUserMismatch(PermissionDenied):
    reason = "AUTHORIZATION_USER_MISMATCH"


class ConfigError(Exception):
    """A setting is missing or invalid; raised at start-up, printed without a traceback."""
