"""Start-up and shutdown as an operator sees them: every failure is one line with the
documented exit code (2 configuration, 3 database), never a traceback; a normal SIGTERM logs
no warning. These run the real ``python -m broker``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from broker.server.callers import hash_token
from tests.helpers.databases import PG_URL, PostgresFactory
from tests.helpers.processes import BrokerProcess, write_toml
from tests.helpers.settings import ADMIN_TOKEN, ENVIRONMENT, KEYS

COMMANDS = [["serve"], ["migrate"], ["check"]]
EXIT_CONFIG, EXIT_DATABASE = 2, 3


def run_broker(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:

    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", *argv],
        env={**clean, "BROKER_KEYS": KEYS, "BROKER_ENVIRONMENT": ENVIRONMENT, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The line that says what went wrong: stderr for serve/migrate, the FAIL row for check."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    if result.stderr.strip():
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert fails, result.stdout
    return fails[-1]


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: _write(d / "latin1.toml", b'[server]\nenvironment = "caf\xe9"\n'), "not UTF-8"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "broken.toml", b"[server\n"), "not valid TOML"),
        (
            lambda d: _write(d / "typo.toml", b"[refresh]\nmargin_second = 10\n"),
            "refresh.margin_second: unknown setting; did you mean margin_seconds?",
        ),
    ],
    ids=["not-utf8", "directory", "not-toml", "unknown-setting"],
)
def test_a_bad_config_file_is_one_line_and_exit_2(
    tmp_path: Path, command: list[str], make: object, expected: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    result = run_broker("--config", str(path), *command, cwd=tmp_path)
    assert result.returncode == EXIT_CONFIG, result.stderr + result.stdout
    assert expected in result.stderr + result.stdout


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_mistyped_variable_is_an_error_with_a_suggestion(
    tmp_path: Path, command: list[str]
) -> None:
    result = run_broker(
        *command, env={"BROKER_DATABSE_URL": "postgresql+asyncpg://db/x"}, cwd=tmp_path
    )
    assert result.returncode == EXIT_CONFIG
    line = one_line_error(result)
    assert "BROKER_DATABSE_URL" in line
    assert "did you mean BROKER_DATABASE_URL?" in line
    assert not (tmp_path / ".broker").exists(), "no fallback to SQLite happened"


def test_an_unrelated_variable_is_reported_and_ignored(tmp_path: Path) -> None:
    result = run_broker("migrate", env={"BROKER_HOME_PAGE": "x"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ignoring environment variable BROKER_HOME_PAGE" in result.stderr


# -- the database ----------------------------------------------------------------------------


@pytest.fixture
async def limited_role(postgres: PostgresFactory) -> AsyncIterator[str]:
    """A role PostgreSQL refuses every connection to: "too many connections" at start."""
    name = f"broker_full_{uuid.uuid4().hex[:8]}"
    await postgres._admin(f'CREATE ROLE "{name}" LOGIN CONNECTION LIMIT 0')
    yield name
    await postgres._admin(f'DROP ROLE IF EXISTS "{name}"')


def _url(**parts: object) -> str:
    return make_url(str(PG_URL)).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


@pytest.mark.postgres
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(
    "failure", ["no-database", "no-role", "wrong-port", "too-many"], ids=lambda f: f
)
def test_database_failures_name_host_database_and_cause(
    request: pytest.FixtureRequest, command: list[str], failure: str, tmp_path: Path
) -> None:
    request.getfixturevalue("postgres")  # PostgreSQL must be configured
    pg = make_url(str(PG_URL))
    host, port, database = pg.host or "localhost", pg.port or 5432, pg.database
    if failure == "no-database":
        database = f"broker_missing_{uuid.uuid4().hex[:6]}"
        url, cause = _url(database=database), f'database "{database}" does not exist'
    elif failure == "no-role":
        url, cause = _url(username="broker_nobody"), 'role "broker_nobody" does not exist'
    elif failure == "wrong-port":
        port = 1  # nothing listens on port 1
        url, cause = _url(port=1), "connection refused"
    else:
        role = request.getfixturevalue("limited_role")
        url, cause = _url(username=role), "too many connections"
    config = write_toml(
        tmp_path / "broker.toml",
        {"callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}}},
    )
    result = run_broker(
        "--config", str(config), *command, env={"BROKER_DATABASE_URL": url}, cwd=tmp_path
    )
    assert result.returncode == EXIT_DATABASE, result.stderr + result.stdout
    line = one_line_error(result)
    assert f"{host}:{port}" in line, line
    assert repr(database) in line, line
    assert cause in line, line


@pytest.mark.postgres
async def test_sigterm_logs_no_warning(postgres: PostgresFactory, tmp_path: Path) -> None:
    url = await postgres.new()
    config = write_toml(
        tmp_path / "broker.toml",
        {
            "server": {"listen": "127.0.0.1:0", "environment": ENVIRONMENT},
            "database": {"url": url},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
        },
    )
    broker = await BrokerProcess(config, {"BROKER_KEYS": KEYS}).start()
    try:
        for _ in range(200):  # the invalidation listener connects after start-up
            if any("cache invalidation channel listening" in line for line in broker.log):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the invalidation listener never connected:\n" + "\n".join(broker.log))
    finally:
        code = await broker.stop()
    assert code == 0
    noisy = [line for line in broker.log if "WARNING" in line or "ERROR" in line]
    assert noisy == [], noisy


def test_the_runtime_loads_the_http_network_backend_at_start(tmp_path: Path) -> None:
    """httpx reaches the network through anyio, which imports its asyncio backend on first use
    (~0.1 s with the event loop held): the runtime does it at start, not in the first provider
    request, where it would stall every call in flight. A fresh interpreter, so that no other
    test has imported it already."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    code = f"""
import asyncio, sys
from broker.runtime import open_runtime
from tests.helpers.settings import make_settings

async def main():
    runtime = await open_runtime(make_settings({url!r}), check_database=False)
    try:
        print("anyio._backends._asyncio" in sys.modules)
    finally:
        await runtime.close()

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True", result.stdout + result.stderr
