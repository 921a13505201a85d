"""The chaos suite: real broker processes (tests/helpers/processes.py) against the strict fake
authorization server (rotation on, reuse revokes the whole grant), faults injected from
outside — signals, a slow provider, a frozen replica.

Every test proves the same things and reports its figures (``Figures.report``): the provider's
rotations all ended up in the database, no grant was revoked (except inside a documented crash
window, which is asserted bounded), callers saw only UNAVAILABLE with RetryInfo during the fault,
and how long recovery took (printed, never asserted tightly).

Other suites may import these fixtures and helpers (``from tests.chaos.conftest import ...``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select, update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings
from broker.crypto.keys import parse_keyring
from broker.domain.tokens import REFRESH, TokenCipher
from broker.model import Owner
from broker.server.callers import hash_token
from broker.storage.engine import create_engine, touch
from broker.storage.tables import integrations as t
from broker_devtools.fakeauth import FakeAuthServer
from tests.helpers.databases import new_database
from tests.helpers.errors import retry_info
from tests.helpers.fakes import serve_fake
from tests.helpers.processes import BrokerProcess, write_toml
from tests.helpers.providers import SECRET_ENV, acme_from_env
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, ENVIRONMENT, KEYS

Code = grpc.StatusCode
# Long enough to hold any answer of the fake while a fault is injected.
LATENCY = 1.0


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    yield from serve_fake(expires_in=3600, latency=LATENCY, rotate=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def chaos_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Figures:
    """What one fault did, as the issue's closing note reports it."""

    fault: str
    calls: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rotations_issued: int = 0
    rotations_stored: int = 0
    grants_lost: int = 0
    recovery_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def report(self) -> None:
        line = {
            "fault": self.fault,
            "calls": self.calls,
            "errors": dict(self.errors),
            "rotations_issued": self.rotations_issued,
            "rotations_stored": self.rotations_stored,
            "grants_lost": self.grants_lost,
            "recovery_seconds": round(self.recovery_seconds, 2),
            **self.notes,
        }
        print("CHAOS", json.dumps(line))
        target = os.environ.get("CHAOS_REPORT")
        if target:
            with open(target, "a") as out:
                out.write(json.dumps(line) + "\n")


