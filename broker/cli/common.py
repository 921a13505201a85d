"""What the operator commands share: their settings (the configuration, or beside a dev broker
its own key, caller and dev providers), the runtime opened as ``serve`` opens it, the selector
flags, confirmation, and the audit event every change writes."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from broker import devmode, logs
from broker.config import METHODS, Settings, load_settings
from broker.errors import BrokerError

if TYPE_CHECKING:  # the runtime pulls in the whole stack; commands open it when they run
    from broker.model import Selector
    from broker.runtime import Runtime

T = TypeVar("T")


def settings(args: argparse.Namespace) -> Settings:
    if args.command == "serve":
        return load_settings(config_path=args.config)
    # Beside a dev broker with nothing configured, the operator commands use its key, caller
    # and providers (the demo provider included), so they act as its RPCs do.
    return devmode.operator_settings(args.config)


def with_runtime(
    args: argparse.Namespace,
    body: Callable[[Runtime], Awaitable[int]],
    *,
    check_database: bool = True,
) -> int:
    """Open the runtime as ``serve`` would (same settings, same start-up checks), run ``body``."""
    from broker.runtime import open_runtime

    chosen = settings(args)
    logs.configure(chosen.logging.level, chosen.logging.format)

    async def run() -> int:
        runtime = await open_runtime(chosen, check_database=check_database)
        try:
            return await body(runtime)
        finally:
            await runtime.close()

    return asyncio.run(run())


def add_selector(parser: argparse.ArgumentParser) -> None:
    """An integration by id, or by ``--user --provider [--account]``, as the RPCs select one."""
    parser.add_argument("id", nargs="?", help="integration id")
    parser.add_argument("--user", help="with --provider: the user's integration of it")
    parser.add_argument("--provider")
    parser.add_argument("--account", help="the provider-side account, when a user has several")


def selector(args: argparse.Namespace) -> Selector:
    from broker.cli.exits import UsageError
    from broker.model import Selector

    if args.id and (args.user or args.provider or args.account is not None):
        raise UsageError("give an integration id or --user/--provider, not both")
    if args.id:
        return Selector(integration_id=args.id)
    if not (args.user and args.provider):
        raise UsageError("give an integration id, or --user and --provider (and --account)")
    return Selector(user_id=args.user, provider=args.provider, account_id=args.account)


def confirm(question: str, yes: bool) -> bool:
    """True with ``--yes``; otherwise ask on the terminal (no terminal: refuse)."""
    from broker.cli.exits import CommandFailed

    if yes:
        return True
    if not sys.stdin.isatty():
        raise CommandFailed(
            "refusing without confirmation: no terminal to ask on; pass --yes "
            "(or --dry-run to look first)"
        )
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in {"y", "yes"}


async def audited(runtime: Runtime, method: str, step: Awaitable[T]) -> T:
    """Run an operator change as an audited call by caller ``cli:<os user>``, like the RPC of
    the same name (the event is written whether it succeeds or fails)."""
    from broker.domain import ids
    from broker.domain.context import Call, Caller, current_call

    # The machine's operator: every method, provider and user, and every caller's grants.
    caller = Caller(f"cli:{getpass.getuser()}", frozenset(METHODS), None, manage_all_grants=True)
    call = Call(caller, method, ids.request_id())
    current_call.set(call)
    try:
        result = await step
    except BrokerError as error:
        await runtime.auditor.record(call, error.code.name)
        raise
    finally:
        current_call.set(None)
    await runtime.auditor.record(call, "OK")
    return result
