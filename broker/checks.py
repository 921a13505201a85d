"""``broker check``: everything start-up would refuse, checked one by one and reported together.

Unlike start-up, which stops at the first problem, the operator gets the whole list. Each check
yields OK, WARN (worth acting on, not a failure) or FAIL; a check that cannot run because an
earlier one failed is not reported.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.config import KeysSettings, Settings
from broker.crypto import Keyring, load_keyring
from broker.crypto.aead import NONCE_LIMIT
from broker.devmode import operator_settings
from broker.domain.key_usage import read_key_usage
from broker.domain.rotation import KeyCount, RowBound, key_status, row_bound_status
from broker.errors import ConfigError, StorageUnavailable
from broker.providers.catalog import build_registry
from broker.server.callers import CallerRegistry
from broker.storage.engine import create_engine, probe, storage_errors
from broker.storage.schema import head_revision
from broker.storage.tables import broker_meta


class Level(enum.StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str


@dataclass(frozen=True)
class SchemaState:
    revision: str | None
    head: str
    environment: str | None


def _schema_state(connection: Connection) -> SchemaState:
    revision = MigrationContext.configure(connection).get_current_revision()
    environment = None
    if revision is not None:
        row = connection.execute(
            select(broker_meta.c.value).where(broker_meta.c.key == "environment")
        ).first()
        environment = None if row is None else str(row[0])
    return SchemaState(revision, head_revision(), environment)


async def schema_state(engine: AsyncEngine) -> SchemaState:
    async with storage_errors(), engine.connect() as conn:
        return await conn.run_sync(_schema_state)


def schema_problem(state: SchemaState, environment: str) -> str | None:
    """Why this database must not be used by a broker of ``environment``, if it must not."""
    if state.revision is None:
        return "schema is not migrated; run `broker migrate`"
    if state.revision != state.head:
        return (
            f"schema revision {state.revision!r} is not the one this broker knows "
            f"({state.head!r}); run `broker migrate` (or upgrade the broker)"
        )
    if state.environment is not None and state.environment != environment:
        return (
            f"this database belongs to environment {state.environment!r}, but this broker is "
            f"configured for {environment!r}"
        )
    return None


def describe_missing(counts: dict[str, KeyCount], keyring: Keyring) -> str | None:
    missing = {kid: c for kid, c in counts.items() if kid not in keyring.ids}
    if not missing:
        return None
    return ", ".join(
        f"{kid!r} ({c.integrations} integrations, {c.flows} flows)"
        for kid, c in sorted(missing.items())
    )


def _static_checks(settings: Settings) -> tuple[list[Check], Keyring | None]:
    checks: list[Check] = []
    keyring: Keyring | None = None
    try:
        keyring = load_keyring(settings.keys)
        checks.append(
            Check("keys", Level.OK, f"{len(keyring.ids)} key(s), primary {keyring.primary_id!r}")
        )
    except ConfigError as exc:
        checks.append(Check("keys", Level.FAIL, str(exc)))
    try:
        registry = build_registry(settings.providers, os.environ)
        names = ", ".join(registry.names()) or "none configured (built-ins can store tokens)"
        checks.append(Check("providers", Level.OK, names))
    except ConfigError as exc:
        checks.append(Check("providers", Level.FAIL, str(exc)))
    callers = CallerRegistry(settings.callers)
    if len(callers):
        checks.append(Check("callers", Level.OK, ", ".join(sorted(settings.callers))))
    else:
        checks.append(
            Check("callers", Level.FAIL, "none configured; add one with `broker callers new NAME`")
        )
    return checks, keyring


def owner_binding_check(found: RowBound, keys: KeysSettings) -> Check:
    """Rows written before owner binding are served (a FAIL once they are refused)."""
    name = "ciphertexts bound to their owner"
    if not found.rows:
        return Check(name, Level.OK, "every ciphertext is owner-bound")
    detail = (
        f"{found.integrations} integration(s) and {found.flows} flow(s) are bound to their row "
        "only; `broker keys reencrypt` upgrades them"
    )
    if keys.require_owner_binding:
        return Check(name, Level.FAIL, f"{detail} (refused now: keys.require_owner_binding)")
    return Check(name, Level.WARN, f"{detail}, then set keys.require_owner_binding")


async def _database_checks(settings: Settings, keyring: Keyring | None) -> list[Check]:
    checks: list[Check] = []
    try:
        engine = create_engine(settings.database)
    except ConfigError as exc:  # SQLite: the database file's directory cannot be created
        return [Check("database reachable", Level.FAIL, str(exc))]
    try:
        try:
            await probe(engine, settings.database.timeout_seconds)
        except StorageUnavailable as exc:
            return [Check("database reachable", Level.FAIL, exc.message)]
        checks.append(Check("database reachable", Level.OK, engine.dialect.name))
        state = await schema_state(engine)
        environment = settings.server.environment
        problem = schema_problem(state, environment)
        if problem is not None and state.revision != state.head:
            checks.append(Check("database migrated", Level.FAIL, problem))
            return checks
        checks.append(Check("database migrated", Level.OK, f"revision {state.revision}"))
        if problem is not None:
            checks.append(Check("environment", Level.FAIL, problem))
        else:
            checks.append(Check("environment", Level.OK, repr(environment)))
        if keyring is None:
            return checks
        counts = await key_status(engine)
        missing = describe_missing(counts, keyring)
        if missing:
            checks.append(
                Check(
                    "keys cover every row",
                    Level.FAIL,
                    f"ciphertexts under key id(s) missing from the keyring: {missing}",
                ),
            )
        else:
            old = sum(
                c.integrations + c.flows for k, c in counts.items() if k != keyring.primary_id
            )
            detail = (
                f"{old} row(s) still under older keys; `broker keys reencrypt` moves them"
                if old
                else f"every row is under the primary key {keyring.primary_id!r}"
            )
            checks.append(Check("keys cover every row", Level.OK, detail))
        checks.append(owner_binding_check(await row_bound_status(engine), settings.keys))
        used = (await read_key_usage(engine)).get(keyring.primary_id, 0)
        share = used / NONCE_LIMIT
        level = Level.WARN if share >= settings.keys.nonce_warn_fraction else Level.OK
        checks.append(
            Check(
                "nonce budget",
                level,
                f"primary key {keyring.primary_id!r}: {used} encryptions ({share:.2%} of 2^32)",
            )
        )
    except StorageUnavailable as exc:
        checks.append(Check("database", Level.FAIL, exc.message))
    finally:
        await engine.dispose()
    return checks


async def run_checks(config_path: str | Path | None) -> tuple[list[Check], Settings | None]:
    """Every check that can run; ``settings`` is None when the configuration is invalid."""
    try:
        settings = operator_settings(config_path)
    except ConfigError as exc:
        return [Check("configuration", Level.FAIL, str(exc))], None
    checks = [Check("configuration", Level.OK, f"environment {settings.server.environment!r}")]
    static, keyring = _static_checks(settings)
    checks += static
    checks += await _database_checks(settings, keyring)
    return checks, settings
