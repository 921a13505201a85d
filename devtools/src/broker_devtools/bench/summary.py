"""Several ``broker bench --json`` runs summed up: each figure as the median and range of the
runs, each target as "met in k of N". One run on a shared machine says little; the noise range
of a few consecutive runs is what a result should be quoted with (docs/benchmarks.md).

    broker bench --summarize run1.json run2.json run3.json
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker_devtools.bench import report
from broker_devtools.bench.catalog import base_name

Run = dict[str, Any]
# A figure of one scenario in one run, or None where that run lacks it.
Figure = Callable[[dict[str, Any]], float | None]


def load(paths: Sequence[Path]) -> list[Run]:
    """The JSON payloads; ValueError naming the file that is not one."""
    runs = []
    for path in paths:
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a `broker bench --json` file ({exc})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("scenarios"), dict):
            raise ValueError(f"{path}: not a `broker bench --json` file (no scenarios)")
        runs.append(payload)
    return runs


def spread(values: Sequence[float | None], digits: int = 2, unit: str = "") -> str:
    """``median (min-max)`` of the values present; ``-`` if none."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    mid = statistics.median(present)
    text = f"{mid:,.{digits}f}{unit}"
    if len(present) > 1 and min(present) != max(present):
        text += f" ({min(present):,.{digits}f}-{max(present):,.{digits}f})"
    return text


def _ratio(key: str) -> Figure:
    return lambda s: s.get("ratios", {}).get(key)


def _detail(key: str) -> Figure:
    return lambda s: s.get("details", {}).get(key)


def _field(key: str) -> Figure:
    return lambda s: s.get(key)


def _mean(histogram: str) -> Figure:
    return lambda s: (s.get("details", {}).get(histogram) or {}).get("mean")


# (column title, figure, digits, unit)
_COLUMNS: tuple[tuple[str, Figure, int, str], ...] = (
    ("calls/s", _field("throughput"), 0, ""),
    ("x echo", _ratio("throughput_vs_echo"), 2, ""),
    ("p50 ms", _field("p50_ms"), 2, ""),
    ("p99 x echo", _ratio("p99_vs_echo"), 2, ""),
    ("server CPU us/call", _detail("server_cpu_us_per_call"), 0, ""),
    ("PostgreSQL CPU us/call", _detail("postgres_cpu_us_per_call"), 0, ""),
)
# Extra figures some scenarios have, shown after the columns when present: (title, figure,
# digits, unit, only for these scenarios or None for any).
_NOTES: tuple[tuple[str, Figure, int, str, tuple[str, ...] | None], ...] = (
    ("x additive model", _ratio("throughput_vs_model"), 2, "", None),
    ("p50 x echo-open", _ratio("p50_vs_echo"), 2, "", None),
    ("p99", _field("p99_ms"), 0, " ms", ("refresh-storm",)),
    ("CPU per refresh", _detail("server_cpu_us_per_refresh"), 0, " us", None),
    ("RSS", _field("rss_mib"), 0, " MiB", ("scale-1m-hot",)),
    ("audit batch mean", _mean("audit_batches"), 1, "", None),
    ("reads per statement", _mean("read_batches"), 1, "", None),
)


def _scenario_names(runs: Sequence[Run]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for name in run["scenarios"]:
            if name not in names:
                names.append(name)
    return names


def _figures(runs: Sequence[Run], name: str, figure: Figure) -> list[float | None]:
    out: list[float | None] = []
    for run in runs:
        scenario = run["scenarios"].get(name)
        if scenario is None or scenario.get("failed"):
            out.append(None)
            continue
        value = figure(scenario)
        out.append(None if value is None else float(value))
    return out


def _notes(runs: Sequence[Run], name: str) -> str:
    parts = []
    for title, figure, digits, unit, only in _NOTES:
        if only is not None and base_name(name) not in only:
            continue
        text = spread(_figures(runs, name, figure), digits, unit)
        if text != "-":
            parts.append(f"{title} {text}")
    if len(runs) > 1:
        # Each run's own ratio (taken inside that run, against its own echo): the figures a
        # median is quoted from.
        for title, key in (("x echo by run", "throughput_vs_echo"),
                           ("p50 x echo-open by run", "p50_vs_echo")):  # fmt: skip
            values = _figures(runs, name, _ratio(key))
            if any(v is not None for v in values):
                listed = ", ".join("-" if v is None else f"{v:.2f}" for v in values)
                parts.append(f"{title} {listed}")
    if base_name(name) == "refresh-storm":
        equal = sum(
            1
            for run in runs
            if (s := run["scenarios"].get(name))
            and not s.get("failed")
            and s["details"].get("provider_calls") == s["details"].get("rotations")
        )
        parts.append(f"provider calls = rotations in {equal} of {len(runs)}")
    failed = sum(1 for run in runs if (run["scenarios"].get(name) or {}).get("failed"))
    if failed:
        parts.append(f"failed in {failed} of {len(runs)}")
    return "; ".join(parts)


def table(runs: Sequence[Run]) -> str:
    header = ("scenario", *(title for title, *_ in _COLUMNS), "notes")
    rows: list[tuple[str, ...]] = [header]
    for name in _scenario_names(runs):
        cells = [spread(_figures(runs, name, f), digits, unit) for _, f, digits, unit in _COLUMNS]
        rows.append((name, *cells, _notes(runs, name)))
    return report.layout(rows)


def targets(runs: Sequence[Run]) -> str:
    """Each target the runs judged: its values and in how many runs it was met."""
    seen: dict[str, list[tuple[float, bool]]] = {}
    for run in runs:
        for check in run.get("targets") or ():
            seen.setdefault(check["target"], []).append((float(check["value"]), check["met"]))
    lines = []
    for target, checks in seen.items():
        met = sum(1 for _, ok in checks if ok)
        values = ", ".join(f"{v:.2f}" for v, _ in checks)
        lines.append(f"  met in {met} of {len(runs)}: {target} ({values})")
    return "\n".join(lines)


def breakdowns(runs: Sequence[Run]) -> str:
    lines = []
    for key, title, digits, unit in (
        ("pg_hot_breakdown_us", "pg-hot broker CPU per call", 0, " us"),
        ("pg_open_breakdown_ms", "pg-open p50", 2, " ms"),
    ):
        parts: list[dict[str, float]] = [run[key] for run in runs if run.get(key)]
        if not parts:
            continue
        steps = ", ".join(
            f"{step.replace('_', ' ')} {_step(step, [p.get(step) for p in parts], digits, unit)}"
            for step in parts[0]
        )
        lines.append(f"{title} ({len(parts)} runs): {steps}")
    return "\n".join(lines)


def _step(step: str, values: list[float | None], digits: int, unit: str) -> str:
    if step.endswith("_vs_echo"):  # a throughput ratio, not a time
        return spread(values, 2, "x")
    return spread(values, digits, unit)


def summarize(runs: Sequence[Run]) -> str:
    loads = [run.get("machine", {}).get("loadavg_at_start") for run in runs]
    head = f"{len(runs)} run(s): median (min-max) of each figure; ratios are taken inside each run"
    if any(loads):
        head += "; 1-min load average at start " + ", ".join(x[0] for x in loads if x)
    out = [head, "", table(runs)]
    text = targets(runs)
    if text:
        out += ["", "targets:", text]
    text = breakdowns(runs)
    if text:
        out += ["", text]
    return "\n".join(out)
