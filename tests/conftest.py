"""Shared fixtures: real brokers on ephemeral ports, over real SQLite files and a real PostgreSQL.

PostgreSQL comes from BROKER_TEST_DATABASE_URL (an asyncpg URL to a database we may create
others from). Without it PostgreSQL tests are skipped, and the summary says so; with it set
(as CI does), a PostgreSQL that cannot be reached fails the tests instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy.engine import make_url

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.crypto.keys import generate_key
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from broker.storage.engine import create_engine
from broker.storage.schema import migrate
from tests.helpers.clock import FakeClock
from tests.helpers.fakes import FakeAuthServer, serve_fake

if TYPE_CHECKING:
    from tests.helpers.pki import Pki

PG_URL = os.environ.get("BROKER_TEST_DATABASE_URL")
ENVIRONMENT = "test"
ADMIN_TOKEN = "admin-token-for-tests"
RUNNER_TOKEN = "runner-token-for-tests"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
RUNNER = (("authorization", f"Bearer {RUNNER_TOKEN}"),)
KEYS = generate_key("test1")


def pytest_report_header(config: pytest.Config) -> str:
    if PG_URL:
        return f"PostgreSQL tests: ON ({make_url(PG_URL).render_as_string(hide_password=True)})"
    return "PostgreSQL tests: SKIPPED (set BROKER_TEST_DATABASE_URL to run them)"


def _dsn(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


class PostgresFactory:
    """Makes a fresh, migrated database per test by copying a template (fast)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.template = f"broker_tpl_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(_dsn(self.url), timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def setup(self) -> None:
        await self._admin(f'CREATE DATABASE "{self.template}"')
        url = make_url(self.url).set(database=self.template).render_as_string(hide_password=False)
        from broker.config import DatabaseSettings

        engine = create_engine(DatabaseSettings(url=url))
        await migrate(engine, ENVIRONMENT)
        await engine.dispose()

    async def new(self) -> str:
        name = f"broker_t_{uuid.uuid4().hex[:10]}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.created.append(name)
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    async def drop_created(self) -> None:
        names, self.created = self.created, []
        for name in names:
            await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def teardown(self) -> None:
        await self.drop_created()
        await self._admin(f'DROP DATABASE IF EXISTS "{self.template}" WITH (FORCE)')


_FACTORIES: list[PostgresFactory] = []  # the session's, for the per-test clean-up


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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


async def new_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database: a SQLite file in ``tmp_path`` or a PostgreSQL copy."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
        from broker.config import DatabaseSettings

        engine = create_engine(DatabaseSettings(url=url))
        await migrate(engine, ENVIRONMENT)
        await engine.dispose()
        return url
    factory: PostgresFactory = request.getfixturevalue("postgres")
    return await factory.new()


def make_settings(database_url: str, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "server": {
            "listen": "127.0.0.1:0",
            "environment": ENVIRONMENT,
            "health_check_interval_seconds": 0.2,
            "shutdown_grace_seconds": 1,
        },
        "database": {"url": database_url, "timeout_seconds": 2},
        "keys": {"keys": KEYS},
        "callers": {
            "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
            "runner": {"token_sha256": hash_token(RUNNER_TOKEN), "methods": ["GetAccessToken"]},
        },
        "refresh": {"background": False},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return Settings.model_validate(data)


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    """The fake authorization server, its tokens living an hour. A module that needs another
    one overrides ``fake`` with ``serve_fake`` and its own arguments."""
    yield from serve_fake(expires_in=3600)


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test moves; only a broker started with ``clock=clock`` follows it."""
    return FakeClock()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and its certificates (slow to make: once per module)."""
    # Imported here: the helper builds settings with this module's make_settings.
    from tests.helpers.pki import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


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


Detail = TypeVar("Detail", error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo)


def _detail(error: grpc.aio.AioRpcError, kind: type[Detail]) -> Detail | None:
    """The first ``kind`` detail in a failed call's google.rpc.Status, or None."""
    # grpc-stubs types this as RpcError's tuple of _Metadatum; grpc.aio returns Metadata | None.
    for key, value in cast("grpc.aio.Metadata | None", error.trailing_metadata()) or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(kind.DESCRIPTOR):
                    found = kind()
                    detail.Unpack(found)
                    return found
    return None


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    return _detail(error, error_details_pb2.ErrorInfo)


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    return _detail(error, error_details_pb2.RetryInfo)


async def expect_error(
    call: Any, code: grpc.StatusCode, reason: str | None = None, contains: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == code, f"{error.code()} {error.details()}"
    if reason is not None:
        info = error_info(error)
        assert info is not None, "no ErrorInfo detail"
        assert info.domain == "credentialbroker"
        assert info.reason == reason, info
    if contains is not None:
        assert contains in (error.details() or ""), error.details()
    return error


def store_request(**fields: Any) -> pb.StoreIntegrationRequest:
    values: dict[str, Any] = {
        "user_id": "user-1",
        "provider": "twitter",
        "access_token": "at-" + uuid.uuid4().hex,
        "refresh_token": "rt-" + uuid.uuid4().hex,
        "expires_in_seconds": 3600,
        "scopes": ["tweet.read", "users.read"],
    }
    values.update(fields)
    return pb.StoreIntegrationRequest(**values)
