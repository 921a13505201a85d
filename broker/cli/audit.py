"""``broker audit``: the audit trail, newest first (events hold no tokens)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from broker.cli import common, output, timeparse
from broker.cli.exits import EXIT_OK, UsageError

if TYPE_CHECKING:
    from broker.runtime import Runtime

COLUMNS = [
    ("TIME", "occurred_at"),
    ("CALLER", "caller"),
    ("METHOD", "method"),
    ("OUTCOME", "outcome"),
    ("INTEGRATION", "integration_id"),
    ("USER", "user_id"),
    ("PROVIDER", "provider"),
    ("KIND", "credential_type"),
    ("GRANT", "grant_id"),
    ("RUN", "run_id"),
    ("REQUEST", "request_id"),
]


def cmd_audit(args: argparse.Namespace) -> int:
    from broker.storage import audit_log
    from broker.storage.engine import storage_errors

    if not (args.user or args.integration or args.caller or args.run or args.all):
        raise UsageError("give --user, --integration, --caller or --run (or --all)")
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    since = timeparse.since("--since", args.since) if args.since else None

    async def body(runtime: Runtime) -> int:
        async with storage_errors(), runtime.engine.connect() as conn:
            events = await audit_log.list_events(
                conn,
                user_id=args.user,
                integration_id=args.integration,
                caller=args.caller,
                run_id=args.run,
                since=since,
                limit=args.limit,
            )
        output.records(events, COLUMNS, as_json=args.json, empty="no matching audit event")
        return EXIT_OK

    return common.with_runtime(args, body)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="read the audit trail, newest first")
    audit.add_argument("--user", help="events of this user_id")
    audit.add_argument("--integration", help="events of this integration id")
    audit.add_argument("--caller", help="events of this caller name")
    audit.add_argument("--run", help="events of calls made under (or about) this run's grants")
    audit.add_argument("--all", action="store_true", help="no filter")
    audit.add_argument(
        "--since", help="only newer events: 1h, 30m, 2d, today, yesterday or an ISO 8601 time"
    )
    audit.add_argument("--limit", type=int, default=100)
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_audit)
