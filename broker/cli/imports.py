"""``broker import``: an application's existing integrations table (PostgreSQL, SQLite, JSON
Lines) into this broker, through the same store path as StoreIntegration. Resumable and
idempotent (each imported row is recorded with its integration); ``--verify`` refreshes the
imported grants; ``--wipe-source`` then clears the source's token columns of exactly the rows
the broker now holds. Nothing printed or reported carries a token."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import IO, TYPE_CHECKING, Any

from broker.cli import common, output
from broker.cli.exits import EXIT_FAILED, EXIT_OK, CommandFailed, UsageError

if TYPE_CHECKING:
    from broker.runtime import Runtime


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import",
        help="import an existing integrations table (PostgreSQL, SQLite, JSON Lines)",
        description=__doc__,
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="postgresql://… URL, a SQLite file, or a JSON Lines file (- for stdin)",
    )
    p.add_argument("--table", default="integrations", help="source table (default: integrations)")
    p.add_argument("--where", help="SQL condition: import only this slice (SQL sources)")
    p.add_argument(
        "--map",
        default="",
        metavar="FIELD=COLUMN,...",
        help="broker field = source column, over the default (the columns of the same names)",
    )
    p.add_argument(
        "--provider-map", default="", metavar="OLD=NEW,...", help="rename providers (gmail=google)"
    )
    p.add_argument(
        "--decrypt-command",
        metavar="CMD",
        help="a program answering JSON lines of plaintexts for JSON lines of ciphertexts",
    )
    p.add_argument(
        "--decrypt-env",
        default="",
        metavar="NAME,...",
        help="environment variables passed to the decrypt command (never BROKER_*)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate every row, write nothing")
    p.add_argument(
        "--on-conflict",
        choices=["skip", "newer"],
        default="skip",
        help="an integration already present: keep it (skip), or replace it when the source "
        "row's updated_at is later (newer)",
    )
    p.add_argument("--include-disconnected", action="store_true")
    p.add_argument(
        "--batch-size", type=int, default=1000, help="rows per transaction (default 1000)"
    )
    p.add_argument("--report", metavar="PATH", help="JSON Lines: the outcome of every row")
    p.add_argument(
        "--verify", action="store_true", help="refresh every imported grant; name the dead ones"
    )
    p.add_argument(
        "--wipe-source",
        action="store_true",
        help="then set the source's token columns to NULL for exactly the imported rows",
    )
    p.add_argument("--yes", action="store_true", help="do not ask before --wipe-source")
    p.set_defaults(func=cmd_import)


def _options(args: argparse.Namespace) -> tuple[dict[str, str | None], dict[str, str]]:
    from broker.sources import parse_map, parse_pairs

    if args.batch_size < 1 or args.batch_size > 10_000:
        raise UsageError("--batch-size: must be between 1 and 10000")
    if args.dry_run and (args.wipe_source or args.verify):
        raise UsageError("--dry-run writes nothing: it cannot --verify or --wipe-source")
    try:
        return parse_map(args.map), parse_pairs(args.provider_map, "--provider-map")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_import(args: argparse.Namespace) -> int:
    mapping, provider_map = _options(args)

    async def body(runtime: Runtime) -> int:
        from broker.sources import SourceError

        try:
            return await _run(runtime, args, mapping, provider_map)
        except SourceError as exc:
            raise CommandFailed(str(exc)) from None

    return common.with_runtime(args, body)


async def _run(
    runtime: Runtime,
    args: argparse.Namespace,
    mapping: dict[str, str | None],
    provider_map: dict[str, str],
) -> int:
    from broker.domain import importer
    from broker.sources import open_source
    from broker.sources.decrypt import DecryptCommand

    try:
        source = open_source(args.source, args.table, args.where, mapping)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.wipe_source and not source.writable:
        raise UsageError("--wipe-source: a JSON Lines source cannot be cleared in place")
    decryptor = None
    if args.decrypt_command:
        names = [n.strip() for n in args.decrypt_env.split(",") if n.strip()]
        decryptor = DecryptCommand(args.decrypt_command, names)
    # Appended to as rows go: a resumed run adds its lines after the interrupted one's.
    report: IO[str] | None = (
        open(args.report, "a", encoding="utf-8")  # noqa: SIM115, ASYNC230
        if args.report
        else None
    )

    def write(line: dict[str, Any]) -> None:
        if report is not None:
            report.write(json.dumps(line) + "\n")

    try:
        job = importer.Importer(
            runtime.service,
            importer.Options(
                source=source.name,
                on_conflict=args.on_conflict,
                include_disconnected=args.include_disconnected,
                dry_run=args.dry_run,
                provider_map=provider_map,
                caller=f"cli:{getpass.getuser()}",
            ),
            decrypt=decryptor.decrypt if decryptor is not None else None,
            auditor=runtime.auditor,
            report=write,
        )
        job.tally.total = await source.count()
        bar = output.ProgressBar("importing" if not args.dry_run else "checking", sys.stderr)
        try:
            tally = await job.run(source.batches(args.batch_size), bar)
        finally:
            bar.close()
        print(tally.summary(args.dry_run))
        if args.dry_run:
            print("dry run: nothing was written", file=sys.stderr)
            return EXIT_FAILED if tally.failed else EXIT_OK
        dead = 0
        if args.verify:
            results = await importer.verify(runtime.service, runtime.refresher, source.name)
            for result in results:
                write({"outcome": "verified", **result})
            dead_rows = [r for r in results if r["verified"] == importer.DEAD]
            dead = len(dead_rows)
            counts: dict[str, int] = {}
            for result in results:
                counts[result["verified"]] = counts.get(result["verified"], 0) + 1
            print(
                "verified "
                + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing new")
            )
            for r in dead_rows:
                print(
                    f"dead at the provider: source id {r['source_id']} → integration "
                    f"{r['integration_id']} ({r['detail']})"
                )
        if args.wipe_source:
            await _wipe(runtime, source, verified_only=args.verify, yes=args.yes)
        if dead:
            print(f"{dead} imported grant(s) are dead at the provider", file=sys.stderr)
        return EXIT_FAILED if tally.failed else EXIT_OK
    finally:
        if report is not None:
            report.close()
        if decryptor is not None:
            await decryptor.close()
        await source.close()


async def _wipe(runtime: Runtime, source: Any, *, verified_only: bool, yes: bool) -> None:
    from broker.domain import importer
    from broker.storage import imports
    from broker.storage.engine import storage_errors, write_transaction

    async with storage_errors(), runtime.engine.connect() as conn:
        records = await imports.all_of(conn, source.name)
    ids = [
        r.source_id
        for r in records
        # Verified: alive at the provider, or nothing to verify (no refresh token).
        if r.wiped_at is None
        and (not verified_only or r.verified in (importer.ALIVE, importer.NOT_RENEWABLE))
    ]
    if not ids:
        print("wipe-source: no imported row left to clear")
        return
    if not common.confirm(
        f"set the token columns of {len(ids)} imported row(s) in {source.name} to NULL?", yes
    ):
        print("wipe-source: not confirmed; the source is unchanged", file=sys.stderr)
        return
    changed = await source.wipe(ids)
    async with write_transaction(runtime.engine) as conn:
        await imports.set_wiped(conn, source.name, ids, runtime.clock())
    print(f"wipe-source: cleared the tokens of {changed} source row(s)")
