"""Results: the machine, one record per scenario, ratios to the floor, the performance targets;
printed as an aligned plain-text table and written as JSON."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from broker import __version__
from broker_devtools.bench.catalog import WRITE, base_name

ECHO = "echo"
NO_BROKER = "no-broker"
# Scenarios on PostgreSQL with the cache off: compared with the additive model too.
PG_COLD = ("pg-cold", "scale-10k-cold", "scale-1m-cold")
HOT = ("sqlite-hot", "pg-hot", "scale-10k-hot", "scale-1m-hot")
# The measured ceiling of pg-hot (bench-only brokers, broker_devtools.bench.ceiling).
PG_HOT, NOAUDIT, STUB = "pg-hot", "pg-hot-noaudit", "pg-hot-stub"
ECHO_OPEN = "echo-open"
# Throughput / echo each hot scenario must reach (0.75 where not named): with the audit
# committed without waiting for the flush (audit.durability = "write") pg-hot has less to wait
# for. And the most pg-open's p50 may be, times echo-open's (1.5 where not named).
HOT_LIMITS = {"pg-hot" + WRITE: 0.80}
OPEN_LIMITS = {"pg-open": 2.0}
OPEN = ("sqlite-open", "pg-open")
# pg-open's ceiling at the same fixed rate.
PG_OPEN, OPEN_NOAUDIT, OPEN_STUB = "pg-open", "pg-open-noaudit", "pg-open-stub"


@dataclass
class ScenarioResult:
    name: str
    description: str
    throughput: float | None = None  # successful calls per second
    p50_ms: float | None = None
    p99_ms: float | None = None
    calls: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    rss_mib: float | None = None  # peak RSS (VmHWM) of the server process(es)
    response_bytes: int | None = None
    clients: int = 0
    in_flight: int = 0  # per client process (total = clients * in_flight)
    details: dict[str, Any] = field(default_factory=dict)
    failed: str | None = None  # why the scenario could not be measured
    # Filled by ``add_ratios``.
    ratios: dict[str, float] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mib": _meminfo_mib("MemTotal"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "broker": __version__,
    }
    try:
        import grpc

        info["grpcio"] = grpc.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_mib(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


# -- ratios and targets -------------------------------------------------------------------------


def additive_model(echo: float, no_broker: float) -> float:
    """Throughput if the broker cost exactly one gRPC call plus one fetch-and-decrypt."""
    return 1.0 / (1.0 / echo + 1.0 / no_broker)


def add_ratios(results: Sequence[ScenarioResult]) -> None:
    by_name = {r.name: r for r in results if r.failed is None}
    echo = by_name.get(ECHO)
    none = by_name.get(NO_BROKER)
    echo_open = by_name.get(ECHO_OPEN)
    for result in results:
        if result.failed is not None or result.throughput is None:
            continue
        if base_name(result.name) in (ECHO_OPEN, *OPEN, OPEN_NOAUDIT, OPEN_STUB):
            # A fixed rate: throughput says nothing; latency next to the echo at that rate does.
            if result.name != ECHO_OPEN and echo_open is not None and echo_open.p50_ms:
                if result.p50_ms is not None:
                    result.ratios["p50_vs_echo"] = result.p50_ms / echo_open.p50_ms
                if echo_open.p99_ms and result.p99_ms is not None:
                    result.ratios["p99_vs_echo"] = result.p99_ms / echo_open.p99_ms
            continue
        if echo is not None and echo.throughput and result.name != ECHO:
            result.ratios["throughput_vs_echo"] = result.throughput / echo.throughput
            if echo.p99_ms and result.p99_ms is not None and result.name != NO_BROKER:
                result.ratios["p99_vs_echo"] = result.p99_ms / echo.p99_ms
        if (
            base_name(result.name) in PG_COLD
            and echo is not None
            and echo.throughput
            and none is not None
            and none.throughput
        ):
            model = additive_model(echo.throughput, none.throughput)
            result.ratios["additive_model"] = model
            result.ratios["throughput_vs_model"] = result.throughput / model


def targets(results: Sequence[ScenarioResult]) -> list[dict[str, Any]]:
    """The performance targets that this run can judge: (target, value, limit, met)."""
    by_name = {r.name: r for r in results if r.failed is None}
    out: list[dict[str, Any]] = []

    def check(target: str, value: float | None, limit: float, met: bool | None) -> None:
        if value is not None and met is not None:
            out.append({"target": target, "value": value, "limit": limit, "met": met})

    for name in (*HOT, *(n + WRITE for n in HOT)):
        r = by_name.get(name)
        if r is None:
            continue
        tp = r.ratios.get("throughput_vs_echo")
        least = HOT_LIMITS.get(name, 0.75)
        check(f"{name}: throughput / echo >= {least:g}", tp, least,
              None if tp is None else tp >= least)  # fmt: skip
        p99 = r.ratios.get("p99_vs_echo")
        check(f"{name}: p99 / echo p99 <= 1.5", p99, 1.5, None if p99 is None else p99 <= 1.5)
    for name in (*OPEN, *(n + WRITE for n in OPEN)):
        r = by_name.get(name)
        p50 = None if r is None else r.ratios.get("p50_vs_echo")
        most = OPEN_LIMITS.get(name, 1.5)
        check(f"{name}: p50 / echo-open p50 <= {most:g}", p50, most,
              None if p50 is None else p50 <= most)  # fmt: skip
    for name in (*PG_COLD, *(n + WRITE for n in PG_COLD)):
        r = by_name.get(name)
        ratio = None if r is None else r.ratios.get("throughput_vs_model")
        check(f"{name}: throughput / additive model >= 0.85", ratio, 0.85,
              None if ratio is None else ratio >= 0.85)  # fmt: skip
    for storm in (by_name.get("refresh-storm"), by_name.get("refresh-storm" + WRITE)):
        if storm is not None:
            _storm_targets(storm, check)
    _pair_targets(by_name, check)
    return out


def _storm_targets(storm: ScenarioResult, check: Any) -> None:
    calls = storm.details.get("provider_calls")
    rotations = storm.details.get("rotations")
    if calls is not None and rotations is not None:
        check(f"{storm.name}: provider calls == rotations", float(calls), float(rotations),
              calls == rotations)  # fmt: skip
    # 300 ms at the storm's 50 ms provider: what a caller in a storm may wait (six provider
    # round trips, the per-provider limit's queue included).
    limit = 6 * 1000 * float(storm.details.get("provider_latency_s", 0.05))
    if storm.p99_ms is not None:
        check(f"{storm.name}: p99 <= {limit:g} ms (6 x provider latency)", storm.p99_ms,
              limit, storm.p99_ms <= limit)  # fmt: skip


def _pair_targets(by_name: dict[str, ScenarioResult], check: Any) -> None:
    """Targets that compare two scenarios of the same run (in the default durability)."""
    for temp in ("hot", "cold"):
        small, big = by_name.get(f"scale-10k-{temp}"), by_name.get(f"scale-1m-{temp}")
        if small is not None and big is not None and small.throughput and big.throughput:
            ratio = big.throughput / small.throughput
            check(f"scale {temp}: 1M / 10k throughput within 10 %", ratio, 0.9, ratio >= 0.9)
    for base in ("sqlite-hot", "pg-hot"):
        plain, granted = by_name.get(base), by_name.get(f"{base}-grant")
        if plain is not None and granted is not None and plain.throughput and granted.throughput:
            ratio = granted.throughput / plain.throughput
            check(f"{base}-grant: throughput / {base} >= 0.95 (grant cost <= 5 %)", ratio,
                  0.95, ratio >= 0.95)  # fmt: skip
    big_hot = by_name.get("scale-1m-hot")
    if big_hot is not None and big_hot.rss_mib is not None:
        check("scale-1m-hot: broker RSS < 200 MiB (cache full)", big_hot.rss_mib, 200.0,
              big_hot.rss_mib < 200.0)  # fmt: skip


def breakdown(results: Sequence[ScenarioResult]) -> dict[str, float] | None:
    """pg-hot's CPU per call in µs, split by what each ceiling run takes away: the echo floor
    (gRPC, protobuf, event loop), the server and interceptors (echo → stub: auth, request id,
    metrics, access log), the broker's logic (stub → noaudit: service, cache, decrypt,
    conversion, the group commit's bookkeeping) and the audit writes (noaudit → pg-hot);
    PostgreSQL's CPU apart, with the audit's share of it (noaudit → pg-hot). The differences
    come from separate runs, so they carry those runs' noise (one can even be negative)."""
    by_name = {r.name: r for r in results if r.failed is None}
    runs = [by_name.get(n) for n in (ECHO, STUB, NOAUDIT, PG_HOT)]
    cpu = [None if r is None else r.details.get("server_cpu_us_per_call") for r in runs]
    if any(c is None for c in cpu):
        return None
    echo, stub, noaudit, hot = (float(c) for c in cpu if c is not None)
    out = {
        "echo_floor": echo,
        "server_and_interceptors": stub - echo,
        "broker_logic": noaudit - stub,
        "audit": hot - noaudit,
        "broker_total": hot,
    }
    written = by_name.get(PG_HOT + WRITE)
    if written is not None and written.details.get("server_cpu_us_per_call") is not None:
        out["audit_write"] = float(written.details["server_cpu_us_per_call"]) - noaudit
    pg_hot = by_name[PG_HOT].details.get("postgres_cpu_us_per_call")
    pg_noaudit = by_name[NOAUDIT].details.get("postgres_cpu_us_per_call")
    if pg_hot is not None:
        out["postgres"] = float(pg_hot)
        if pg_noaudit is not None:
            out["postgres_audit"] = float(pg_hot) - float(pg_noaudit)
    for name, key in ((STUB, "stub"), (NOAUDIT, "noaudit"), (PG_HOT, "pg_hot")):
        ratio = by_name[name].ratios.get("throughput_vs_echo")
        if ratio is not None:
            out[f"{key}_vs_echo"] = ratio
    return out


