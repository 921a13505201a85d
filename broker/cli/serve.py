"""``broker serve``, ``migrate``, ``check`` and ``health``: running a broker and asking whether
it can run."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from broker import devmode, logs, plugins
from broker.cli import common
from broker.cli.exits import EXIT_CONFIG, EXIT_DATABASE, EXIT_FAILED, EXIT_OK, UsageError
from broker.config import Settings

if TYPE_CHECKING:
    from broker.server.app import Broker


async def _migrate(settings: Settings) -> str:
    from broker.storage.engine import create_engine, probe
    from broker.storage.schema import migrate

    engine = create_engine(settings.database)
    try:
        await probe(engine, settings.database.timeout_seconds)
        return await migrate(engine, settings.server.environment)
    finally:
        await engine.dispose()


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.server.app import run

    settings = common.settings(args)
    if args.proxy_listen:
        settings = _with_proxy_listen(settings, args.proxy_listen)
    logs.configure(settings.logging.level, settings.logging.format)
    additions: tuple[plugins.DevAddition, ...] = args.dev_additions
    if additions and not args.dev:
        raise UsageError(f"{additions[0].option}: only with --dev")
    if args.workers > 1:
        if args.dev:
            raise UsageError("--workers: dev mode runs one process on SQLite")
        from broker.server import workers

        return workers.run(settings, args.workers, args.config)
    token = None
    if args.dev:
        settings, token = devmode.prepare(settings)
        settings = _with_additions(settings, additions)
        asyncio.run(_migrate(settings))

    def ready(broker: Broker) -> None:
        if args.dev:
            print(devmode.banner(settings.server.listen, broker.port, token), flush=True)
            for addition in additions:
                print(addition.banner(), flush=True)

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional; the default loop works, a little slower
        pass

    def reload() -> Settings:
        fresh = common.settings(args)
        if not args.dev:
            return fresh
        return _with_additions(devmode.prepare(fresh)[0], additions)

    asyncio.run(run(settings, on_ready=ready, reload=reload))
    return EXIT_OK


def _with_proxy_listen(settings: Settings, listen: str) -> Settings:
    from pydantic import ValidationError

    from broker.config import ProxySettings

    try:
        proxy = ProxySettings.model_validate({**settings.proxy.model_dump(), "listen": listen})
    except ValidationError:
        raise UsageError("--proxy-listen: must be HOST:PORT, e.g. 127.0.0.1:8081") from None
    return settings.model_copy(update={"proxy": proxy})


def _with_additions(settings: Settings, additions: Sequence[plugins.DevAddition]) -> Settings:
    base = settings
    for addition in additions:
        settings = addition.apply(settings)
    # The operator commands run beside this broker use the providers the additions brought.
    devmode.record_dev_providers(base, settings)
    return settings


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = common.settings(args)
    revision = asyncio.run(_migrate(settings))
    print(f"database at revision {revision} (environment {settings.server.environment!r})")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from broker.checks import Level, run_checks

    checks, _ = asyncio.run(run_checks(args.config))
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{check.level.value:<4}  {check.name:<{width}}  {check.detail}")
    failed = {c.name for c in checks if c.level is Level.FAIL}
    # The code `serve` exits with on the same problem: it refuses to start with a
    # configuration error (2) for everything but a database it cannot reach (3).
    if failed & {"database reachable", "database"}:
        return EXIT_DATABASE
    return EXIT_CONFIG if failed else EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    from broker import healthprobe

    address = args.address or healthprobe.default_address()
    serving, line = healthprobe.check(
        address, service=args.service, timeout=args.timeout, ca_file=args.ca_file
    )
    print(line, file=sys.stdout if serving else sys.stderr)
    return EXIT_OK if serving else EXIT_FAILED


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="zero set-up: SQLite, key and caller token under ./.broker/, migrate on start",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N processes on one port (SO_REUSEPORT; needs PostgreSQL)",
    )
    serve.add_argument(
        "--proxy-listen",
        metavar="ADDR",
        default="",
        help="also serve Proxy as plain HTTP (ANY /proxy/{provider}/{path}) on HOST:PORT "
        "(setting proxy.listen; off by default)",
    )
    serve.set_defaults(func=cmd_serve, dev_additions=())

    sub.add_parser("migrate", help="create or upgrade the schema").set_defaults(func=cmd_migrate)
    sub.add_parser(
        "check", help="check configuration, database, environment, keys and providers"
    ).set_defaults(func=cmd_check)

    health = sub.add_parser(
        "health",
        help="exit 0 only when a broker's health service answers SERVING (for probes)",
        description="Ask a running broker's grpc.health.v1.Health service. Needs no settings.",
    )
    health.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="default: $BROKER_LISTEN (0.0.0.0 read as 127.0.0.1), else 127.0.0.1:50051",
    )
    health.add_argument("--service", default="", help="a service name (default: the server)")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    health.add_argument(
        "--ca-file", type=Path, help="speak TLS, trusting this CA bundle (broker with TLS)"
    )
    health.set_defaults(func=cmd_health)
    return serve
