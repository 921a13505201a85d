"""Storage faults under load, against real broker processes on PostgreSQL.

- The broker's PostgreSQL backends are terminated (``pg_terminate_backend``) again and again
  while several clients call GetAccessToken, StoreIntegration and ListIntegrations: every
  answer is OK or UNAVAILABLE (never INTERNAL/UNKNOWN, the asyncpg "cannot switch to state"
  bug), the log holds no traceback, and calls succeed again once the fault stops.
- The audit store fails (a trigger makes every insert into audit_events raise) under the same
  load: mutations answer UNAVAILABLE and write nothing, GetAccessToken answers UNAVAILABLE and
  its token does not leave; everything recovers when the trigger is dropped.

Each test prints a ``CHAOS {...}`` line with its figures (calls, errors by code, recovery time),
also appended to the file named by CHAOS_REPORT when it is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.callers import hash_token
from tests.helpers.databases import PostgresFactory
from tests.helpers.processes import BrokerProcess, write_toml
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, ENVIRONMENT, KEYS

pytestmark = pytest.mark.postgres

Code = grpc.StatusCode
ALLOWED = {Code.OK, Code.UNAVAILABLE}
CLIENTS = 6
FAULT_SECONDS = 6.0
TIMEOUT = 10.0


@dataclass
class Load:
    """What the clients saw."""

    fault: str
    codes: Counter[str] = field(default_factory=Counter)
    by_method: dict[str, Counter[str]] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def count(self, method: str, code: Code, details: str) -> None:
        self.codes[code.name] += 1
        self.by_method.setdefault(method, Counter())[code.name] += 1
        if code not in ALLOWED:
            self.bad.append(f"{method}: {code.name} {details[:200]}")

    def report(self, recovery: float) -> None:
        line = {
            "fault": self.fault,
            "calls": sum(self.codes.values()),
            "errors": {k: v for k, v in self.codes.items() if k != "OK"},
            "ok": self.codes["OK"],
            "by_method": {m: dict(c) for m, c in self.by_method.items()},
            "recovery_seconds": round(recovery, 2),
            **self.notes,
        }
        print("CHAOS", json.dumps(line))
        target = os.environ.get("CHAOS_REPORT")
        if target:
            with open(target, "a") as out:
                out.write(json.dumps(line) + "\n")


def plain_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Broker:
    """One broker process on its own database, with a client and an admin connection."""

    def __init__(self, url: str, tmp_path: Path, cache: bool) -> None:
        self.url = url
        self.database = make_url(url).database
        config = write_toml(
            tmp_path / "broker.toml",
            {
                "server": {
                    "listen": "127.0.0.1:0",
                    "environment": ENVIRONMENT,
                    "shutdown_grace_seconds": 2,
                    "health_check_interval_seconds": 0.5,
                },
                "database": {"url": url, "timeout_seconds": 3, "pool_size": 4},
                "refresh": {"background": False},
                "cache": {"enabled": cache},
                "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
            },
        )
        self.process = BrokerProcess(config, {"BROKER_KEYS": KEYS})
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.CredentialBrokerAsyncStub | None = None

    async def start(self) -> pb_grpc.CredentialBrokerAsyncStub:
        await self.process.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.process.port}")
        self.stub = pb_grpc.CredentialBrokerStub(self.channel)
        return self.stub

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        await self.process.kill()

    async def sql(self, query: str, *args: Any) -> Any:
        conn = await asyncpg.connect(plain_dsn(self.url), timeout=10)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def terminate_backends(self) -> int:
        """End every session of the broker on its (test-owned) database."""
        rows = await self.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.database,
        )
        return sum(1 for r in rows if r[0])

    def tracebacks(self) -> list[str]:
        return [line for line in self.process.log if "Traceback" in line]


@pytest.fixture
async def make_broker(
    postgres: PostgresFactory, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Broker]]]:
    made: list[Broker] = []

    async def make(cache: bool = False) -> Broker:
        broker = Broker(await postgres.new(), tmp_path, cache)
        made.append(broker)
        await broker.start()
        return broker

    yield make
    for broker in made:
        await broker.close()


async def seed(stub: pb_grpc.CredentialBrokerAsyncStub, n: int) -> dict[str, str]:
    """n integrations; integration id -> its access token."""
    tokens = {}
    for k in range(n):
        access = f"at-chaos-{uuid.uuid4().hex}"
        stored = await stub.StoreIntegration(
            pb.StoreIntegrationRequest(
                user_id=f"seed-{k}",
                provider="twitter",
                access_token=access,
                refresh_token=f"rt-{uuid.uuid4().hex}",
                expires_in_seconds=3600,
            ),
            metadata=ADMIN,
        )
        tokens[stored.integration.id] = access
    return tokens


class Client:
    """One caller looping over the three RPCs until told to stop."""

    def __init__(
        self, stub: pb_grpc.CredentialBrokerAsyncStub, tokens: dict[str, str], load: Load
    ) -> None:
        self.stub = stub
        self.tokens = tokens
        self.load = load
        # user id -> the answer StoreIntegration gave for it (a fresh user per call).
        self.stores: dict[str, Code] = {}
        self.leaked: list[str] = []

    async def one(self, rng: random.Random) -> Code:
        kind = rng.choice(("GetAccessToken", "GetAccessToken", "StoreIntegration", "List"))
        iid = rng.choice(list(self.tokens))
        user = f"load-{uuid.uuid4().hex}"
        try:
            if kind == "GetAccessToken":
                await self.stub.GetAccessToken(
                    pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN, timeout=TIMEOUT
                )
            elif kind == "StoreIntegration":
                self.stores[user] = Code.UNKNOWN  # in flight
                await self.stub.StoreIntegration(
                    pb.StoreIntegrationRequest(
                        user_id=user,
                        provider="twitter",
                        access_token=f"at-{uuid.uuid4().hex}",
                        expires_in_seconds=3600,
                    ),
                    metadata=ADMIN,
                    timeout=TIMEOUT,
                )
                self.stores[user] = Code.OK
            else:
                await self.stub.ListIntegrations(
                    pb.ListIntegrationsRequest(user_id="seed-0"), metadata=ADMIN, timeout=TIMEOUT
                )
        except grpc.aio.AioRpcError as error:
            details = error.details() or ""
            if kind == "StoreIntegration":
                self.stores[user] = error.code()
            if any(
                token in details or token in repr(error.trailing_metadata())
                for token in self.tokens.values()
            ):
                self.leaked.append(kind)
            self.load.count(kind, error.code(), details)
            return error.code()
        self.load.count(kind, Code.OK, "")
        return Code.OK

    async def run(self, stop: asyncio.Event, seed_value: int) -> None:
        rng = random.Random(seed_value)
        while not stop.is_set():
            await self.one(rng)


async def recovered(clients: list[Client], rounds: int = 20, timeout: float = 60) -> float:
    """Seconds until ``rounds`` calls in a row succeed (every RPC among them)."""
    started = time.monotonic()
    rng = random.Random(7)
    streak = 0
    while streak < rounds:
        assert time.monotonic() - started < timeout, "calls did not succeed again"
        code = await clients[0].one(rng)
        streak = streak + 1 if code is Code.OK else 0
        if code is not Code.OK:
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def run_load(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    tokens: dict[str, str],
    load: Load,
    fault: Callable[[asyncio.Event], Awaitable[None]],
) -> list[Client]:
    clients = [Client(stub, tokens, load) for _ in range(CLIENTS)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop, n)) for n, c in enumerate(clients)]
    try:
        await fault(stop)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return clients


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
async def test_backends_terminated_under_load(
    make_broker: Callable[..., Awaitable[Broker]], cache: bool
) -> None:
    broker = await make_broker(cache=cache)
    assert broker.stub is not None
    tokens = await seed(broker.stub, 8)
    load = Load(f"pg_terminate_backend under load ({'cache' if cache else 'no cache'})")
    terminated = 0
    rounds = 0

    async def fault(stop: asyncio.Event) -> None:
        nonlocal terminated, rounds
        end = time.monotonic() + FAULT_SECONDS
        while time.monotonic() < end:
            await asyncio.sleep(random.Random(rounds).uniform(0.05, 0.3))
            terminated += await broker.terminate_backends()
            rounds += 1

    clients = await run_load(broker.stub, tokens, load, fault)
    recovery = await recovered(clients)
    load.notes.update(terminations=rounds, backends_terminated=terminated)
    load.report(recovery)

    assert terminated > 0, "the fault never hit a broker connection"
    assert not load.bad, "\n".join(load.bad[:20])
    assert not broker.tracebacks(), "\n".join(broker.tracebacks()[:40])
    assert load.codes["OK"] > 0
    # Every store the broker confirmed is there; recovery left a working broker.
    confirmed = [u for c in clients for u, code in c.stores.items() if code is Code.OK]
    found = await broker.sql(
        "SELECT count(*) FROM integrations WHERE user_id = ANY($1::text[])", confirmed
    )
    assert found[0][0] == len(confirmed)


async def test_audit_store_failing_under_load(
    make_broker: Callable[..., Awaitable[Broker]],
) -> None:
    broker = await make_broker()
    assert broker.stub is not None
    tokens = await seed(broker.stub, 8)
    load = Load("audit store failing under load")

    async def fault(stop: asyncio.Event) -> None:
        await asyncio.sleep(0.5)
        await broker.sql(
            "CREATE FUNCTION audit_down() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'audit store down'; END $$"
        )
        await broker.sql(
            "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_down()"
        )
        load.notes["fault_started"] = sum(load.codes.values())
        await asyncio.sleep(FAULT_SECONDS)
        await broker.sql("DROP TRIGGER audit_down ON audit_events")
        load.notes["fault_ended"] = sum(load.codes.values())

    clients = await run_load(broker.stub, tokens, load, fault)
    recovery = await recovered(clients)
    load.report(recovery)

    assert not load.bad, "\n".join(load.bad[:20])
    assert load.codes["UNAVAILABLE"] > 0, "the fault never reached a call"
    assert not [leak for c in clients for leak in c.leaked], "a token left with an error"
    assert not broker.tracebacks(), "\n".join(broker.tracebacks()[:40])
    # A store that answered UNAVAILABLE wrote nothing; one that answered OK wrote its row
    # and its event.
    stores = {u: code for c in clients for u, code in c.stores.items()}
    failed = [u for u, code in stores.items() if code is Code.UNAVAILABLE]
    confirmed = [u for u, code in stores.items() if code is Code.OK]
    assert failed, "no StoreIntegration ran into the fault"
    rows = await broker.sql(
        "SELECT user_id FROM integrations WHERE user_id = ANY($1::text[])", failed
    )
    assert [r[0] for r in rows] == [], "an UNAVAILABLE store left its integration behind"
    events = await broker.sql(
        "SELECT count(*) FROM audit_events WHERE method = 'StoreIntegration' AND outcome = 'OK' "
        "AND user_id = ANY($1::text[])",
        confirmed,
    )
    assert events[0][0] == len(confirmed), "a stored integration has no audit event"
