"""The measured ceiling of ``broker bench`` (pg-hot-noaudit, pg-hot-stub) and pg-hot's per-call
CPU breakdown: the arithmetic on fixed figures, and a ``--quick`` run against a real
PostgreSQL that checks figures come out (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from broker_devtools.bench import catalog, ceiling, procs
from broker_devtools.bench.report import (
    ScenarioResult,
    add_ratios,
    breakdown,
    breakdown_text,
    open_breakdown,
    open_breakdown_text,
)
from tests.helpers.databases import PG_URL


def _result(name: str, cpu: float, pg: float | None = None, ratio: float = 0.5) -> ScenarioResult:
    details: dict[str, float] = {"server_cpu_us_per_call": cpu}
    if pg is not None:
        details["postgres_cpu_us_per_call"] = pg
    return ScenarioResult(
        name, "", throughput=1.0, details=details, ratios={"throughput_vs_echo": ratio}
    )


def test_breakdown_accounts_for_pg_hot_cpu() -> None:
    results = [
        _result("echo", 190),
        _result("pg-hot", 330, pg=45, ratio=0.65),
        _result("pg-hot-noaudit", 290, pg=5, ratio=0.75),
        _result("pg-hot-stub", 250, pg=0, ratio=0.8),
    ]
    parts = breakdown(results)
    assert parts is not None
    assert parts["echo_floor"] == 190
    assert parts["server_and_interceptors"] == 60
    assert parts["broker_logic"] == 40
    assert parts["audit"] == 40
    assert parts["broker_total"] == 330
    # The steps add up to pg-hot's figure.
    steps = ("echo_floor", "server_and_interceptors", "broker_logic", "audit")
    assert sum(parts[k] for k in steps) == parts["broker_total"]
    assert parts["postgres"] == 45
    assert parts["postgres_audit"] == 40
    assert parts["stub_vs_echo"] == 0.8
    text = breakdown_text(parts)
    assert "echo floor 190 us + 60 us server and interceptors" in text
    assert "+ 40 us audit (noaudit -> pg-hot) = 330 us" in text
    assert "PostgreSQL CPU: 45 us (audit 40 us of it" in text
    assert "pg-hot-stub 0.80x" in text


def test_no_breakdown_without_every_run() -> None:
    assert breakdown([_result("echo", 190), _result("pg-hot", 330)]) is None
    failed = ScenarioResult("pg-hot-stub", "", failed="no PostgreSQL")
    runs = [_result("echo", 190), _result("pg-hot", 330), _result("pg-hot-noaudit", 290)]
    assert breakdown([*runs, failed]) is None
    assert breakdown_text(None) == ""


def _open(name: str, p50: float) -> ScenarioResult:
    return ScenarioResult(name, "", throughput=500.0, p50_ms=p50, p99_ms=p50 * 3)


def test_open_breakdown_splits_pg_open_p50() -> None:
    results = [
        _open("echo-open", 0.5),
        _open("pg-open-stub", 0.625),
        _open("pg-open-noaudit", 0.75),
        _open("pg-open", 1.25),
    ]
    add_ratios(results)
    parts = open_breakdown(results)
    assert parts == {
        "echo_floor": 0.5,
        "server_and_interceptors": 0.125,
        "broker_logic": 0.125,
        "audit": 0.5,
        "pg_open": 1.25,
    }
    text = open_breakdown_text(parts)
    assert "echo-open 0.50 ms + 0.12 ms server and interceptors" in text
    assert "+ 0.50 ms audit commit (noaudit -> pg-open) = 1.25 ms" in text
    # The ceiling runs are compared with the echo at the same rate (no target of their own).
    assert results[1].ratios["p50_vs_echo"] == 1.25
    assert "throughput_vs_echo" not in results[1].ratios
    assert open_breakdown(results[:3]) is None
    assert open_breakdown_text(None) == ""


def test_ceiling_group_and_standard_run() -> None:
    assert catalog.select(["ceiling"]) == ["echo", "pg-hot", "pg-hot-noaudit", "pg-hot-stub"]
    # In the standard run (`make bench` runs every scenario).
    assert {"pg-hot-noaudit", "pg-hot-stub"} <= set(catalog.GROUPS["all"])
    assert catalog.select(["open"]) == [
        "echo-open", "sqlite-open", "pg-open", "pg-open-noaudit", "pg-open-stub",
    ]  # fmt: skip
    assert {"pg-open-noaudit", "pg-open-stub"} <= set(catalog.GROUPS["all"])


def test_cpu_used_counts_survivors_and_newcomers() -> None:
    before = {1: 1.0, 2: 5.0, 3: 2.0}
    after = {1: 1.5, 2: 6.0, 4: 0.25}  # 3 ended (its last stretch is lost), 4 is new
    assert procs.cpu_used(before, after) == pytest.approx(1.75)


def test_a_substitution_the_app_lacks_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="no 'not_there'"):
        ceiling._replace("not_there", object())


@pytest.mark.postgres
def test_quick_ceiling_run_writes_the_breakdown(tmp_path: Path) -> None:
    if not PG_URL:
        pytest.skip("PostgreSQL not configured: set BROKER_TEST_DATABASE_URL")
    database = make_url(PG_URL).set(drivername="postgresql")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "broker_devtools.bench", "--quick", "--scenario", "ceiling",
         "--scenario", "echo-open", "--scenario", "pg-open", "--scenario", "pg-open-noaudit",
         "--scenario", "pg-open-stub",
         "--database-url", database.render_as_string(hide_password=False), "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    scenarios = result["scenarios"]
    # Each audited scenario in both audit durabilities; the ceiling and echo runs once.
    assert set(scenarios) == {
        "echo", "pg-hot", "pg-hot+write", "pg-hot-noaudit", "pg-hot-stub",
        "echo-open", "pg-open", "pg-open+write", "pg-open-noaudit", "pg-open-stub",
    }  # fmt: skip
    assert scenarios["pg-hot"]["details"]["audit_durability"] == "commit"
    assert scenarios["pg-hot+write"]["details"]["audit_durability"] == "write"
    assert "audit_durability" not in scenarios["pg-hot-stub"]["details"]
    for name, figures in scenarios.items():
        assert figures["failed"] is None, name
        assert figures["throughput"] > 0
        assert figures["error_count"] == 0
        assert figures["details"]["server_cpu_us_per_call"] > 0
    for name in ("pg-hot", "pg-hot-noaudit", "pg-hot-stub"):
        # PostgreSQL runs on this machine in the test setup, so its CPU is read from /proc.
        assert scenarios[name]["details"]["postgres_cpu_us_per_call"] is not None
    assert scenarios["pg-hot-stub"]["details"]["variant"] == "stub"
    assert scenarios["pg-hot-noaudit"]["details"]["variant"] == "noaudit"
    # Same response shape as the floor, from the stub too.
    assert scenarios["pg-hot-stub"]["response_bytes"] == scenarios["echo"]["response_bytes"]
    parts = result["pg_hot_breakdown_us"]
    assert parts["broker_total"] == scenarios["pg-hot"]["details"]["server_cpu_us_per_call"]
    assert "pg-hot per call, broker CPU: echo floor" in done.stdout
    assert "PostgreSQL CPU" in done.stdout
    assert "audit_write" in parts
    assert "(noaudit -> pg-hot+write)" in done.stdout
    # The open-loop ceiling ran at the fixed rate, as bench-only brokers, and is split out.
    assert scenarios["pg-open-stub"]["details"]["variant"] == "stub"
    assert scenarios["pg-open-noaudit"]["details"]["variant"] == "noaudit"
    assert scenarios["pg-open-stub"]["ratios"]["p50_vs_echo"] > 0
    opened = result["pg_open_breakdown_ms"]
    assert opened["pg_open"] == scenarios["pg-open"]["p50_ms"]
    assert "pg-open p50 at the fixed rate: echo-open" in done.stdout
    assert opened["pg_open_write"] == scenarios["pg-open+write"]["p50_ms"]
    # The write runs are judged against the echo of the same run too.
    assert scenarios["pg-hot+write"]["ratios"]["throughput_vs_echo"] > 0
    assert scenarios["pg-open+write"]["ratios"]["p50_vs_echo"] > 0
