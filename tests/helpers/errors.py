"""What a failed gRPC call carried: its google.rpc details (ErrorInfo, RetryInfo), and the
expectation most tests write about it."""

from __future__ import annotations

from typing import Any, TypeVar, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

Detail = TypeVar("Detail", error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)


def _detail(error: grpc.aio.AioRpcError, kind: type[Detail]) -> Detail | None:
    """The first ``kind`` detail in a failed call's google.rpc.Status, or None."""
    # grpc-stubs types this as RpcError's tuple of _Metadatum; grpc.aio returns Metadata | None.
    for key, value in cast("grpc.aio.Metadata | None", error.trailing_metadata()) or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(kind.DESCRIPTOR):
                    found = kind()
                    detail.Unpack(found)
                    return found
    return None


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    return _detail(error, error_details_pb2.ErrorInfo)


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    return _detail(error, error_details_pb2.RetryInfo)


async def expect_error(
    call: Any, code: grpc.StatusCode, reason: str | None = None, contains: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, f"{error.code()} {error.details()}"
    if reason is not None:
        info = error_info(error)
        assert info is not None, "no ErrorInfo detail"
        assert info.domain == "credentialbroker"
        assert info.reason == reason, info
    if contains is not None:
        assert contains in (error.details() or ""), error.details()
    return error
