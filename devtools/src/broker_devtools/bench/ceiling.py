"""The measured ceiling: the real broker with parts taken away, for the bench only.

    python -m broker_devtools.bench.ceiling --config broker.toml --variant noaudit
    python -m broker_devtools.bench.ceiling --config broker.toml --variant stub

``noaudit``: the real broker (auth, service, cache, decrypt, proto conversion, metrics, the
group commit's bookkeeping) whose audit events go to a sink that writes nothing.
``stub``: the broker's server, options, guard (auth, policy, request id, metrics, access
log) and port setup, but GetAccessToken answers a constant response of the broker's shape and
nothing is audited.

The audit trail is mandatory and fail-closed, so no configuration setting can switch it off:
this entry point builds the real app (``broker.server.app``) and substitutes the parts in the
process, the way a test double would. ``broker serve`` never imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from broker import logs
from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.config import load_settings
from broker.runtime import Runtime, open_runtime
from broker.server import app
from broker.server.interceptors import AuthInterceptor
from broker.server.servicer import CredentialBrokerServicer
from broker_devtools.bench import data

VARIANTS = ("noaudit", "stub")


class NullSink:
    """Takes every batch and writes nothing (the group commit runs as usual)."""

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        return None

    async def close(self) -> None:
        return None


def _replace(name: str, value: object) -> None:
    """Swap what ``broker.server.app`` calls ``name`` (it must exist there: a rename in the
    app fails here, loudly, rather than measuring the real broker under a ceiling's name)."""
    if not hasattr(app, name):
        raise RuntimeError(f"broker.server.app has no {name!r} to substitute")
    setattr(app, name, value)


def _without_audit_writes() -> None:
    async def opened(*args: Any, **kwargs: Any) -> Runtime:
        runtime = await open_runtime(*args, **kwargs)
        runtime.auditor.sink = NullSink()
        return runtime

    _replace("open_runtime", opened)


def _stubbed_servicer() -> None:
    response = data.sample_response()

    class Stubbed(CredentialBrokerServicer):
        async def GetAccessToken(
            self, request: pb.GetAccessTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
        ) -> pb.GetAccessTokenResponse:
            return response

    _replace("CredentialBrokerServicer", Stubbed)


def _unaudited_guard() -> None:
    """The guard (authentication, policy, request id, metrics, access log) without its
    auditor, from construction on: handlers are wrapped when services are registered."""

    class Unaudited(AuthInterceptor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.auditor = None

    _replace("AuthInterceptor", Unaudited)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker_devtools.bench.ceiling", description=__doc__)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--variant", choices=VARIANTS, required=True)
    args = p.parse_args(argv)
    settings = load_settings(config_path=args.config)
    logs.configure(settings.logging.level, settings.logging.format)
    if args.variant == "stub":
        # No null sink here: were the auditor still called, its events would reach the
        # database, and the bench fails a ceiling run that wrote any.
        _stubbed_servicer()
        _unaudited_guard()
    else:
        _without_audit_writes()
    try:
        import uvloop

        uvloop.install()  # as `broker serve` does
    except ImportError:
        pass
    asyncio.run(app.run(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
