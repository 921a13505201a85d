"""The ``broker`` command: serve, migrate, keygen, callers."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Sequence

from broker import __version__, devmode, logs
from broker.config import METHODS, Settings, load_settings
from broker.crypto.keys import generate_key
from broker.errors import ConfigError, StorageUnavailable
from broker.server.callers import hash_token


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(config_path=args.config)


async def _migrate(settings: Settings) -> str:
    from broker.storage.engine import create_engine
    from broker.storage.schema import migrate

    engine = create_engine(settings.database)
    try:
        return await migrate(engine, settings.server.environment)
    finally:
        await engine.dispose()


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.server.app import Broker, run

    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    token = None
    if args.dev:
        settings, token = devmode.prepare(settings)
        asyncio.run(_migrate(settings))

    def ready(broker: Broker) -> None:
        if args.dev:
            print(devmode.banner(settings.server.listen, broker.port, token), flush=True)

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional; the default loop works, a little slower
        pass
    asyncio.run(run(settings, on_ready=ready))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    revision = asyncio.run(_migrate(settings))
    print(f"database at revision {revision} (environment {settings.server.environment!r})")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print(generate_key(args.id))
    return 0


def cmd_callers_new(args: argparse.Namespace) -> int:
    token = "cb_" + secrets.token_urlsafe(32)
    methods = args.methods or list(METHODS)
    print(f"# token for caller {args.name!r} (shown once; give it to the caller, keep it secret):")
    print(f"# {token}")
    print(f"[callers.{args.name}]")
    print(f'token_sha256 = "{hash_token(token)}"')
    print("methods = [" + ", ".join(f'"{m}"' for m in methods) + "]")
    return 0


def cmd_callers_hash(_args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        print("broker: give the token on standard input", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="broker", description="Credential Broker")
    p.add_argument("--version", action="version", version=f"broker {__version__}")
    p.add_argument("--config", help="TOML settings file (default: $BROKER_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="zero set-up: SQLite, key and caller token under ./.broker/, migrate on start",
    )
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("migrate", help="create or upgrade the schema").set_defaults(func=cmd_migrate)

    keygen = sub.add_parser("keygen", help="print a new KID:BASE64KEY entry for the keyring")
    keygen.add_argument("--id", help="key id (default: time-based)")
    keygen.set_defaults(func=cmd_keygen)

    callers = sub.add_parser("callers", help="caller tokens").add_subparsers(
        dest="sub", required=True
    )
    new = callers.add_parser("new", help="make a token and print its [callers.NAME] section")
    new.add_argument("name")
    new.add_argument("--methods", nargs="+", choices=METHODS, help="methods it may call")
    new.set_defaults(func=cmd_callers_new)
    callers.add_parser("hash", help="SHA-256 of a token read from stdin").set_defaults(
        func=cmd_callers_hash
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    except StorageUnavailable as exc:
        print(f"broker: {exc.message}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