class Cluster:
    """Broker processes sharing one database, the fake provider, and what the test seeded."""

    def __init__(self, url: str, fake: FakeAuthServer, tmp_path: Path, **refresh: Any) -> None:
        self.url = url
        self.fake = fake
        settings = {
            "margin_seconds": 30,
            "provider_timeout_seconds": 5,
            "provider_connect_timeout_seconds": 1,
            "max_attempts": 2,
            "background": False,
            "background_interval_seconds": 0.5,
            # A refresh that fails because the machine is overloaded (a connect timeout to the
            # fake provider) backs off; at the default 60 s that alone outlasts until_served's
            # minute. These tests are about what is kept and how the replicas recover, not the
            # back-off's length (tests/test_refresh_fairness.py is).
            "failure_backoff_seconds": 2,
            "failure_backoff_max_seconds": 10,
            **refresh,
        }
        self.config = write_toml(
            tmp_path / f"broker-{len(list(tmp_path.iterdir()))}.toml",
            {
                "server": {
                    "listen": "127.0.0.1:0",
                    "environment": ENVIRONMENT,
                    "shutdown_grace_seconds": 5,
                    "health_check_interval_seconds": 0.5,
                },
                "database": {"url": url, "timeout_seconds": 5},
                "refresh": settings,
                "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
                "providers": {"acme": acme_from_env(fake)},
            },
        )
        self.env = {"BROKER_KEYS": KEYS, SECRET_ENV: fake.client_secret}
        self.processes: list[BrokerProcess] = []
        self.channels: list[grpc.aio.Channel] = []
        # integration id -> the refresh token it was seeded with (names its grant at the fake)
        self.grants: dict[str, str] = {}
        self.engine = create_engine(DatabaseSettings(url=url))
        self.cipher = TokenCipher(parse_keyring(KEYS, "test"), ENVIRONMENT)

    async def start(self) -> tuple[BrokerProcess, pb_grpc.CredentialBrokerAsyncStub]:
        process = await BrokerProcess(self.config, self.env).start()
        self.processes.append(process)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{process.port}")
        self.channels.append(channel)
        return process, pb_grpc.CredentialBrokerStub(channel)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)
        for process in self.processes:
            await process.kill()
        await self.engine.dispose()

    async def seed(
        self, stub: pb_grpc.CredentialBrokerAsyncStub, n: int, expires_in: int = 3600
    ) -> list[str]:
        ids = []
        for k in range(n):
            access, refresh = self.fake.issue_grant()
            stored = await stub.StoreIntegration(
                pb.StoreIntegrationRequest(
                    user_id=f"user-{len(self.grants)}-{k}",
                    provider="acme",
                    access_token=access,
                    refresh_token=refresh,
                    expires_in_seconds=expires_in,
                ),
                metadata=ADMIN,
            )
            self.grants[stored.integration.id] = refresh
            ids.append(stored.integration.id)
        return ids

    async def expire(self, ids: list[str], in_seconds: float = 0.0) -> None:
        """Make tokens due, announced to every replica's cache like any write."""
        when = datetime.now(UTC) + timedelta(seconds=in_seconds)
        async with self.engine.begin() as conn:
            await conn.execute(update(t).where(t.c.id.in_(ids)).values(expires_at=when))
            for iid in ids:
                await touch(conn, iid)

    async def rotations_stored(self) -> int:
        """Refreshes written: each bumps version once; a NEEDS_REAUTHORIZATION write once more."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(select(t.c.version, t.c.status).where(t.c.id.in_(self.grants)))
            ).all()
        return sum(v - 1 - (status == "NEEDS_REAUTHORIZATION") for v, status in rows)

    async def in_sync(self) -> list[str]:
        """Integrations whose stored refresh token is the newest one the provider issued."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        t.c.id,
                        t.c.refresh_token_ct,
                        t.c.user_id,
                        t.c.provider,
                        t.c.account_id,
                        t.c.credential_type,
                    ).where(t.c.id.in_(self.grants))
                )
            ).all()
        synced = []
        for iid, blob, user_id, provider, account_id, kind in rows:
            if blob is None:
                continue
            owner = Owner(iid, user_id, provider, account_id, kind)
            stored = self.cipher.decrypt(owner, REFRESH, blob)
            if stored == self.fake.current_refresh_token(self.grants[iid]) and (
                self.fake.is_grant_active(stored)
            ):
                synced.append(iid)
        return synced

    async def leases(self) -> int:
        async with self.engine.connect() as conn:
            count = await conn.scalar(
                select(func.count()).where(t.c.refresh_lease_owner.is_not(None))
            )
        return int(count or 0)

    def lost(self) -> int:
        return self.fake.revoked_grants(list(self.grants.values()))

    def figures(self, fault: str) -> Figures:
        return Figures(fault, rotations_issued=self.fake.rotations)


@pytest.fixture
async def cluster_factory(
    fake: FakeAuthServer, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Any]:
    made: list[Cluster] = []

    async def make(backend: str, **refresh: Any) -> Cluster:
        url = await new_database(backend, tmp_path, request)
        cluster = Cluster(url, fake, tmp_path, **refresh)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        await cluster.close()


async def call_token(
    stub: pb_grpc.CredentialBrokerAsyncStub, iid: str, figures: Figures, timeout: float = 10
) -> grpc.StatusCode:
    """One GetAccessToken; counts it, and checks that an UNAVAILABLE carries RetryInfo."""
    figures.calls += 1
    try:
        await stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN, timeout=timeout
        )
    except grpc.aio.AioRpcError as exc:
        error = exc
    else:
        return Code.OK
    code = error.code()
    figures.errors[code.name] += 1
    if code == Code.UNAVAILABLE:
        assert retry_info(error) is not None, f"UNAVAILABLE without RetryInfo: {error.details()}"
    return code


async def until_served(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    ids: list[str],
    figures: Figures,
    *,
    timeout: float = 3,
    within: float = 60,
    give_up_on: frozenset[grpc.StatusCode] = frozenset(),
) -> dict[str, float]:
    """Ask for every integration until it is served (or answers a code in ``give_up_on``);
    returns when each one got there (monotonic seconds)."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + within

    async def one(iid: str) -> None:
        while True:
            code = await call_token(stub, iid, figures, timeout)
            if code == Code.OK or code in give_up_on:
                done[iid] = time.monotonic()
                return
            assert code == Code.UNAVAILABLE, f"{iid}: {code}"
            assert time.monotonic() < deadline, f"{iid} not served within {within}s"
            await asyncio.sleep(0.2)

    await asyncio.gather(*(one(iid) for iid in ids))
    return done
