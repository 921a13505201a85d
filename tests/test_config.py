"""Settings (TOML + environment), the CLI's set-up commands, and start-up refusals."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from broker.config import DatabaseSettings, Settings, load_settings
from broker.crypto.keys import generate_key, parse_keyring
from broker.errors import ConfigError
from broker.server.app import start
from broker.storage.engine import create_engine
from broker.storage.schema import migrate
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, KEYS, make_settings
from tests.helpers.stubs import broker_stub

TOML = """
[server]
listen = "127.0.0.1:6000"
environment = "staging"
shutdown_grace_seconds = 3

[database]
url = "sqlite+aiosqlite:///from-file.db"

[refresh]
margin_seconds = 60

[callers.runner]
token_sha256 = "{sha}"
methods = ["GetAccessToken"]
"""
SHA = hashlib.sha256(b"t").hexdigest()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(TOML.format(sha=SHA))
    return path


# -- load_settings -----------------------------------------------------------------------------


def test_toml_file_alone(config_file: Path) -> None:
    settings = load_settings(env={"BROKER_CONFIG": str(config_file)})
    assert settings.server.listen == "127.0.0.1:6000"
    assert settings.server.environment == "staging"
    assert settings.server.shutdown_grace_seconds == 3
    assert settings.refresh.margin_seconds == 60
    assert settings.database.url.get_secret_value() == "sqlite+aiosqlite:///from-file.db"
    assert settings.callers["runner"].methods == ["GetAccessToken"]
    assert settings.callers["runner"].token_sha256 == SHA


def test_environment_wins_over_file(config_file: Path) -> None:
    env = {
        "BROKER_LISTEN": "127.0.0.1:7000",
        "BROKER_SERVER__ENVIRONMENT": "production",
        "BROKER_REFRESH__MARGIN_SECONDS": "120",
        "BROKER_DATABASE_URL": "postgresql+asyncpg://u@db/broker",
        "BROKER_LOG_FORMAT": "json",
        "UNRELATED": "ignored",
    }
    settings = load_settings(env=env, config_path=config_file)
    assert settings.server.listen == "127.0.0.1:7000"
    assert settings.server.environment == "production"
    assert settings.refresh.margin_seconds == 120
    assert settings.database.url.get_secret_value() == "postgresql+asyncpg://u@db/broker"
    assert settings.logging.format == "json"
    # Untouched settings keep the file's values.
    assert settings.server.shutdown_grace_seconds == 3
    assert "runner" in settings.callers


def test_defaults_without_file_or_environment() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.server.listen == "127.0.0.1:50051"


@pytest.mark.parametrize(
    ("env", "toml", "setting"),
    [
        ({"BROKER_DATABASE_URL": "mysql://u:pw@h/db"}, "", "database.url"),
        ({"BROKER_LISTEN": "no-port"}, "", "server.listen"),
        ({"BROKER_LISTEN": "127.0.0.1:99999"}, "", "server.listen"),
        ({"BROKER_ENVIRONMENT": "Prod!"}, "", "server.environment"),
        ({"BROKER_SERVER__SHUTDOWN_GRACE_SECONDS": "soon"}, "", "server.shutdown_grace_seconds"),
        ({"BROKER_REFRESH__MAX_ATTEMPTS": "0"}, "", "refresh.max_attempts"),
        ({"BROKER_LOG_LEVEL": "LOUD"}, "", "logging.level"),
        ({"BROKER_METRICS_LISTEN": "bad"}, "", "metrics.listen"),
        ({"BROKER_SERVER__NO_SUCH_KEY": "1"}, "", "server.no_such_key"),
        ({}, '[callers.x]\ntoken_sha256 = "abc"\n', "callers.x.token_sha256"),
        ({}, '[callers.x]\nmethods = ["DropTables"]\n', "callers.x.methods"),
        ({}, '[providers.acme]\nauth_method = "magic"\n', "providers.acme.auth_method"),
        ({}, "[nonsense]\na = 1\n", "nonsense"),
    ],
)
def test_validation_errors_name_the_setting(
    tmp_path: Path, env: dict[str, str], toml: str, setting: str
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env, config_path=path)
    message = str(caught.value)
    assert re.search(rf"^\s*{re.escape(setting)}: ", message, re.MULTILINE), message


def test_audit_durability_is_commit_or_write(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[audit]\ndurability = "write"\n')
    assert load_settings(env={}, config_path=path).audit.durability == "write"
    assert load_settings(env={}).audit.durability == "commit"
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"BROKER_AUDIT__DURABILITY": "fsync"})
    assert re.search(r"^\s*audit\.durability: .*'commit' or 'write'", str(caught.value), re.M)


def test_error_lists_every_bad_setting_and_no_secret() -> None:
    env = {"BROKER_DATABASE_URL": "mysql://user:hunter2@db/x", "BROKER_LISTEN": "nope"}
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    message = str(caught.value)
    assert "database.url" in message
    assert "server.listen" in message
    assert "hunter2" not in message


def test_config_file_problems_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"BROKER_CONFIG: file .*missing\.toml does not exist"):
        load_settings(env={"BROKER_CONFIG": str(missing)})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nlisten = ")
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML"):
        load_settings(env={"BROKER_CONFIG": str(broken)})


def test_secrets_are_hidden_from_repr() -> None:
    key = KEYS.partition(":")[2]
    settings = load_settings(
        env={
            "BROKER_DATABASE_URL": "postgresql+asyncpg://broker:hunter2@db:5432/broker",
            "BROKER_KEYS": KEYS,
        }
    )
    for text in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        repr(settings.database),
    ):
        assert "hunter2" not in text
        assert key not in text
    assert settings.keys.keys is not None
    assert settings.keys.keys.get_secret_value() == KEYS
    assert "hunter2" in settings.database.url.get_secret_value()


# -- the CLI -------------------------------------------------------------------------------------


def broker_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_without_a_key_says_how_to_make_one(tmp_path: Path) -> None:
    result = broker_cli("serve", cwd=tmp_path, env={"BROKER_LISTEN": "127.0.0.1:0"})
    assert result.returncode != 0
    assert "broker keygen" in result.stderr
    assert "Traceback" not in result.stderr


def test_keygen_output_parses() -> None:
    first = broker_cli("keygen", cwd=Path.cwd())
    second = broker_cli("keygen", "--id", "prod-2026", cwd=Path.cwd())
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    ring = parse_keyring(first.stdout, "keygen")
    assert len(ring.ids) == 1
    assert parse_keyring(second.stdout, "keygen").ids == ("prod-2026",)
    both = parse_keyring(first.stdout + second.stdout, "keygen")
    assert both.ids == (ring.primary_id, "prod-2026")
    assert first.stdout.partition(":")[2] != second.stdout.partition(":")[2]


def test_callers_new_prints_a_token_and_its_hash(tmp_path: Path) -> None:
    result = broker_cli(
        "callers", "new", "workflow-runner", "--methods", "GetAccessToken", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    comments = [line[2:] for line in result.stdout.splitlines() if line.startswith("# ")]
    token = comments[-1].strip()
    assert " " not in token
    assert len(token) >= 32
    section = tomllib.loads(result.stdout)["callers"]["workflow-runner"]
    assert section["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert section["methods"] == ["GetAccessToken"]
    # The printed section is valid configuration as it stands.
    path = tmp_path / "callers.toml"
    path.write_text(result.stdout)
    settings = load_settings(env={}, config_path=path)
    assert settings.callers["workflow-runner"].token_sha256 == section["token_sha256"]

    hashed = broker_cli("callers", "hash", cwd=tmp_path, stdin=token + "\n")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() == section["token_sha256"]


def test_migrate_records_the_environment(tmp_path: Path) -> None:
    env = {"BROKER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"}
    first = broker_cli("migrate", cwd=tmp_path, env={**env, "BROKER_ENVIRONMENT": "staging"})
    assert first.returncode == 0, first.stderr
    assert "'staging'" in first.stdout
    again = broker_cli("migrate", cwd=tmp_path, env={**env, "BROKER_ENVIRONMENT": "staging"})
    assert again.returncode == 0, again.stderr
    other = broker_cli("migrate", cwd=tmp_path, env={**env, "BROKER_ENVIRONMENT": "production"})
    assert other.returncode == 2
    assert "'staging'" in other.stderr
    assert "'production'" in other.stderr


# -- start-up refusals -------------------------------------------------------------------------


async def test_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ConfigError, match="broker migrate"):
        await start(settings)


async def test_refuses_another_environments_database(database_url: str) -> None:
    settings = make_settings(database_url, server={"environment": "production"})
    with pytest.raises(ConfigError) as caught:
        await start(settings)
    message = str(caught.value)
    assert "server.environment" in message
    assert "'test'" in message
    assert "'production'" in message
    engine = create_engine(DatabaseSettings(url=database_url))
    try:
        with pytest.raises(ConfigError, match="'test'"):
            await migrate(engine, "production")
    finally:
        await engine.dispose()


async def test_refuses_rows_under_a_missing_key(database_url: str) -> None:
    broker = await start(make_settings(database_url))
    async with broker_stub(broker.port) as stub:
        await stub.StoreIntegration(store_request(user_id="a"), metadata=ADMIN)
        await stub.StoreIntegration(store_request(user_id="b"), metadata=ADMIN)
    await broker.stop(0)

    retired = make_settings(database_url, keys={"keys": generate_key("newer")})
    with pytest.raises(ConfigError) as caught:
        await start(retired)
    message = str(caught.value)
    assert "'test1' (2 rows)" in message
    assert KEYS.partition(":")[2] not in message
    # With the old key back as a secondary, the broker starts again.
    rotated = make_settings(database_url, keys={"keys": f"{generate_key('newer')},{KEYS}"})
    again = await start(rotated)
    await again.stop(0)


async def test_refuses_to_start_without_callers(database_url: str) -> None:
    with pytest.raises(ConfigError, match=r"callers.*broker callers new"):
        await start(make_settings(database_url).model_copy(update={"callers": {}}))


async def test_refuses_a_listen_address_in_use(database_url: str) -> None:
    first = await start(make_settings(database_url))
    try:
        with pytest.raises(ConfigError, match=r"server\.listen"):
            await start(make_settings(database_url, server={"listen": f"127.0.0.1:{first.port}"}))
    finally:
        await first.stop(0)
