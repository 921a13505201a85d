"""``broker webhooks list|retry|test``: delivery state of the configured webhooks.

Nothing printed carries a secret: endpoints by name and URL, deliveries by event id. An
endpoint name that is not configured is the same usage error (exit 2) in every subcommand.
"""

from __future__ import annotations

import argparse
import os
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from broker.cli import common, output
from broker.cli.exits import EXIT_FAILED, EXIT_OK, UsageError

if TYPE_CHECKING:
    from broker.runtime import Runtime


def _known(runtime: Runtime, name: str) -> None:
    if name not in runtime.settings.webhooks:
        configured = ", ".join(sorted(runtime.settings.webhooks)) or "none"
        raise UsageError(f"no webhook named {name!r} is configured (configured: {configured})")


def cmd_list(args: argparse.Namespace) -> int:
    from broker.storage import webhooks as store
    from broker.storage.engine import storage_errors
    from broker.storage.repository import utc

    async def body(runtime: Runtime) -> int:
        configured = runtime.settings.webhooks
        if args.name:
            _known(runtime, args.name)
        async with storage_errors(), runtime.engine.connect() as conn:
            if args.name:
                rows = await store.deliveries(conn, args.name, args.state, args.limit)
                found: list[dict[str, Any]] = [
                    {
                        "event_id": r.event_id,
                        "state": r.state,
                        "attempts": r.attempts,
                        "last_status": r.last_status,
                        "last_error": r.last_error,
                        "next_attempt_at": utc(r.next_attempt_at),
                        "delivered_at": utc(r.delivered_at),
                    }
                    for r in rows
                ]
                columns = [
                    ("EVENT", "event_id"),
                    ("STATE", "state"),
                    ("ATTEMPTS", "attempts"),
                    ("STATUS", "last_status"),
                    ("ERROR", "last_error"),
                    ("NEXT", "next_attempt_at"),
                    ("DELIVERED", "delivered_at"),
                ]
            else:
                summary: dict[str, dict[str, Any]] = {}
                for r in await store.summary(conn):
                    item = summary.setdefault(
                        r.name,
                        {
                            "name": r.name,
                            "url": configured[r.name].url if r.name in configured else None,
                            "cursor": r.cursor,
                            "lease_owner": r.lease_owner or None,
                            "PENDING": 0,
                            "DELIVERED": 0,
                            "FAILED": 0,
                        },
                    )
                    if r.state:
                        item[r.state] = r.n
                found = list(summary.values())
                columns = [
                    ("NAME", "name"),
                    ("URL", "url"),
                    ("CURSOR", "cursor"),
                    ("LEASE", "lease_owner"),
                    ("PENDING", "PENDING"),
                    ("DELIVERED", "DELIVERED"),
                    ("FAILED", "FAILED"),
                ]
        output.records(found, columns, as_json=args.json, empty="nothing to show")
        return EXIT_OK

    return common.with_runtime(args, body)


def cmd_retry(args: argparse.Namespace) -> int:
    from broker.storage import webhooks as store
    from broker.storage.engine import storage_errors

    async def body(runtime: Runtime) -> int:
        _known(runtime, args.name)
        async with storage_errors(), runtime.engine.begin() as conn:
            count = await store.retry_failed(conn, args.name, runtime.clock(), args.event)
        print(f"{count} failed deliver{'y' if count == 1 else 'ies'} of {args.name} queued again")
        return EXIT_OK if count else EXIT_FAILED

    return common.with_runtime(args, body)


def cmd_test(args: argparse.Namespace) -> int:
    from broker.domain.events import Event, EventType
    from broker.domain.webhooks import WebhookDispatcher, build_endpoints
    from broker.providers.catalog import ALIASES

    async def body(runtime: Runtime) -> int:
        _known(runtime, args.name)
        endpoints = {
            e.name: e for e in build_endpoints(runtime.settings.webhooks, os.environ, ALIASES)
        }
        sample = Event(
            id=0,
            occurred_at=datetime.now(UTC),
            integration_id=str(uuid.uuid4()),
            user_id="webhook-test",
            provider="test",
            account_id="",
            type=EventType.CONNECTED,
            reason="TEST",
            message="a test delivery from `broker webhooks test`",
            failure_count=None,
            revocation=None,
        )
        dispatcher = WebhookDispatcher(runtime.engine, [], runtime.clock, "cli", 1.0)
        try:
            status, error = await dispatcher.send(endpoints[args.name], sample)
        finally:
            await dispatcher.close()
        if error is None:
            print(f"{args.name}: delivered (HTTP {status})")
            return EXIT_OK
        print(f"{args.name}: not delivered ({error})")
        return EXIT_FAILED

    return common.with_runtime(args, body)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hooks = sub.add_parser(
        "webhooks", help="webhook endpoints and their deliveries"
    ).add_subparsers(dest="sub", required=True)
    lst = hooks.add_parser("list", help="endpoints with delivery counts, or one's deliveries")
    lst.add_argument("name", nargs="?", help="show this endpoint's deliveries, newest first")
    lst.add_argument("--state", choices=["PENDING", "DELIVERED", "FAILED"])
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
    retry = hooks.add_parser("retry", help="send FAILED deliveries again (all, or one event)")
    retry.add_argument("name")
    retry.add_argument("--event", type=int, help="only this event id")
    retry.set_defaults(func=cmd_retry)
    test = hooks.add_parser("test", help="send one signed test event to an endpoint now")
    test.add_argument("name")
    test.set_defaults(func=cmd_test)