def open_breakdown(results: Sequence[ScenarioResult]) -> dict[str, float] | None:
    """pg-open's median latency in ms at the fixed rate, split the same way: the echo floor at
    that rate, the server and interceptors (echo-open → pg-open-stub), the broker's logic
    (stub → noaudit) and the audit's durable commit (noaudit → pg-open). Medians of separate
    runs do not strictly add up; the steps show where the time goes, not an exact sum."""
    by_name = {r.name: r for r in results if r.failed is None}
    runs = [by_name.get(n) for n in (ECHO_OPEN, OPEN_STUB, OPEN_NOAUDIT, PG_OPEN)]
    p50 = [None if r is None else r.p50_ms for r in runs]
    if any(p is None for p in p50):
        return None
    echo, stub, noaudit, hot = (float(p) for p in p50 if p is not None)
    out = {
        "echo_floor": echo,
        "server_and_interceptors": stub - echo,
        "broker_logic": noaudit - stub,
        "audit": hot - noaudit,
        "pg_open": hot,
    }
    written = by_name.get(PG_OPEN + WRITE)
    if written is not None and written.p50_ms is not None:
        out["audit_write"] = written.p50_ms - noaudit
        out["pg_open_write"] = written.p50_ms
    return out


def open_breakdown_text(parts: dict[str, float] | None) -> str:
    if parts is None:
        return ""
    return (
        "pg-open p50 at the fixed rate: "
        f"echo-open {parts['echo_floor']:.2f} ms"
        f" {_signed(parts['server_and_interceptors'], 'ms')} server and interceptors"
        f" (echo-open -> stub) {_signed(parts['broker_logic'], 'ms')} broker logic"
        f" (stub -> noaudit) {_signed(parts['audit'], 'ms')} audit commit (noaudit -> pg-open)"
        f" = {parts['pg_open']:.2f} ms"
        + (
            f"; with audit.durability = write {_signed(parts['audit_write'], 'ms')} audit"
            f" (noaudit -> pg-open+write) = {parts['pg_open_write']:.2f} ms"
            if "audit_write" in parts
            else ""
        )
    )


