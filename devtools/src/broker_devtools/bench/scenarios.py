"""The scenarios and the run that owns every process, file and database they create.

Each broker scenario runs a real ``python -m broker serve`` (after ``broker migrate``) with a
temporary configuration, a fresh keyring and one caller; rows are seeded directly into the
database, encrypted exactly as the broker encrypts them (``seed``). ``Bench`` is a context
manager: on exit — normal, error or Ctrl-C — it stops every server it started, drops every
PostgreSQL database it created and removes its temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
from sqlalchemy.engine import make_url

from broker.config import load_settings
from broker.crypto import generate_key, parse_keyring
from broker.domain.tokens import ACCESS, TokenCipher
from broker.model import Owner
from broker.server.callers import hash_token
from broker_devtools.bench import data, echo, load, procs, seed
from broker_devtools.bench.catalog import (
    DEFAULT_DATABASE_URL,
    DURABILITIES,
    SCENARIOS,
    WRITE,
    Scenario,
    audited,
)
from broker_devtools.bench.report import ScenarioResult

# A token URL nothing listens on: outside the storm no seeded token is due for refresh, so the
# provider is configured (tokens must belong to a known provider) but never called.
_UNUSED_TOKEN_URL = "http://127.0.0.1:9/token"
_SECRET_ENV = "BENCH_ACME_SECRET"
# Ceiling variants (broker_devtools.bench.ceiling), named by the suffix of their scenario.
_CEILING = ("noaudit", "stub")


@dataclass
class Options:
    duration: float = 10.0  # measured window per scenario, seconds
    warmup: float = 2.0  # excluded from the figures
    clients: int = 2  # load-generating processes
    concurrency: int = 16  # calls in flight per client process
    database_url: str = DEFAULT_DATABASE_URL  # PostgreSQL to create bench_* databases in
    rows: int = 1_000  # integrations for the SQLite/PostgreSQL hot and cold scenarios
    scale_small: int = 10_000
    scale_large: int = 1_000_000
    # Hot scale runs spread calls over this many integrations (all of them fit in the cache);
    # cold scale runs spread them over every stored integration.
    working_set: int = 10_000
    storm_size: int = 1_000
    storm_in_flight: int = 200  # total, over all client processes
    storm_repeat: int = 2  # requests per integration, adjacent so duplicates overlap
    provider_latency: float = 0.05
    fill_seconds: float = 150.0  # cap on the cache fill before scale-1m-hot
    prewarm_seconds: float = 30.0  # cap on the pre-warm sweep before a timed run
    no_broker_in_flight: int = 8  # concurrent fetch+decrypt tasks of the in-process loop
    seed_workers: int = 2  # processes encrypting and COPYing a large seed
    workers: int | None = None  # passed on as `broker serve --workers N` when set
    open_rate: float = 500.0  # calls/s of the open-loop scenarios, over all client processes
    # audit.durability of the brokers: each audited scenario runs once in each, in this order.
    durabilities: tuple[str, ...] = DURABILITIES

    def public(self) -> dict[str, Any]:
        """Settings for the report (the database password hidden)."""
        out = dict(self.__dict__)
        out["database_url"] = make_url(self.database_url).render_as_string(hide_password=True)
        return out


def quick() -> Options:
    """Tiny durations and seeds: a smoke test of every moving part in seconds."""
    return Options(
        duration=1.0,
        warmup=0.5,
        clients=1,
        concurrency=4,
        rows=200,
        scale_small=1_000,
        scale_large=1_000,
        working_set=500,
        storm_size=50,
        storm_in_flight=20,
        fill_seconds=10.0,
        prewarm_seconds=10.0,
        no_broker_in_flight=4,
    )


@dataclass
class Dataset:
    key: str
    salt: str
    rows: int
    url: str  # the broker's database URL
    dsn: str | None  # asyncpg DSN (PostgreSQL only)
    config_dir: Path
    seed_seconds: float = 0.0
    pg_name: str | None = None
    token_url: str = _UNUSED_TOKEN_URL


@dataclass
class Bench:
    options: Options
    say: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr))

    def __post_init__(self) -> None:
        self.run_id = secrets.token_hex(3)
        self.tmp = Path(tempfile.mkdtemp(prefix="broker-bench-"))
        self.keyring = generate_key("bench")
        self.bearer = "cb_bench_" + secrets.token_urlsafe(24)
        self.issuer = "cb_bench_issuer_" + secrets.token_urlsafe(24)
        self.servers: list[procs.BrokerServer] = []
        self.databases: list[str] = []
        self.datasets: dict[str, Dataset] = {}
        self.results: list[ScenarioResult] = []
        self.started = time.monotonic()
        self._pg_problem: str | None = None
        self._metrics_port: int | None = None
        self._pg_checked = False
        self._durability = "commit"  # of the brokers started now

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for server in list(self.servers):
            with contextlib.suppress(Exception):
                server.stop()
        self.servers.clear()
        for name in list(self.datasets):
            with contextlib.suppress(Exception):
                self.drop_dataset(name)
        for database in list(self.databases):
            with contextlib.suppress(Exception):
                asyncio.run(self._drop_database(database))
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log(self, message: str) -> None:
        self.say(f"[{time.monotonic() - self.started:6.1f}s] {message}")

    # -- the run --------------------------------------------------------------------------------

    def run(self, names: Sequence[str]) -> list[ScenarioResult]:
        by_name = {s.name: s for s in SCENARIOS}
        # Kept on the instance so an interrupted run still reports what it measured.
        results = self.results
        for number, name in enumerate(names):
            for durability in self.options.durabilities if audited(name) else ("commit",):
                results.append(self._run_one(by_name[name], durability))
            # Drop data nobody later in the run needs (the 1M table is ~0.8 GB).
            later = {by_name[n].dataset for n in names[number + 1 :]}
            for key in list(self.datasets):
                if key not in later:
                    self.drop_dataset(key)
        return results

    def _run_one(self, scenario: Scenario, durability: str) -> ScenarioResult:
        """The scenario with its brokers in this audit durability; a "write" result is
        named with the ``WRITE`` suffix."""
        suffix = WRITE if durability == "write" else ""
        name = scenario.name + suffix
        description = scenario.description + (" (audit.durability = write)" if suffix else "")
        self._durability = durability
        self.log(f"{name}: {description}")
        try:
            result = self._dispatch(scenario)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            self.log(f"{name}: FAILED: {exc}")
            return ScenarioResult(name, description, failed=_short(exc))
        finally:
            self._durability = "commit"
        result.name, result.description = name, description
        if audited(scenario.name):
            result.details["audit_durability"] = durability
        self.log(f"{name}: {_summary(result)}")
        return result

    def _dispatch(self, scenario: Scenario) -> ScenarioResult:
        o = self.options
        name = scenario.name
        if name in ("echo", "echo-open"):
            return self.echo(scenario)
        if name == "no-broker":
            return self.no_broker(scenario)
        if name == "refresh-storm":
            return self.storm(scenario)
        hot = name.endswith(("-hot", "-open", "-hot-grant", *_CEILING))
        if name.startswith(("sqlite", "pg")):
            ds = self.dataset(name.partition("-")[0], o.rows)
            grant = name.endswith("-grant")
            variant = next((v for v in _CEILING if name.endswith(f"-{v}")), None)
            return self.broker_run(
                scenario, ds, hot=hot, count=ds.rows, grant=grant, variant=variant
            )
        rows = o.scale_small if name.startswith("scale-10k") else o.scale_large
        ds = self.dataset(scenario.dataset or "", rows)
        working = min(o.working_set, rows)
        if hot:
            fill = rows if name.startswith("scale-1m") else 0
            return self.broker_run(scenario, ds, hot=True, count=working, fill=fill)
        # Cold: every stored row is equally likely, so the database really works at this size.
        return self.broker_run(scenario, ds, hot=False, count=rows)

    # -- scenarios ------------------------------------------------------------------------------

    def echo(self, scenario: Scenario) -> ScenarioResult:
        o = self.options
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        response = data.sample_response()
        proc = ctx.Process(
            target=echo.serve, args=(theirs, response.SerializeToString()), name="bench-echo"
        )
        proc.start()
        theirs.close()
        try:
            if not ours.poll(60):
                raise RuntimeError("echo server did not start")
            port = int(ours.recv())
            target = load.Target(f"127.0.0.1:{port}", bearer=None, salt="echo")
            assert proc.pid is not None
            cpu = procs.cpu_seconds(proc.pid)
            result = load.run(target, self._timed(0, o.rows, scenario), o.clients,
                              o.concurrency, self._timed_timeout())  # fmt: skip
            cpu_used = procs.cpu_seconds(proc.pid) - cpu
            rss = procs.peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            ours.close()
        details = {
            "constant_response_bytes": response.ByteSize(),
            "server_cpu_us_per_call": _per_call_us(cpu_used, result),
        }
        return _from_load(scenario, result, rss, details)

    def no_broker(self, scenario: Scenario) -> ScenarioResult:
        o = self.options
        ds = self.dataset("pg", o.rows)
        assert ds.dsn is not None
        result = _run_loop(
            _no_broker_loop(
                ds.dsn, ds.salt, ds.rows, self.keyring, o.warmup, o.duration, o.no_broker_in_flight
            )
        )
        return _from_load(
            scenario,
            result,
            None,
            {
                "rows": ds.rows,
                "in_process": True,
                "driver": "asyncpg",
                "pool": o.no_broker_in_flight,
            },
        )

    def broker_run(
        self,
        scenario: Scenario,
        ds: Dataset,
        *,
        hot: bool,
        count: int,
        fill: int = 0,
        grant: bool = False,
        variant: str | None = None,
    ) -> ScenarioResult:
        """One broker, one timed run over integrations 0..count-1.

        Hot runs first request every integration of the working set once, so the measured
        window sees a warm cache (the warm-up alone would leave some ids never requested);
        with ``fill``, that sweep goes over ``fill`` ids instead (capped at the cache bound).
        Cold runs rely on the warm-up period only. ``variant``: a ceiling broker
        (``broker_devtools.bench.ceiling``) instead of ``broker serve``."""
        o = self.options
        details: dict[str, Any] = {
            "rows": ds.rows,
            "seed_seconds": round(ds.seed_seconds, 2),
            "working_set": count,
            "cache": "on" if hot else "off",
        }
        if variant is not None:
            details["variant"] = variant
        server = self.start_broker(
            ds, {} if hot else {"BROKER_CACHE__ENABLED": "false"}, grant=grant, variant=variant
        )
        try:
            target = load.Target(server.address, bearer=self.bearer, salt=ds.salt)
            if grant:
                # The runner requires a grant: one per user (the issuer creates them over
                # gRPC, as an orchestrator would), each presented with that user's calls.
                tokens = asyncio.run(_create_grants(server.address, self.issuer, count))
                target = load.Target(server.address, self.bearer, ds.salt, tokens)
                details["grants"] = len(tokens)
            if fill:
                # Fill the cache to its bound with distinct integrations so the RSS figure is
                # the one of a full cache over a large table (capped in time; reported).
                entries = min(fill, _cache_max_entries())
                self.log(f"{scenario.name}: filling the cache with {entries:,} integrations")
                sweep = load.run(target, load.Sweep(0, entries, 1, o.fill_seconds), o.clients,
                                 o.concurrency, o.fill_seconds + 120)  # fmt: skip
                details.update(
                    cache_max_entries=_cache_max_entries(),
                    cache_filled=sweep.calls,
                    fill_seconds=round(sweep.seconds, 1),
                    fill_throughput=round(sweep.throughput),
                    fill_errors=sweep.errors,
                )
            elif hot:
                load.run(target, load.Sweep(0, count, 1, o.prewarm_seconds), o.clients,
                         o.concurrency, o.prewarm_seconds + 120)  # fmt: skip
            audited = self._audit_events(ds) if variant is not None else None
            cpu = procs.cpu_seconds(server.pid)
            pg_cpu = self._postgres_cpu(ds)
            batches = self._histograms()
            result = load.run(target, self._timed(0, count, scenario), o.clients,
                              o.concurrency, self._timed_timeout())  # fmt: skip
            details["server_cpu_us_per_call"] = _per_call_us(
                procs.cpu_seconds(server.pid) - cpu, result
            )
            if pg_cpu is not None:
                after = self._postgres_cpu(ds) or {}
                details["postgres_cpu_us_per_call"] = _per_call_us(
                    procs.cpu_used(pg_cpu, after), result
                )
            after_run = self._histograms()
            for name in _HISTOGRAMS:
                if delta := _batch_delta(batches.get(name, {}), after_run.get(name, {})):
                    details[name] = delta
            if audited is not None:
                # A ceiling broker whose substitution did not take would measure the real one.
                written = self._audit_events(ds) - audited
                if written:
                    raise RuntimeError(f"the {variant} broker wrote {written} audit events")
            rss = procs.peak_rss_mib(server.pid)
            if not server.alive():
                raise RuntimeError("the broker exited during the run:\n  " + _tail(server))
        finally:
            details["exit_code"] = self.stop_broker(server)
        return _from_load(scenario, result, rss, details)

    def storm(self, scenario: Scenario) -> ScenarioResult:
        from broker_devtools.fakeauth import FakeAuthServer

        o = self.options
        with FakeAuthServer(latency=o.provider_latency, expires_in=3600) as fake:
            grants = tuple(fake.issue_grant(scopes=data.SCOPES) for _ in range(o.storm_size))
            # Seeded already expired: every first request must refresh, in the foreground.
            ds = self.dataset(
                "storm", o.storm_size, tokens=grants, expires_at=datetime.now(UTC),
                token_url=fake.token_url,
            )  # fmt: skip
            assert ds.dsn is not None
            server = self.start_broker(
                ds, {"BROKER_REFRESH__BACKGROUND": "false", _SECRET_ENV: fake.client_secret}
            )
            # Transactions committed in the storm's database (every backend's, flushed when the
            # broker's connections close): the database round trips a refresh costs.
            xacts = asyncio.run(_fetch_value(ds.dsn, _XACTS))
            try:
                clients = max(1, min(o.clients, o.storm_in_flight))
                in_flight = max(1, o.storm_in_flight // clients)
                target = load.Target(server.address, bearer=self.bearer, salt=ds.salt)
                cpu = procs.cpu_seconds(server.pid)
                # This process's CPU: the fake provider's threads (the load runs elsewhere).
                here = time.process_time()
                result = load.run(target, load.Sweep(0, ds.rows, o.storm_repeat), clients,
                                  in_flight, 600)  # fmt: skip
                here = time.process_time() - here
                cpu = procs.cpu_seconds(server.pid) - cpu
                rss = procs.peak_rss_mib(server.pid)
                provider_calls = fake.refresh_calls
                most_at_once = fake.max_in_flight
            finally:
                code = self.stop_broker(server)
            rotations = asyncio.run(
                _fetch_value(
                    ds.dsn,
                    "SELECT count(*) FROM integrations WHERE last_refreshed_at IS NOT NULL",
                )
            )
            xacts = asyncio.run(_fetch_value(ds.dsn, _XACTS)) - xacts
        # Its tokens are refreshed now: a storm in the other durability seeds its own.
        self.drop_dataset(ds.key)
        return _from_load(
            scenario,
            result,
            rss,
            {
                "rows": ds.rows,
                "requests_per_integration": o.storm_repeat,
                "in_flight_total": clients * in_flight,
                "provider_latency_s": o.provider_latency,
                "provider_calls": provider_calls,
                "rotations": int(rotations),
                "provider_max_in_flight": most_at_once,
                "server_cpu_us_per_refresh": round(cpu / rotations * 1e6) if rotations else None,
                "provider_cpu_us_per_refresh": round(here / rotations * 1e6) if rotations else None,
                # Includes the load's own calls; the audit's batches are shared between calls.
                "db_transactions_per_refresh": round(xacts / rotations, 2) if rotations else None,
                "exit_code": code,
            },
        )

    # -- brokers --------------------------------------------------------------------------------

    def start_broker(
        self,
        ds: Dataset,
        extra_env: dict[str, str],
        *,
        grant: bool = False,
        variant: str | None = None,
    ) -> procs.BrokerServer:
        env = procs.broker_env(
            {"BROKER_KEYS": self.keyring, "BROKER_AUDIT__DURABILITY": self._durability, **extra_env}
        )
        env.setdefault(_SECRET_ENV, "unused")
        args = ("--workers", str(self.options.workers)) if self.options.workers else ()
        if variant is not None:
            args = ()  # one process: the substitutions are made in it
        server = procs.BrokerServer(self._config(ds, grant=grant), env, args, variant)
        self.servers.append(server)
        server.start()
        self.log(f"broker pid {server.pid} serving on {server.address} ({ds.key})")
        return server

    def stop_broker(self, server: procs.BrokerServer) -> int | None:
        code = server.stop()
        if server in self.servers:
            self.servers.remove(server)
        return code

    def _port(self) -> int:
        """0 (any free port) for one process; workers share a port, so it must be fixed."""
        if not self.options.workers or self.options.workers < 2:
            return 0
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return int(probe.getsockname()[1])

    def _config(self, ds: Dataset, *, grant: bool = False) -> Path:
        path = ds.config_dir / "broker.toml"
        self._metrics_port = _free_port()
        path.write_text(
            "\n".join(
                [
                    "[server]",
                    f'listen = "127.0.0.1:{self._port()}"',
                    f'environment = "{data.ENVIRONMENT}"',
                    "[database]",
                    f"url = {_toml_string(ds.url)}",
                    "[metrics]",
                    f'listen = "127.0.0.1:{self._metrics_port}"',
                    "[callers.bench]",
                    f'token_sha256 = "{hash_token(self.bearer)}"',
                    f"requires_grant = {'true' if grant else 'false'}",
                    "[callers.bench-issuer]",
                    f'token_sha256 = "{hash_token(self.issuer)}"',
                    f"[providers.{data.PROVIDER}]",
                    f"token_url = {_toml_string(ds.token_url)}",
                    'client_id = "fake-client"',
                    f'client_secret_env = "{_SECRET_ENV}"',
                    "rotates_refresh_tokens = true",
                    "",
                ]
            )
        )
        return path

    # -- data -----------------------------------------------------------------------------------

    def dataset(
        self,
        key: str,
        rows: int,
        *,
        tokens: tuple[tuple[str, str], ...] = (),
        expires_at: datetime | None = None,
        token_url: str = _UNUSED_TOKEN_URL,
    ) -> Dataset:
        """The seeded, migrated database for ``key`` (made on first use)."""
        if key in self.datasets:
            return self.datasets[key]
        config_dir = self.tmp / key
        config_dir.mkdir(parents=True, exist_ok=True)
        salt = f"{self.run_id}-{key}"
        if key == "sqlite":
            path = config_dir / "broker.db"
            ds = Dataset(key, salt, rows, f"sqlite+aiosqlite:///{path}", None, config_dir)
        else:
            self._require_postgres()
            name = f"bench_{self.run_id}_{key.replace('-', '_')}"
            asyncio.run(self._create_database(name))
            ds = Dataset(
                key, salt, rows, self._url(name, "postgresql+asyncpg"),
                self._url(name, "postgresql"), config_dir, pg_name=name,
            )  # fmt: skip
        ds.token_url = token_url
        self.datasets[key] = ds
        env = procs.broker_env({"BROKER_KEYS": self.keyring})
        procs.run_cli(self._config(ds), env, "migrate")
        plan = seed.SeedPlan(
            salt=salt, start=0, count=rows, keyring=self.keyring, expires_at=expires_at,
            tokens=tokens,
        )  # fmt: skip
        self.log(f"seeding {rows:,} integrations into {key}")
        if ds.dsn is None:
            ds.seed_seconds = seed.seed_sqlite(str(config_dir / "broker.db"), plan)
        else:
            ds.seed_seconds = seed.seed_postgres(ds.dsn, plan, self.options.seed_workers)
        self.log(f"seeded {rows:,} integrations in {ds.seed_seconds:.1f}s")
        return ds

    def drop_dataset(self, key: str) -> None:
        ds = self.datasets.pop(key)
        if ds.pg_name is not None:
            asyncio.run(self._drop_database(ds.pg_name))
        shutil.rmtree(ds.config_dir, ignore_errors=True)

    def _url(self, database: str, driver: str) -> str:
        url = make_url(self.options.database_url).set(drivername=driver, database=database)
        return url.render_as_string(hide_password=False)

    def _require_postgres(self) -> None:
        if not self._pg_checked:
            self._pg_checked = True
            try:
                asyncio.run(
                    _fetch_value(self._url(_admin_db(self.options), "postgresql"), "SELECT 1")
                )
            except Exception as exc:
                where = self.options.public()["database_url"]
                self._pg_problem = f"PostgreSQL unavailable at {where}: {_short(exc)}"
        if self._pg_problem is not None:
            raise RuntimeError(self._pg_problem)

    async def _create_database(self, name: str) -> None:
        conn = await asyncpg.connect(self._url(_admin_db(self.options), "postgresql"))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
            self.databases.append(name)
        finally:
            await conn.close()

    async def _drop_database(self, name: str) -> None:
        conn = await asyncpg.connect(self._url(_admin_db(self.options), "postgresql"))
        try:
            # FORCE: a broker killed mid-run may leave a connection behind.
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            if name in self.databases:
                self.databases.remove(name)
        finally:
            await conn.close()

    # -- plans ----------------------------------------------------------------------------------

    def _timed(self, first: int, count: int, scenario: Scenario | None = None) -> load.Timed:
        o = self.options
        rate = None
        if scenario is not None and "-open" in scenario.name:  # pg-open-stub too
            rate = o.open_rate / o.clients
        return load.Timed(o.duration, o.warmup, first, count, rate)

    def _histograms(self) -> dict[str, dict[str, float]]:
        """The broker's batch-size histograms (cumulative), from its metrics endpoint."""
        if self._metrics_port is None:
            return {}
        try:
            body = httpx.get(f"http://127.0.0.1:{self._metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        out: dict[str, dict[str, float]] = {}
        for line in body.splitlines():
            for name, metric in _HISTOGRAMS.items():
                if line.startswith(metric):
                    key, _, value = line.rpartition(" ")
                    out.setdefault(name, {})[key.removeprefix(metric)] = float(value)
        return out

    def _postgres_cpu(self, ds: Dataset) -> dict[int, float] | None:
        """CPU so far of the PostgreSQL backends serving the dataset's database (the broker's
        connections), by pid; None when PostgreSQL is not on this machine."""
        if ds.pg_name is None:
            return None
        rows = asyncio.run(
            _fetch_all(
                self._url(_admin_db(self.options), "postgresql"),
                "SELECT pid FROM pg_stat_activity WHERE datname = $1",
                ds.pg_name,
            )
        )
        pids = [int(r[0]) for r in rows]
        if not pids or not all(procs.is_postgres(pid) for pid in pids):
            return None
        return procs.cpu_by_pid(pids)

    def _audit_events(self, ds: Dataset) -> int:
        if ds.dsn is None:
            return 0
        return int(asyncio.run(_fetch_value(ds.dsn, "SELECT count(*) FROM audit_events")))

    def _timed_timeout(self) -> float:
        return self.options.warmup + self.options.duration + 90


# -- the in-process "no broker" loop ------------------------------------------------------------

# The columns the broker reads for GetAccessToken (broker.storage.repository), so the driver
# moves the same bytes.
_ROW_COLUMNS = (
    "id, user_id, provider, account_id, status, token_type, scopes, metadata, created_at, "
    "updated_at, expires_at, last_refreshed_at, disconnected_at, disconnect_reason, version, "
    "access_token_ct, refresh_token_ct, key_id, refresh_failures, revocation, revocation_attempts"
)


async def _no_broker_loop(
    dsn: str, salt: str, rows: int, keyring: str, warmup: float, duration: float, in_flight: int
) -> load.LoadResult:
    """What a service does without the broker: fetch its row, decrypt the token. ``in_flight``
    tasks share a pool of as many connections, in this one process."""
    cipher = TokenCipher(parse_keyring(keyring, "bench keyring"), data.ENVIRONMENT)
    query = f"SELECT {_ROW_COLUMNS} FROM integrations WHERE id = $1"  # noqa: S608 - constants
    pool = await asyncpg.create_pool(dsn, min_size=in_flight, max_size=in_flight)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    window_from = time.monotonic() + warmup
    window_to = window_from + duration

    async def worker(rng: random.Random) -> None:
        while time.monotonic() < window_to:
            iid = data.integration_id(salt, rng.randrange(rows))
            began = time.perf_counter()
            error = None
            try:
                row = await pool.fetchrow(query, iid)
                owner = Owner(
                    iid, row["user_id"], row["provider"], row["account_id"], "authorization_code"
                )
                cipher.decrypt(owner, ACCESS, row["access_token_ct"])
            except Exception as exc:
                error = type(exc).__name__
            latency = time.perf_counter() - began
            if window_from <= time.monotonic() <= window_to:
                if error is None:
                    latencies.append(latency)
                else:
                    errors[error] = errors.get(error, 0) + 1

    try:
        await asyncio.gather(*(worker(random.Random(i)) for i in range(in_flight)))
    finally:
        await pool.close()
    latencies.sort()
    return load.LoadResult(len(latencies), duration, latencies, errors, 0, 1, in_flight)


async def _create_grants(address: str, issuer: str, count: int) -> tuple[str, ...]:
    """One grant per seeded user (integration index), created as an orchestrator would."""
    from broker.api.credentialbroker.v1 import broker_pb2 as pb
    from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {issuer}"),)
    tokens: list[str] = [""] * count
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        pending = iter(range(count))

        async def worker() -> None:
            for index in pending:
                created = await stub.CreateGrant(
                    pb.CreateGrantRequest(
                        user_id=data.user_id(index),
                        providers=[data.PROVIDER],
                        run_id=f"bench-{index}",
                    ),
                    metadata=metadata,
                    timeout=30,
                )
                tokens[index] = created.grant_token

        await asyncio.gather(*(worker() for _ in range(16)))
    return tuple(tokens)


def _run_loop(coro: Any) -> load.LoadResult:
    """Run on uvloop when installed: the loop the broker runs on, so the comparison is fair."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[no-any-return]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[no-any-return]


# -- helpers ------------------------------------------------------------------------------------


_XACTS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"


async def _fetch_value(dsn: str, query: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _fetch_all(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


def _admin_db(options: Options) -> str:
    return make_url(options.database_url).database or "postgres"


def _cache_max_entries() -> int:
    """cache.max_entries as the brokers will see it (default, or BROKER_CACHE__MAX_ENTRIES)."""
    import os

    env = {k: v for k, v in os.environ.items() if k.startswith("BROKER_CACHE__")}
    return load_settings(env=env).cache.max_entries


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _per_call_us(cpu_seconds: float, result: load.LoadResult) -> float | None:
    """Server CPU (user + system) per counted call; the window includes the calls' tails."""
    return round(cpu_seconds / result.calls * 1e6, 1) if result.calls else None


# The batch-size histograms a run reports, by detail name: audit events per commit, reads
# per statement of the coalesced cold read.
_HISTOGRAMS = {
    "audit_batches": "broker_audit_batch_size_",
    "read_batches": "broker_read_batch_size_",
}


def _batch_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batches during the measured run: count, mean size, and how many batches fell in each
    size bucket (``le`` = at most that many events or reads)."""
    count = after.get("count", 0.0) - before.get("count", 0.0)
    if count <= 0:
        return {}
    total = after.get("sum", 0.0) - before.get("sum", 0.0)
    buckets: dict[str, int] = {}
    below = 0.0
    for key, value in after.items():
        if key.startswith("bucket{"):
            le = key.partition('le="')[2].partition('"')[0]
            cumulative = value - before.get(key, 0.0)
            if cumulative - below > 0:
                buckets[le] = int(cumulative - below)
            below = cumulative
    return {"count": int(count), "mean": round(total / count, 1), "by_size": buckets}


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _from_load(
    scenario: Scenario, result: load.LoadResult, rss: float | None, details: dict[str, Any]
) -> ScenarioResult:
    p50, p99 = result.percentile(0.50), result.percentile(0.99)
    return ScenarioResult(
        name=scenario.name,
        description=scenario.description,
        throughput=result.throughput,
        p50_ms=None if p50 is None else p50 * 1000,
        p99_ms=None if p99 is None else p99 * 1000,
        calls=result.calls,
        seconds=result.seconds,
        errors=result.errors,
        rss_mib=rss,
        response_bytes=result.response_bytes or None,
        clients=result.clients,
        in_flight=result.in_flight,
        details=details,
    )


def _summary(r: ScenarioResult) -> str:
    tp = "-" if r.throughput is None else f"{r.throughput:,.0f} calls/s"
    p99 = "-" if r.p99_ms is None else f"p99 {r.p99_ms:.2f} ms"
    return f"{tp}, {p99}, {r.error_count} errors"


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + "…"


def _tail(server: procs.BrokerServer) -> str:
    return "\n  ".join(list(server.log)[-20:])
