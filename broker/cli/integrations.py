"""``broker integrations list|show|disconnect|purge``: integrations by their metadata (never a
token), selected as the RPCs select them."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from broker.cli import common, output
from broker.cli.exits import EXIT_FAILED, EXIT_OK, UsageError
from broker.model import Status

if TYPE_CHECKING:
    from broker.model import Integration
    from broker.runtime import Runtime

COLUMNS = [
    ("ID", "id"),
    ("PROVIDER", "provider"),
    ("ACCOUNT", "account_id"),
    ("KIND", "credential_type"),
    ("STATUS", "status"),
    ("EXPIRES", "expires_at"),
    ("REFRESH_TOKEN_EXPIRES", "refresh_token_expires_at"),
    ("LAST_USED", "last_used_at"),
    ("UPDATED", "updated_at"),
]


def as_dict(integration: Integration) -> dict[str, Any]:
    return {
        "id": integration.id,
        "user_id": integration.user_id,
        "provider": integration.provider,
        "account_id": integration.account_id or None,
        "status": integration.status,
        "credential_type": integration.credential_type,
        "scopes": list(integration.scopes),
        "metadata": integration.metadata,
        "has_refresh_token": integration.has_refresh_token,
        "created_at": integration.created_at,
        "updated_at": integration.updated_at,
        "expires_at": integration.expires_at,
        "last_refreshed_at": integration.last_refreshed_at,
        "refresh_token_expires_at": integration.refresh_token_expires_at,
        "last_used_at": integration.last_used_at,
        "disconnected_at": integration.disconnected_at,
        "disconnect_reason": integration.disconnect_reason,
        "version": integration.version,
    }


def cmd_list(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    status = Status(args.status) if args.status else None

    async def body(runtime: Runtime) -> int:
        found: list[Integration] = []
        token = args.page_token or ""
        while len(found) < args.limit:
            size = min(500, args.limit - len(found))
            if args.user:
                page = await runtime.service.list(
                    args.user, args.provider or "", status, size, token
                )
            else:
                page = await runtime.service.list_across_users(
                    args.provider or "", status, size, token
                )
            found += page.integrations
            token = page.next_page_token
            if not token:
                break
        # Across users, the table names each row's user too.
        columns = COLUMNS if args.user else [COLUMNS[0], ("USER", "user_id"), *COLUMNS[1:]]
        output.records(
            [as_dict(i) for i in found],
            columns,
            as_json=args.json,
            empty="no matching integration",
        )
        if token:
            print(f"more: run again with --page-token {token}", file=sys.stderr)
        return EXIT_OK

    return common.with_runtime(args, body)


def cmd_show(args: argparse.Namespace) -> int:
    selector = common.selector(args)

    async def body(runtime: Runtime) -> int:
        stored = await runtime.service.read(selector)
        data = as_dict(stored.integration)
        data["key_id"] = stored.key_id
        data["revocation"] = stored.revocation
        output.record(data, as_json=args.json)
        return EXIT_OK

    return common.with_runtime(args, body)


def cmd_disconnect(args: argparse.Namespace) -> int:
    selector = common.selector(args)

    async def body(runtime: Runtime) -> int:
        integration, revocation = await common.audited(
            runtime,
            "Disconnect",
            runtime.service.disconnect(selector, args.reason or "", args.skip_revocation),
        )
        if args.json:
            output.record({**as_dict(integration), "revocation": revocation.value}, as_json=True)
            return EXIT_OK
        print(
            f"integration {integration.id} ({integration.provider}, user "
            f"{integration.user_id!r}): {integration.status.value}; "
            f"provider revocation: {revocation.value}"
        )
        return EXIT_OK

    return common.with_runtime(args, body)


def cmd_purge(args: argparse.Namespace) -> int:
    from broker.domain import purge

    kind = purge.Kind.EXPIRED if args.expired else purge.Kind.DISCONNECTED

    async def body(runtime: Runtime) -> int:
        now = runtime.clock()
        found = await purge.candidates(runtime.engine, args.user, kind, now)
        kept = (
            await purge.pending_revocations(runtime.engine, args.user)
            if kind is purge.Kind.DISCONNECTED
            else 0
        )
        verb = "would delete" if args.dry_run else "to delete"
        print(f"{len(found)} {kind.value} integration(s) of user {args.user!r} {verb}:")
        for i in found:
            print(f"  {i.id}  {i.provider}  {i.account_id or '-'}  {i.status.value}")
        if kept:
            print(f"({kept} disconnected integration(s) kept: provider revocation still pending)")
        if args.dry_run or not found:
            return EXIT_OK
        if not common.confirm(f"Delete these {len(found)} integration(s)?", args.yes):
            print("nothing deleted", file=sys.stderr)
            return EXIT_FAILED
        deleted = await purge.purge(runtime.engine, args.user, kind, [i.id for i in found], now)
        print(f"deleted {deleted} integration(s)")
        if deleted < len(found):
            print(f"({len(found) - deleted} changed meanwhile and were kept)")
        return EXIT_OK

    return common.with_runtime(args, body)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    integ = sub.add_parser(
        "integrations", help="look at and clean up integrations (metadata only)"
    ).add_subparsers(dest="sub", required=True)
    lst = integ.add_parser(
        "list", help="integrations, oldest first: every user's, or one user's with --user"
    )
    lst.add_argument("--user", help="only this user's")
    lst.add_argument("--provider", help="only this provider's")
    lst.add_argument("--status", choices=[s.value for s in Status])
    lst.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    lst.add_argument("--page-token", help="continue where an earlier list stopped")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
    show = integ.add_parser("show", help="one integration")
    common.add_selector(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    disc = integ.add_parser("disconnect", help="disconnect one integration")
    common.add_selector(disc)
    disc.add_argument("--reason", default="")
    disc.add_argument(
        "--skip-revocation", action="store_true", help="do not revoke the grant at the provider"
    )
    disc.add_argument("--json", action="store_true")
    disc.set_defaults(func=cmd_disconnect)
    purge = integ.add_parser("purge", help="delete a user's expired or disconnected integrations")
    purge.add_argument("--user", required=True)
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--expired", action="store_true")
    which.add_argument("--disconnected", action="store_true")
    purge.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=cmd_purge)
