"""The SQLite database (and its -wal, -shm and change stamp) and the folder made for it are the
owner's alone, whatever the umask: created 0600 in a 0700 folder by `broker migrate` (a real
process) and by a starting broker; files an earlier version left readable are tightened with a
warning naming them."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from broker import devmode
from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.config import DatabaseSettings
from broker.errors import ConfigError
from broker.server.app import start
from broker.storage.engine import create_engine
from broker.storage.schema import migrate
from tests.helpers.processes import clean_env
from tests.helpers.settings import ADMIN, ENVIRONMENT, make_settings
from tests.helpers.stubs import broker_stub

pytestmark = pytest.mark.usefixtures("loose_umask")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def migrated(database: Path) -> str:
    """The engine path in process: what start-up and every operator command go through."""
    url = f"sqlite+aiosqlite:///{database}"
    engine = create_engine(DatabaseSettings(url=url))
    await migrate(engine, ENVIRONMENT)
    await engine.dispose()
    return url


def test_migrate_creates_a_private_database_in_a_private_folder(tmp_path: Path) -> None:
    folder = tmp_path / "var" / "broker"
    database = folder / "broker.db"
    done = subprocess.run(
        [sys.executable, "-m", "broker", "migrate"],
        env=clean_env(BROKER_DATABASE_URL=f"sqlite+aiosqlite:///{database}"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert mode(folder) == 0o700
    assert mode(database) == 0o600
    assert {p.name for p in folder.iterdir()} == {"broker.db"}


async def test_a_serving_broker_keeps_every_sqlite_file_private(tmp_path: Path) -> None:
    database = tmp_path / "data" / "broker.db"
    broker = await start(make_settings(await migrated(database)))
    try:
        async with broker_stub(broker.port) as stub:
            stored = await stub.StoreIntegration(
                pb.StoreIntegrationRequest(user_id="u", provider="github", access_token="at-x"),
                metadata=ADMIN,
            )
            await stub.Disconnect(
                pb.DisconnectRequest(
                    integration_id=stored.integration.id, skip_provider_revocation=True
                ),
                metadata=ADMIN,
            )
        found = {p.name: mode(p) for p in database.parent.iterdir()}
    finally:
        await broker.stop(0)
    assert {"broker.db", "broker.db-wal", "broker.db-shm", "broker.db-changes"} <= set(found)
    assert {name: m for name, m in found.items() if m != 0o600} == {}
    assert mode(database.parent) == 0o700


async def test_loose_sqlite_files_of_an_earlier_run_are_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = tmp_path / "broker.db"
    settings = make_settings(await migrated(database))
    database.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="broker.files"):
        broker = await start(settings)
    await broker.stop(0)
    assert mode(database) == 0o600
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "broker.files"]
    assert str(database) in warning
    assert "0644" in warning


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_dev_token_file_of_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / ".broker"
    home.mkdir()
    planted = home / "dev-caller-token"
    planted.write_text("dev-token-someone-else-knows\n")
    os.chown(planted, 65534, 65534)
    base = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    with pytest.raises(ConfigError, match="belongs to another user"):
        devmode.prepare(base.model_copy(update={"callers": {}}), home=home)
