"""``broker bench``: the performance run (``make bench``; method in docs/benchmarks.md).

    broker bench --standard --json bench.json       # every scenario, standard settings
    broker bench --scenario echo --scenario pg-hot  # a subset (groups: sqlite, pg, scale, …)
    python -m broker_devtools.bench --quick                  # smoke test: seconds, 1,000-row "1M"

Hook into the main CLI with ``broker_devtools.bench.cli.register(subparsers)``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from broker_devtools.bench import catalog

if TYPE_CHECKING:
    from broker_devtools.bench import scenarios

_DB_ENV = "BROKER_BENCH_DATABASE_URL"


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--standard",
        action="store_true",
        help="every scenario with the standard settings (what `make bench` runs; each audited "
        "scenario in both audit durabilities)",
    )
    mode.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny durations, 1,000 rows instead of 1,000,000",
    )
    p.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help=f"run only this scenario or group (repeatable): {', '.join(catalog.NAMES)}; "
        f"groups: {', '.join(catalog.GROUPS)}",
    )
    p.add_argument("--duration", type=_positive, metavar="S", help="measured seconds per run")
    p.add_argument("--warmup", type=_non_negative, metavar="S", help="unmeasured seconds first")
    p.add_argument("--clients", type=_count, metavar="N", help="load-generating processes")
    p.add_argument("--concurrency", type=_count, metavar="N", help="calls in flight per client")
    p.add_argument(
        "--database-url",
        metavar="URL",
        help=f"PostgreSQL to create bench_* databases in (dropped afterwards); default "
        f"${_DB_ENV} or {catalog.DEFAULT_DATABASE_URL}",
    )
    p.add_argument("--scale-rows", type=_count, metavar="N", help="rows of the scale-1m runs")
    p.add_argument(
        "--fill-seconds", type=_positive, metavar="S", help="cap on the cache fill (scale-1m-hot)"
    )
    p.add_argument(
        "--workers", type=_count, metavar="N", help="pass `--workers N` to `broker serve`"
    )
    p.add_argument(
        "--durability",
        choices=("commit", "write", "both"),
        default="both",
        help="audit.durability of the brokers: each audited scenario runs in both (default; "
        "the write run is named SCENARIO+write) or in one",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--repeat",
        type=_count,
        default=1,
        metavar="N",
        help="run the whole selection N times in a row, then print the median and range of "
        "each figure (with --json, run K goes to FILE's name with .K before the suffix)",
    )
    mode.add_argument(
        "--summarize",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="run nothing: sum up earlier --json runs (median and range of each figure, each "
        "target met in k of N)",
    )


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    serve: argparse.ArgumentParser | None = None,
) -> None:
    """Add ``bench`` to the ``broker`` command's subparsers (entry point
    ``credential_broker.cli``)."""
    bench = subparsers.add_parser(
        "bench", help="benchmark GetAccessToken against the gRPC echo floor (docs/benchmarks.md)"
    )
    add_arguments(bench)
    bench.set_defaults(func=run)


def options(args: argparse.Namespace) -> scenarios.Options:
    from broker_devtools.bench import scenarios

    o = scenarios.quick() if args.quick else scenarios.Options()
    o.database_url = args.database_url or os.environ.get(_DB_ENV) or o.database_url
    for name in ("duration", "warmup", "clients", "concurrency", "fill_seconds", "workers"):
        value = getattr(args, name)
        if value is not None:
            setattr(o, name, value)
    if args.scale_rows is not None:
        o.scale_large = args.scale_rows
    durability = getattr(args, "durability", "both")
    if durability != "both":
        o.durabilities = (durability,)
    return o


def run(args: argparse.Namespace) -> int:
    if args.summarize:
        return _summarize(args.summarize)
    try:
        names = catalog.select(args.scenario or ["all"])
    except ValueError as exc:
        print(f"broker bench: {exc}", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    code = 0
    for number in range(1, args.repeat + 1):
        if args.repeat > 1:
            print(f"\n=== run {number} of {args.repeat} ===", file=sys.stderr)
        path = args.json
        if path is not None and args.repeat > 1:
            path = path.with_name(f"{path.stem}.{number}{path.suffix}")
        payload, code = _run_once(args, names, path)
        runs.append(payload)
        if code == 130:  # interrupted: what was measured is reported, nothing more is run
            break
    if len(runs) > 1:
        from broker_devtools.bench import summary

        print(f"\n=== {len(runs)} runs ===\n" + summary.summarize(runs))
    return code


def _run_once(
    args: argparse.Namespace, names: Sequence[str], json_path: Path | None
) -> tuple[dict[str, Any], int]:
    """One run of the selection: its table printed, its JSON payload and exit code."""
    # Imported here: they pull in asyncpg, SQLAlchemy and the domain, which other `broker`
    # commands should not pay for at start-up.
    from broker_devtools.bench import report, scenarios

    opts = options(args)
    info = report.machine()
    print(report.machine_line(info), file=sys.stderr)
    results: list[report.ScenarioResult] = []
    began = time.monotonic()
    interrupted = False
    previous = _terminate_as_interrupt()
    try:
        with scenarios.Bench(opts) as bench:
            try:
                results = bench.run(names)
            except KeyboardInterrupt:
                interrupted = True
                results = bench.results
                print("\nbroker bench: interrupted; cleaning up", file=sys.stderr)
    except KeyboardInterrupt:  # a second Ctrl-C during clean-up: it finished anyway
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - began
    info["bench_seconds"] = round(elapsed, 1)
    report.add_ratios(results)
    checks = report.targets(results)
    print(report.table(results, info))
    print(f"\n{len(results)} scenario(s) in {elapsed:.0f}s")
    for parts in (
        report.breakdown_text(report.breakdown(results)),
        report.open_breakdown_text(report.open_breakdown(results)),
    ):
        if parts:
            print("\n" + parts)
    text = report.targets_text(checks)
    if text:
        print("\n" + text)
    run = report.payload(results, info, opts.public(), checks)
    if json_path is not None:
        report.write_json(json_path, run)
        print(f"results written to {json_path}", file=sys.stderr)
    if interrupted:
        return run, 130
    return run, 1 if any(r.failed for r in results) else 0


def _summarize(paths: list[Path]) -> int:
    from broker_devtools.bench import summary

    try:
        runs = summary.load(paths)
    except ValueError as exc:
        print(f"broker bench: {exc}", file=sys.stderr)
        return 2
    print(summary.summarize(runs))
    return 0


def _terminate_as_interrupt() -> signal._HANDLER:
    """SIGTERM unwinds like Ctrl-C, so servers are stopped and databases dropped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m broker_devtools.bench",
        description="Benchmark GetAccessToken against the gRPC echo floor; the method is in "
        "docs/benchmarks.md, the latest results there too.",
    )
    add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args(argv))


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value
