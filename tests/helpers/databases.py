"""Fresh, migrated databases for tests: a SQLite file, or a copy of a PostgreSQL template.

PostgreSQL comes from BROKER_TEST_DATABASE_URL (an asyncpg URL to a database we may create
others from)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from broker.storage.engine import create_engine
from broker.storage.schema import migrate
from tests.helpers.settings import ENVIRONMENT

PG_URL = os.environ.get("BROKER_TEST_DATABASE_URL")


def plain_dsn(url: str, database: str | None = None) -> str:
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
        conn = await asyncpg.connect(plain_dsn(self.url), timeout=10)
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


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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
