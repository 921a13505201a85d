"""Key sources (file permissions, command) and the nonce budget."""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
from pathlib import Path

import pytest

from broker.config import DatabaseSettings, KeysSettings, load_settings
from broker.crypto.aead import NONCE_LIMIT
from broker.crypto.keys import generate_key, load_keyring, parse_keyring
from broker.domain.key_usage import flush_key_usage, read_key_usage
from broker.errors import ConfigError, StorageUnavailable
from broker.server.app import start
from broker.storage.engine import create_engine
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, KEYS, make_settings
from tests.helpers.stubs import broker_stub


def python_command(code: str) -> str:
    return shlex.join([sys.executable, "-c", code])


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    entry = generate_key("k1")
    path = tmp_path / "keys"
    path.write_text(entry + "\n")
    path.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        load_keyring(KeysSettings(file=path))
    message = str(caught.value)
    assert message.startswith("keys.file: ")
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert entry.partition(":")[2] not in message
    path.chmod(0o600)
    assert load_keyring(KeysSettings(file=path)).ids == ("k1",)


def test_key_command_supplies_the_keyring(tmp_path: Path) -> None:
    new, old = generate_key("new"), generate_key("old")
    settings = load_settings(
        env={"BROKER_KEYS__COMMAND": python_command(f"print({new!r}); print({old!r})")}
    )
    assert settings.keys.command is not None
    ring = load_keyring(settings.keys)
    assert ring.ids == ("new", "old")
    assert ring.primary_id == "new"
    # BROKER_KEYS still wins over the command, the command over the file.
    assert load_keyring(KeysSettings(keys=old, command=settings.keys.command)).ids == ("old",)
    assert load_keyring(KeysSettings(command=settings.keys.command, file=tmp_path)).ids == (
        "new",
        "old",
    )


