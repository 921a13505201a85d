"""Where a secret or a traceback could show: every text a log record or a gRPC error
renders to, and the search through them."""

from __future__ import annotations

import logging
from typing import cast

import grpc
from google.rpc import status_pb2

from broker.logs import JsonFormatter


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    found = []
    for record in records:
        if record.exc_info or "Traceback" in record.getMessage():
            found.append(f"{record.name}: {record.getMessage()[:200]}")
    return found


def scan(text: str, needles: dict[str, str], where: str) -> list[str]:
    return [f"{what} found in {where}: {text[:300]!r}" for n, what in needles.items() if n in text]


def record_texts(record: logging.LogRecord) -> list[str]:
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    texts = [JsonFormatter().format(record), plain.format(record), repr(record.__dict__)]
    if record.exc_info:
        texts.append(plain.formatException(record.exc_info))
    return texts


def error_texts(error: grpc.aio.AioRpcError) -> list[str]:
    texts = [error.details() or "", error.debug_error_string() or "", repr(error)]
    # grpc-stubs types this as RpcError's tuple of _Metadatum; grpc.aio returns Metadata | None.
    for key, value in cast("grpc.aio.Metadata | None", error.trailing_metadata()) or ():
        texts.append(f"{key}={value!r}")
        if key == "grpc-status-details-bin":
            texts.append(str(status_pb2.Status.FromString(value)))
    return texts
