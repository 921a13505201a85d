"""Shared fixtures: real brokers on ephemeral ports, over real SQLite files and a real PostgreSQL;
the fake authorization server, a test clock, a throwaway PKI. Helpers that are not fixtures live
in tests/helpers.

Without BROKER_TEST_DATABASE_URL PostgreSQL tests are skipped, and the summary says so; with it
set (as CI does), a PostgreSQL that cannot be reached fails the tests instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from sqlalchemy.engine import make_url

from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker, start
from broker_devtools.fakeapi import FakeApi
from tests.helpers.clock import FakeClock
from tests.helpers.databases import PG_URL, PostgresFactory, new_database, run_sync
from tests.helpers.fakes import FakeAuthServer, serve_fake
from tests.helpers.pki import Pki, make_pki
from tests.helpers.settings import make_settings


def pytest_report_header(config: pytest.Config) -> str:
    if PG_URL:
        return f"PostgreSQL tests: ON ({make_url(PG_URL).render_as_string(hide_password=True)})"
    return "PostgreSQL tests: SKIPPED (set BROKER_TEST_DATABASE_URL to run them)"


_FACTORIES: list[PostgresFactory] = []  # the session's, for the per-test clean-up


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresFactory]:
    if not PG_URL:
        pytest.skip("PostgreSQL not configured: set BROKER_TEST_DATABASE_URL")
    factory = PostgresFactory(PG_URL)
    try:
        run_sync(factory.setup())
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"BROKER_TEST_DATABASE_URL is set but PostgreSQL is unusable: {exc}")
    _FACTORIES.append(factory)
    yield factory
    _FACTORIES.remove(factory)
    run_sync(factory.teardown())


@pytest.fixture(autouse=True)
def _drop_databases_after_each_test() -> Iterator[None]:
    """A test's databases go when it ends (autouse: torn down after its brokers), so the
    session's teardown does not drop hundreds at once under the last test's timeout."""
    yield
    for factory in _FACTORIES:
        if factory.created:
            run_sync(factory.drop_created())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return await new_database(backend, tmp_path, request)


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    """The fake authorization server, its tokens living an hour. A module that needs another
    one overrides ``fake`` with ``serve_fake`` and its own arguments."""
    yield from serve_fake(expires_in=3600)


@pytest.fixture
def api() -> Iterator[FakeApi]:
    """The fake provider API Proxy sends to (recording what it receives)."""
    with FakeApi() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test moves; only a broker started with ``clock=clock`` follows it."""
    return FakeClock()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and its certificates (slow to make: once per module)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The usual 022: what a process creates is world-readable unless it says otherwise."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    running = await start(settings)
    yield running
    await running.stop(0)


@pytest.fixture
async def channel(broker: Broker) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.CredentialBrokerAsyncStub:
    return pb_grpc.CredentialBrokerStub(channel)
