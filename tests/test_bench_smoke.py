"""Smoke test of ``broker bench``: every moving part of the echo and SQLite scenarios runs
(client processes, echo server, a real broker subprocess, seeding, report). Timings are not
checked — only that figures come out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quick_bench_writes_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "broker_devtools.bench", "--quick",
         "--scenario", "echo", "--scenario", "sqlite-hot", "--scenario", "sqlite-hot-grant",
         "--json", str(out)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["nproc"] >= 1
    scenarios = result["scenarios"]
    # Each broker scenario ran in both audit durabilities ("+write": audit.durability = write).
    names = {"echo", "sqlite-hot", "sqlite-hot+write", "sqlite-hot-grant", "sqlite-hot-grant+write"}
    assert set(scenarios) == names
    assert scenarios["sqlite-hot"]["details"]["audit_durability"] == "commit"
    assert scenarios["sqlite-hot+write"]["details"]["audit_durability"] == "write"
    assert scenarios["sqlite-hot+write"]["ratios"]["throughput_vs_echo"] > 0
    assert "sqlite-hot+write: throughput / echo >= 0.75" in done.stdout
    for name in names:
        figures = scenarios[name]
        assert figures["failed"] is None
        assert figures["throughput"] > 0
        assert figures["p99_ms"] > 0
        assert figures["error_count"] == 0
    # Same response shape as the floor, and the ratio printed next to the figure.
    assert scenarios["sqlite-hot"]["response_bytes"] == scenarios["echo"]["response_bytes"]
    assert scenarios["sqlite-hot"]["ratios"]["throughput_vs_echo"] > 0
    assert "sqlite-hot" in done.stdout
    # Every call of the grant scenario went through a grant (a refused one is an error).
    assert scenarios["sqlite-hot-grant"]["details"]["grants"] == 200
    assert "grant cost <= 5 %" in done.stdout
