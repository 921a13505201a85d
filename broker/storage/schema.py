"""Migrations (``broker migrate``) and the start-up checks on the database the broker is given.

The environment name is recorded at first migration; a broker configured for another
environment refuses that database, which keeps "local" and "production" apart even when the
wrong URL is configured.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.errors import ConfigError
from broker.storage.engine import storage_errors
from broker.storage.tables import broker_meta, integrations, oauth_flows

_MIGRATIONS = Path(__file__).parent / "migrations"


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def _environment(connection: Connection) -> str | None:
    row = connection.execute(
        select(broker_meta.c.value).where(broker_meta.c.key == "environment")
    ).first()
    return None if row is None else str(row[0])


def _check_environment(recorded: str | None, environment: str) -> None:
    if recorded is not None and recorded != environment:
        raise ConfigError(
            f"server.environment: this database belongs to environment {recorded!r}, "
            f"but this broker is configured for {environment!r}; refusing to use it"
        )


def _upgrade(connection: Connection, environment: str) -> str:
    current = MigrationContext.configure(connection).get_current_revision()
    if current is not None:
        _check_environment(_environment(connection), environment)
    command.upgrade(_config(connection), "head")
    if _environment(connection) is None:
        connection.execute(insert(broker_meta).values(key="environment", value=environment))
    return head_revision()


async def migrate(engine: AsyncEngine, environment: str) -> str:
    """Bring the schema to head and record the environment; returns the revision."""
    async with storage_errors(), engine.begin() as conn:
        return await conn.run_sync(_upgrade, environment)


def _verify(connection: Connection, environment: str, key_ids: tuple[str, ...]) -> None:
    current = MigrationContext.configure(connection).get_current_revision()
    head = head_revision()
    if current is None:
        raise ConfigError("database: schema is not migrated; run `broker migrate` first")
    if current != head:
        raise ConfigError(
            f"database: schema revision {current!r} is not the one this broker knows ({head!r}); "
            "run `broker migrate` (or upgrade the broker)"
        )
    _check_environment(_environment(connection), environment)
    missing: dict[str, int] = {}
    for column in (integrations.c.key_id, oauth_flows.c.key_id):
        rows = connection.execute(
            select(column, func.count()).where(column.is_not(None)).group_by(column)
        ).all()
        for kid, n in rows:
            if kid not in key_ids:
                missing[str(kid)] = missing.get(str(kid), 0) + int(n)
    if missing:
        detail = ", ".join(f"{kid!r} ({n} rows)" for kid, n in sorted(missing.items()))
        raise ConfigError(
            f"keys: stored ciphertexts use key id(s) this broker does not have: {detail}; "
            "add the key(s) back to the keyring (or re-encrypt before retiring them)"
        )


async def verify(engine: AsyncEngine, environment: str, key_ids: tuple[str, ...]) -> None:
    """Refuse to serve an unknown schema, another environment's database, or missing keys."""
    async with storage_errors(), engine.connect() as conn:
        await conn.run_sync(_verify, environment, key_ids)
