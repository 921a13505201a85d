"""The exception mapping and the retry policy on their own (no server): unknown reasons and
codes fall back, garbled details never hide the call's error, and the client knows every reason
the broker can send."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from broker import errors as server_errors
from broker.errors import AuditUnavailable
from broker.server.status import to_status
from credentialbroker_client import errors
from credentialbroker_client._config import SERVICE, Identity, Retry
from credentialbroker_client._requests import OPTION_NAMES

Code = grpc.StatusCode


class FailedCall:
    def __init__(self, code: Code, message: str, trailing: tuple[tuple[str, Any], ...]) -> None:
        self._code, self._message, self._trailing = code, message, trailing

    def code(self) -> Code:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing


def failed(
    code: Code,
    reason: str | None = None,
    domain: str = "credentialbroker",
    retry: float | None = None,
    **metadata: str,
) -> FailedCall:
    details = []
    if reason is not None:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata))
        details.append(info)
    if retry is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry * 1000))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    status = status_pb2.Status(code=code.value[0], message="what happened", details=details)
    return FailedCall(
        code,
        "what happened",
        (("grpc-status-details-bin", status.SerializeToString()), ("x-request-id", "r-1")),
    )


def _server_classes(cls: type[server_errors.BrokerError]) -> list[type[server_errors.BrokerError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _server_classes(sub)
    return found


@pytest.mark.parametrize(
    "server_class",
    [c for c in _server_classes(server_errors.BrokerError) if c is not server_errors.BrokerError],
    ids=lambda c: c.__name__,
)
def test_every_reason_the_server_sends_has_its_class(
    server_class: type[server_errors.BrokerError],
) -> None:
    client_class = errors.BY_REASON[server_class.reason]
    assert client_class.code == server_class.code
    # Through the server's own status encoding, end to end.
    error = server_class.__new__(server_class)
    server_errors.BrokerError.__init__(error, "why", integration_id="i-1")
    error.retry_after = 1.5  # type: ignore[attr-defined]  # only ProviderUnavailable has it
    status = to_status(error, "r-9")
    mapped = errors.from_call(FailedCall(status.code, status.details, status.trailing_metadata))
    assert type(mapped) is client_class
    assert mapped.reason == server_class.reason
    assert mapped.metadata == {"integration_id": "i-1"}
    assert mapped.request_id == "r-9"
    assert mapped.retry_delay == (1.5 if server_class.reason == "PROVIDER_UNAVAILABLE" else None)
    assert AuditUnavailable.reason in errors.BY_REASON


def test_design_reasons_are_known() -> None:
    for reason in (
        "AUTHORIZATION_USER_MISMATCH",
        "GRANT_REQUIRED",
        "GRANT_SCOPE",
        "GRANT_AUDIENCE",
        "GRANT_EXPIRED",
        "GRANT_REVOKED",
        "MIN_VALIDITY_UNATTAINABLE",
    ):
        assert reason in errors.BY_REASON


def test_mapping_carries_code_reason_metadata_retry_delay() -> None:
    error = errors.from_call(failed(Code.UNAVAILABLE, "PROVIDER_UNAVAILABLE", retry=2.5, p="x"))
    assert isinstance(error, errors.ProviderUnavailable)
    assert isinstance(error, errors.Unavailable)
    assert (error.code, error.reason, error.metadata) == (
        Code.UNAVAILABLE,
        "PROVIDER_UNAVAILABLE",
        {"p": "x"},
    )
    assert error.retry_delay == 2.5
    assert error.request_id == "r-1"
    assert str(error) == "PROVIDER_UNAVAILABLE: what happened (request_id=r-1)"


def test_unknown_reason_falls_back_to_the_class_of_its_code() -> None:
    error = errors.from_call(failed(Code.FAILED_PRECONDITION, "SOMETHING_NEW", x="1"))
    assert type(error) is errors.FailedPrecondition
    assert error.reason == "SOMETHING_NEW"
    assert error.metadata == {"x": "1"}
    # A known reason with an unexpected code: the code wins, so `except` by code stays right.
    odd = errors.from_call(failed(Code.NOT_FOUND, "PROVIDER_UNAVAILABLE"))
    assert type(odd) is errors.NotFound


def test_no_error_info_or_another_domain_maps_by_code() -> None:
    assert type(errors.from_call(failed(Code.UNAUTHENTICATED))) is errors.Unauthenticated
    other = errors.from_call(failed(Code.PERMISSION_DENIED, "IAM_DENIED", domain="example.com"))
    assert type(other) is errors.PermissionDenied
    assert other.reason == "PERMISSION_DENIED"
    assert type(errors.from_call(failed(Code.UNKNOWN))) is errors.Internal
    unmapped = errors.from_call(failed(Code.ABORTED))
    assert type(unmapped) is errors.BrokerError
    assert unmapped.code == Code.ABORTED
    assert unmapped.reason == "ABORTED"


def test_garbled_details_do_not_hide_the_error() -> None:
    call = FailedCall(Code.NOT_FOUND, "gone", (("grpc-status-details-bin", b"\xff\x00garbage"),))
    error = errors.from_call(call)
    assert type(error) is errors.NotFound
    assert error.message == "gone"


def test_retry_policy() -> None:
    unavailable = errors.Unavailable("down")
    told = errors.ProviderUnavailable("later", retry_delay=3.0)
    policy = Retry(attempts=3, initial_backoff=0.1, max_backoff=1.0)
    assert policy.delay(told, 1, remaining=10) == 3.0
    assert policy.delay(told, 1, remaining=2.9) is None  # would outlast the deadline
    assert policy.delay(told, 1, remaining=None) == 3.0
    assert policy.delay(told, 3, remaining=None) is None  # attempts used up
    backoff = policy.delay(unavailable, 2, remaining=10)
    assert backoff is not None
    assert 0 <= backoff <= 0.2
    for code in Code:
        if code is not Code.UNAVAILABLE:
            assert policy.delay(errors.BrokerError("x", code=code), 1, remaining=None) is None
    with pytest.raises(ValueError, match="at least 1"):
        Retry(attempts=0)


def test_call_options_never_shadow_a_request_field() -> None:
    """Options and fields share keyword arguments: a proto field named like an option would be
    unreachable, so adding one must fail here (rename the option, never the field)."""
    for rpc in SERVICE.methods:
        clash = OPTION_NAMES & set(rpc.input_type.fields_by_name)
        assert not clash, f"{rpc.name}: {clash}"


def test_secrets_stay_out_of_reprs() -> None:
    identity = Identity(token="bearer-secret", grant="grant-secret")
    assert "secret" not in repr(identity)
    metadata, request_id = identity.metadata(None)
    assert ("authorization", "Bearer bearer-secret") in metadata
    assert ("x-broker-grant", "grant-secret") in metadata
    assert ("x-request-id", request_id) in metadata