def breakdown_text(parts: dict[str, float] | None) -> str:
    if parts is None:
        return ""
    lines = [
        "pg-hot per call, broker CPU: "
        f"echo floor {parts['echo_floor']:.0f} us"
        f" {_signed(parts['server_and_interceptors'])} server and interceptors (echo -> stub)"
        f" {_signed(parts['broker_logic'])} broker logic (stub -> noaudit)"
        f" {_signed(parts['audit'])} audit (noaudit -> pg-hot)"
        f" = {parts['broker_total']:.0f} us"
    ]
    if "audit_write" in parts:
        lines.append(
            f"  audit with audit.durability = write: {_signed(parts['audit_write'])}"
            " (noaudit -> pg-hot+write)"
        )
    if "postgres" in parts:
        share = parts.get("postgres_audit")
        of_it = "" if share is None else f" (audit {share:.0f} us of it: noaudit -> pg-hot)"
        lines.append(f"  PostgreSQL CPU: {parts['postgres']:.0f} us{of_it}")
    ratios = [
        f"{label} {parts[key]:.2f}x"
        for label, key in ((STUB, "stub_vs_echo"), (NOAUDIT, "noaudit_vs_echo"),
                           (PG_HOT, "pg_hot_vs_echo"))
        if key in parts
    ]  # fmt: skip
    if ratios:
        lines.append("  throughput vs echo: " + ", ".join(ratios))
    return "\n".join(lines)


