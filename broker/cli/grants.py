"""``broker grants list|show|revoke``: run-scoped grants of workflow runners (metadata only;
a grant's token is shown once, by CreateGrant, never here)."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import TYPE_CHECKING, Any

from broker.cli import common, output
from broker.cli.exits import EXIT_OK, UsageError

if TYPE_CHECKING:
    from broker.runtime import Runtime

COLUMNS = [
    ("ID", "id"),
    ("USER", "user_id"),
    ("RUN", "run_id"),
    ("STATE", "state"),
    ("EXPIRES", "expires_at"),
    ("PROVIDERS", "providers"),
    ("INTEGRATIONS", "integration_ids"),
]


def as_dict(grant: Any, now: datetime) -> dict[str, Any]:
    if grant.revoked_at is not None:
        state = "REVOKED"
    elif grant.expired(now):
        state = "EXPIRED"
    else:
        state = "ACTIVE"
    return {
        "id": grant.id,
        "user_id": grant.user_id,
        "providers": sorted(grant.providers),
        "integration_ids": sorted(grant.integration_ids),
        "audience": sorted(grant.audience),
        "methods": sorted(grant.methods),
        "run_id": grant.run_id or None,
        "issuer": grant.issuer,
        "state": state,
        "created_at": grant.created_at,
        "expires_at": grant.expires_at,
        "revoked_at": grant.revoked_at,
    }


def cmd_list(args: argparse.Namespace) -> int:
    if not (args.user or args.run):
        # The domain's own message names the RPC's fields; an operator typed flags.
        raise UsageError("give --user USER_ID or --run RUN_ID (add --all for expired and revoked)")

    async def body(runtime: Runtime) -> int:
        found: list[Any] = []
        token = ""
        while True:
            page = await runtime.grants.list(args.user or "", args.run or "", args.all, 500, token)
            found += page.grants
            token = page.next_page_token
            if not token:
                break
        now = runtime.clock()
        output.records(
            [as_dict(g, now) for g in found], COLUMNS, as_json=args.json, empty="no matching grant"
        )
        return EXIT_OK

    return common.with_runtime(args, body)


def cmd_show(args: argparse.Namespace) -> int:
    async def body(runtime: Runtime) -> int:
        grant = await runtime.grants.get(args.id)
        output.record(as_dict(grant, runtime.clock()), as_json=args.json)
        return EXIT_OK

    return common.with_runtime(args, body)


def cmd_revoke(args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.run):
        raise UsageError("give a grant id or --run RUN_ID")

    async def body(runtime: Runtime) -> int:
        revoked = await common.audited(
            runtime, "RevokeGrant", runtime.grants.revoke(args.id or "", args.run or "")
        )
        print(f"{len(revoked)} grant(s) revoked")
        return EXIT_OK

    return common.with_runtime(args, body)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    grants = sub.add_parser(
        "grants", help="run-scoped grants of workflow runners (metadata only)"
    ).add_subparsers(dest="sub", required=True)
    glist = grants.add_parser("list", help="grants of a user or a run (active ones by default)")
    glist.add_argument("--user")
    glist.add_argument("--run")
    glist.add_argument("--all", action="store_true", help="also expired and revoked ones")
    glist.add_argument("--json", action="store_true")
    glist.set_defaults(func=cmd_list)
    gshow = grants.add_parser("show", help="one grant")
    gshow.add_argument("id")
    gshow.add_argument("--json", action="store_true")
    gshow.set_defaults(func=cmd_show)
    grevoke = grants.add_parser("revoke", help="revoke one grant, or every grant of a run")
    grevoke.add_argument("id", nargs="?")
    grevoke.add_argument("--run")
    grevoke.set_defaults(func=cmd_revoke)