def test_key_command_environment_is_minimal(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process, as the dev-mode test does in a real broker: the command sees the base
    variables and the named passthrough, never the broker's settings or other secrets."""
    monkeypatch.setenv("BROKER_DATABASE_URL", "postgresql+asyncpg://u:db-password@db/x")
    monkeypatch.setenv("BROKER_WEBHOOKS__APP__SECRET", "whsec-canary")
    monkeypatch.setenv("ACME_CLIENT_SECRET", "client-secret-canary")
    monkeypatch.setenv("AWS_PROFILE", "keys")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    entry = generate_key("env")
    code = (
        "import os, sys; "
        "names = sorted(os.environ); "
        "bad = [n for n in names if n.startswith('BROKER_') or n == 'ACME_CLIENT_SECRET']; "
        "sys.exit(f'leaked {bad}') if bad else None; "
        "sys.exit('no passthrough') if os.environ.get('AWS_PROFILE') != 'keys' else None; "
        "sys.exit('no locale') if os.environ.get('LC_ALL') != 'C.UTF-8' else None; "
        f"print({entry!r})"
    )
    keys = KeysSettings(command=python_command(code), command_env=["AWS_*"])
    assert load_keyring(keys).ids == ("env",)


@pytest.mark.parametrize("name", ["BROKER_KEYS", "broker_*", "*", "A B", ""])
def test_command_env_never_names_the_brokers_settings(name: str) -> None:
    with pytest.raises(ValueError, match="command_env"):
        KeysSettings(command="true", command_env=[name])


def test_key_command_failures_are_config_errors() -> None:
    secret = generate_key("k1")
    failing = python_command(
        f"import sys; print({secret!r}); print('vault: permission denied', file=sys.stderr); "
        "sys.exit(3)"
    )
    with pytest.raises(ConfigError) as caught:
        load_keyring(KeysSettings(command=failing))
    message = str(caught.value)
    assert "exited with status 3" in message
    assert "vault: permission denied" in message
    assert secret.partition(":")[2] not in message, "stdout (the keys) must never be echoed"

    with pytest.raises(ConfigError, match=r"keys\.command: cannot run 'no-such-tool-xyz'"):
        load_keyring(KeysSettings(command="no-such-tool-xyz --get keys"))
    slow = python_command("import time; time.sleep(5)")
    with pytest.raises(ConfigError, match=r"did not finish within 0\.3s"):
        load_keyring(KeysSettings(command=slow, command_timeout_seconds=0.3))
    with pytest.raises(ConfigError, match=r"keys\.command \(.*\): holds no key"):
        load_keyring(KeysSettings(command=python_command("pass")))
    with pytest.raises(ConfigError, match="is empty"):
        load_keyring(KeysSettings(command="  "))


def test_keyring_counts_encryptions_per_key() -> None:
    ring = parse_keyring(f"{generate_key('a')},{generate_key('b')}", "test")
    for _ in range(5):
        ring.encrypt(b"x", b"aad")
    blob = ring.encrypt(b"x", b"aad")
    ring.decrypt(blob, b"aad")  # decryption costs no nonce
    assert ring.usage() == {"a": 6}
    taken = ring.take_usage()
    assert taken == {"a": 6}
    assert ring.usage() == {}
    ring.encrypt(b"x", b"aad")
    ring.restore_usage(taken)
    assert ring.usage() == {"a": 7}


async def test_key_usage_adds_up_across_brokers_and_warns(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    entry = generate_key("k1")
    first, second = parse_keyring(entry, "test"), parse_keyring(entry, "test")
    engine = create_engine(DatabaseSettings(url=database_url))
    try:
        for _ in range(3):
            first.encrypt(b"x", b"")
        second.encrypt(b"x", b"")
        with caplog.at_level(logging.WARNING, logger="broker.keys"):
            assert await flush_key_usage(engine, first) == {"k1": 3}
            assert await flush_key_usage(engine, second) == {"k1": 4}
            assert await flush_key_usage(engine, second) == {"k1": 4}  # nothing new
        assert not caplog.records
        assert await read_key_usage(engine) == {"k1": 4}

        second.encrypt(b"x", b"")
        with caplog.at_level(logging.WARNING, logger="broker.keys"):
            await flush_key_usage(engine, second, warn_fraction=4 / NONCE_LIMIT)
        [record] = caplog.records
        assert record.levelno == logging.WARNING
        assert "'k1'" in record.getMessage()
        assert "2^32" in record.getMessage()
        assert entry.partition(":")[2] not in record.getMessage()
    finally:
        await engine.dispose()


async def test_key_usage_is_kept_when_the_database_is_down() -> None:
    ring = parse_keyring(generate_key("k1"), "test")
    ring.encrypt(b"x", b"")
    down = create_engine(
        DatabaseSettings(url="postgresql+asyncpg://nobody@127.0.0.1:1/none", timeout_seconds=1)
    )
    try:
        with pytest.raises(StorageUnavailable):
            await flush_key_usage(down, ring)
    finally:
        await down.dispose()
    assert ring.usage() == {"k1": 1}


async def test_a_serving_broker_counts_its_encryptions(database_url: str) -> None:
    """The periodic flush runs while serving, and once more at shutdown."""
    broker = await start(
        make_settings(database_url, keys={"keys": KEYS, "usage_flush_interval_seconds": 0.2})
    )
    kid = broker.runtime.keyring.primary_id
    try:
        async with broker_stub(broker.port) as stub:
            for n in range(5):
                await stub.StoreIntegration(store_request(user_id=f"u{n}"), metadata=ADMIN)
            # Each store encrypts two tokens; the flush adds them up while the broker serves.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while (await read_key_usage(broker.engine)).get(kid, 0) < 10:
                assert loop.time() < deadline, "key usage never reached the table"
                await asyncio.sleep(0.1)
            await stub.StoreIntegration(store_request(user_id="last"), metadata=ADMIN)
    finally:
        engine = create_engine(DatabaseSettings(url=database_url))
        await broker.stop(0)
    try:
        # The last store's two encryptions were flushed at shutdown at the latest.
        assert (await read_key_usage(engine)).get(kid, 0) >= 12
    finally:
        await engine.dispose()