def _signed(value: float, unit: str = "us") -> str:
    """A breakdown step: CPU in whole microseconds, latency in milliseconds to 0.01."""
    digits = 2 if unit == "ms" else 0
    return f"{'+' if value >= 0 else '-'} {abs(value):.{digits}f} {unit}"


# -- output -------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _note(r: ScenarioResult) -> str:
    if r.failed is not None:
        return f"FAILED: {r.failed}"
    parts: list[str] = []
    d = r.details
    if "rows" in d:
        parts.append(f"{d['rows']:,} rows")
    if "additive_model" in r.ratios:
        parts.append(
            f"model {r.ratios['additive_model']:,.0f}/s, "
            f"{r.ratios['throughput_vs_model']:.2f}x model"
        )
    if "provider_calls" in d:
        same = "=" if d["provider_calls"] == d.get("rotations") else "!="
        parts.append(f"provider calls {d['provider_calls']} {same} rotations {d.get('rotations')}")
        if d.get("server_cpu_us_per_refresh") is not None:
            parts.append(
                f"server CPU {d['server_cpu_us_per_refresh']:,} us/refresh "
                f"(fake provider {d.get('provider_cpu_us_per_refresh', 0):,}), "
                f"{d['db_transactions_per_refresh']} db transactions/refresh, "
                f"provider at most {d['provider_max_in_flight']} at once"
            )
    if "cache_filled" in d:
        parts.append(
            f"cache fill: {d['cache_filled']:,} distinct ids served "
            f"(max_entries {d['cache_max_entries']:,})"
        )
    if "p50_vs_echo" in r.ratios:
        parts.append(f"p50 {r.ratios['p50_vs_echo']:.2f}x echo-open")
    if d.get("server_cpu_us_per_call") is not None:
        parts.append(f"server CPU {d['server_cpu_us_per_call']:.0f} us/call")
    if d.get("postgres_cpu_us_per_call") is not None:
        parts.append(f"PostgreSQL CPU {d['postgres_cpu_us_per_call']:.0f} us/call")
    for what in ("audit", "read"):
        batches = d.get(f"{what}_batches")
        if batches:
            sizes = ", ".join(f"<={le} {n}" for le, n in batches["by_size"].items())
            parts.append(f"{what} batches {batches['count']:,}, mean {batches['mean']} ({sizes})")
    if r.errors:
        parts.append("errors " + ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())))
    return "; ".join(parts)


def table(results: Sequence[ScenarioResult], info: dict[str, Any]) -> str:
    header = (
        "scenario", "calls/s", "x echo", "p50 ms", "p99 ms", "p99 x echo", "errors",
        "RSS MiB", "notes",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for r in results:
        rows.append(
            (
                r.name,
                _num(r.throughput),
                _ratio(r.ratios.get("throughput_vs_echo")),
                _num(r.p50_ms, 2),
                _num(r.p99_ms, 2),
                _ratio(r.ratios.get("p99_vs_echo")),
                "-" if r.failed else str(r.error_count),
                _num(r.rss_mib, 1),
                _note(r),
            )
        )
    return "\n".join([machine_line(info), "", layout(rows)])


def layout(rows: Sequence[tuple[str, ...]]) -> str:
    """Rows (the first is the header) as aligned columns: the first left, the others right,
    the last (notes) left unpadded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(row[:-1])
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths) + "  -----")
    return "\n".join(lines)


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("loadavg_at_start")
    return (
        f"machine: {info.get('nproc')} CPU(s) ({info.get('cpu_model')}), "
        f"{info.get('memory_mib')} MiB RAM, Python {info.get('python')}, "
        f"grpcio {info.get('grpcio', '?')}"
        + (f", load average at start {' '.join(load)}" if load else "")
    )


def targets_text(checks: Iterable[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        mark = "met    " if c["met"] else "NOT MET"
        lines.append(f"  [{mark}] {c['target']}: {c['value']:,.2f} (limit {c['limit']:g})")
    return "targets:\n" + "\n".join(lines) if lines else ""


def payload(
    results: Sequence[ScenarioResult],
    info: dict[str, Any],
    settings: dict[str, Any],
    checks: list[dict[str, Any]],
) -> dict[str, Any]:
    """A run as ``--json`` writes it (and ``--summarize`` reads it)."""
    return {
        "machine": info,
        "settings": settings,
        "scenarios": {r.name: {**asdict(r), "error_count": r.error_count} for r in results},
        "targets": checks,
        "pg_hot_breakdown_us": breakdown(results),
        "pg_open_breakdown_ms": open_breakdown(results),
    }


def write_json(path: Path, run: dict[str, Any]) -> None:
    path.write_text(json.dumps(run, indent=2, sort_keys=False, default=str) + "\n")
