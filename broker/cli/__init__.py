"""The ``broker`` command: one module per command group, one exit-code table (``exits``), one
output layer (``output``: tables, and ``--json`` with ISO 8601 times and ``null``).

Every failure is one line on stderr, never a traceback. Nothing printed ever contains a token
or a key. The dev tools add their commands through entry points (``broker.plugins``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from broker import __version__, plugins
from broker.cli import audit, grants, imports, integrations, keys, providers, serve, webhooks
from broker.cli.exits import (
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_DATABASE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    CommandFailed,
)
from broker.errors import BrokerError, ConfigError, StorageUnavailable

__all__ = ["EXIT_CONFIG", "EXIT_DATABASE", "EXIT_FAILED", "EXIT_OK", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="broker",
        description="Credential Broker",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"broker {__version__}")
    p.add_argument("--config", help="TOML settings file (default: $BROKER_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)
    serve_parser = serve.register(sub)
    keys.register(sub)
    webhooks.register(sub)
    audit.register(sub)
    integrations.register(sub)
    grants.register(sub)
    imports.register(sub)
    providers.register(sub)
    plugins.register_all(sub, serve_parser)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CommandFailed as exc:
        print(f"broker: {exc.message}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageUnavailable as exc:
        print(f"broker: {exc.message}", file=sys.stderr)
        return EXIT_DATABASE
    except BrokerError as exc:
        # Domain errors (no such integration, …) carry a message meant for people.
        print(f"broker: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
