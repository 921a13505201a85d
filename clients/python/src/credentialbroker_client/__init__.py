"""Python client for the Credential Broker (``credentialbroker.v1.CredentialBroker``).

    from credentialbroker_client import BrokerClient, ReauthorizationRequired

    with BrokerClient("127.0.0.1:50051", token=TOKEN) as broker:
        token = broker.get_access_token(user_id="u1", provider="twitter", min_valid_for=60)

``AsyncBrokerClient`` is the same for asyncio. Responses are the generated protobuf messages
(``broker_pb2``); failures raise the classes in ``credentialbroker_client.errors``.
"""

from credentialbroker_client import errors
from credentialbroker_client._config import DEFAULT_TIMEOUT, GRANT_HEADER, Retry, Tls
from credentialbroker_client._proto.credentialbroker.v1 import broker_pb2, broker_pb2_grpc
from credentialbroker_client._proxy import ProxyResponse
from credentialbroker_client._requests import CallOptions
from credentialbroker_client.aio import AsyncBrokerClient, AsyncStream
from credentialbroker_client.errors import (
    AmbiguousIntegration,
    AuditUnavailable,
    AuthorizationFlowInvalid,
    AuthorizationUserMismatch,
    BrokerError,
    CallerStreamLimit,
    Cancelled,
    CiphertextInvalid,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FlowLimit,
    GrantAudience,
    GrantExpired,
    GrantInvalid,
    GrantNotFound,
    GrantRequired,
    GrantRevoked,
    GrantScope,
    InsufficientScope,
    IntegrationDisconnected,
    IntegrationNotFound,
    Internal,
    InvalidArgument,
    MinValidityUnattainable,
    NeedsReauthorization,
    NotFound,
    PermissionDenied,
    ProviderMisconfigured,
    ProviderUnavailable,
    ProxyNotConfigured,
    ProxyRequestTooLarge,
    ProxyResponseTooLarge,
    ReauthorizationRequired,
    ResourceExhausted,
    StorageUnavailable,
    StreamLimit,
    TokenExposureDenied,
    Unauthenticated,
    Unavailable,
    UnknownProvider,
)
from credentialbroker_client.sync import BrokerClient, Stream

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "GRANT_HEADER",
    "AmbiguousIntegration",
    "AsyncBrokerClient",
    "AsyncStream",
    "AuditUnavailable",
    "AuthorizationFlowInvalid",
    "AuthorizationUserMismatch",
    "BrokerClient",
    "BrokerError",
    "CallOptions",
    "CallerStreamLimit",
    "Cancelled",
    "CiphertextInvalid",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FlowLimit",
    "GrantAudience",
    "GrantExpired",
    "GrantInvalid",
    "GrantNotFound",
    "GrantRequired",
    "GrantRevoked",
    "GrantScope",
    "InsufficientScope",
    "IntegrationDisconnected",
    "IntegrationNotFound",
    "Internal",
    "InvalidArgument",
    "MinValidityUnattainable",
    "NeedsReauthorization",
    "NotFound",
    "PermissionDenied",
    "ProviderMisconfigured",
    "ProviderUnavailable",
    "ProxyNotConfigured",
    "ProxyRequestTooLarge",
    "ProxyResponse",
    "ProxyResponseTooLarge",
    "ReauthorizationRequired",
    "ResourceExhausted",
    "Retry",
    "StorageUnavailable",
    "Stream",
    "StreamLimit",
    "Tls",
    "TokenExposureDenied",
    "Unauthenticated",
    "Unavailable",
    "UnknownProvider",
    "broker_pb2",
    "broker_pb2_grpc",
    "errors",
]
