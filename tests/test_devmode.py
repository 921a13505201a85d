"""`broker serve --dev` (what `make run` starts) as a real process in an empty directory."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from broker import devmode
from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.crypto.keys import generate_key
from broker.errors import ConfigError
from broker.server.app import start
from broker.server.callers import hash_token
from tests.helpers.devbroker import SERVING, DevBroker
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.processes import clean_env, free_port
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, make_settings
from tests.helpers.stubs import broker_stub

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def project(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    path.mkdir()
    return path


@pytest.fixture
def launch(project: Path) -> Iterator[Callable[..., DevBroker]]:
    started: list[DevBroker] = []

    def start(**env: str) -> DevBroker:
        broker = DevBroker(project, free_port(), env)
        started.append(broker)
        broker.wait_ready()
        return broker

    yield start
    for broker in started:
        broker.kill()


def auth(token: str) -> Any:
    return (("authorization", f"Bearer {token}"),)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_dev_mode_starts_in_an_empty_directory_and_keeps_its_data(
    project: Path, launch: Callable[[], DevBroker]
) -> None:
    assert not any(project.iterdir())
    first = launch()
    home = project / ".broker"
    token = (home / "dev-caller-token").read_text().strip()
    key_file = (home / "keys").read_text()
    assert token
    assert mode(home / "keys") == 0o600
    assert mode(home / "dev-caller-token") == 0o600
    assert (home / "broker.db").exists()

    stub = pb_grpc.CredentialBrokerStub(first.channel)
    stored = stub.StoreIntegration(
        pb.StoreIntegrationRequest(
            user_id="dev-user",
            provider="github",
            access_token="at-devmode-canary",
            refresh_token="rt-devmode-canary",
            expires_in_seconds=3600,
        ),
        metadata=auth(token),
        timeout=10,
    )
    assert stored.created
    got = stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=stored.integration.id),
        metadata=auth(token),
        timeout=10,
    )
    assert got.access_token == "at-devmode-canary"
    with pytest.raises(grpc.RpcError) as denied:
        stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="dev-user"), timeout=10)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED

    banner = first.stdout
    assert f"listening on {first.address}" in banner
    assert f"TOKEN=$(cat {home.resolve() / 'dev-caller-token'})" in banner
    assert f'grpcurl -plaintext -H "authorization: Bearer $TOKEN" {first.address} list' in banner
    assert first.stop() == 0
    assert "Traceback" not in first.stderr
    assert "devmode-canary" not in first.stderr + first.stdout

    second = launch()
    assert (home / "dev-caller-token").read_text().strip() == token
    assert (home / "keys").read_text() == key_file
    again = pb_grpc.CredentialBrokerStub(second.channel).GetAccessToken(
        pb.GetAccessTokenRequest(user_id="dev-user", provider="github"),
        metadata=auth(token),
        timeout=10,
    )
    assert again.access_token == "at-devmode-canary"
    assert again.integration_id == stored.integration.id
    assert second.stop(signal.SIGINT) == 0


def bash(script: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``script`` pasted into a shell, stopping at the first failing command."""
    return subprocess.run(
        ["bash", "-ec", script],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def banner_script(banner: str) -> str:
    """The shell lines under "Try it", as a newcomer pastes them into another terminal."""
    return banner.split("Try it", 1)[1].split("\n", 1)[1]


def test_banner_examples_work_as_pasted(launch: Callable[[], DevBroker], tmp_path: Path) -> None:
    broker = launch()
    script = banner_script(broker.stdout)
    assert script.count("grpcurl ") == 3, broker.stdout
    result = bash(script, cwd=tmp_path)  # anywhere, not only in the broker's directory
    assert result.returncode == 0, f"{script}\n{result.stderr}"
    assert "credentialbroker.v1.CredentialBroker" in result.stdout
    assert '"created": true' in result.stdout
    assert '"access_token": "at-example"' in result.stdout
    assert broker.stop() == 0


def run_cli(project: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *argv],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_operator_commands_find_the_dev_broker_with_nothing_configured(
    launch: Callable[[], DevBroker], project: Path
) -> None:
    broker = launch()
    token = (project / ".broker" / "dev-caller-token").read_text().strip()
    stored = pb_grpc.CredentialBrokerStub(broker.channel).StoreIntegration(
        store_request(user_id="dev-user", provider="github"), metadata=auth(token), timeout=10
    )
    check = run_cli(project, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "FAIL" not in check.stdout
    assert re.search(r"^OK\s+callers\s+dev$", check.stdout, re.MULTILINE), check.stdout
    keys = run_cli(project, "keys", "status")
    assert keys.returncode == 0, keys.stderr
    listed = run_cli(project, "integrations", "list", "--user", "dev-user")
    assert listed.returncode == 0, listed.stderr
    assert stored.integration.id in listed.stdout
    audit = run_cli(project, "audit", "--user", "dev-user")
    assert audit.returncode == 0, audit.stderr
    assert "StoreIntegration" in audit.stdout
    assert broker.stop() == 0


def test_beside_a_dev_broker_a_configuration_still_wins(project: Path) -> None:
    (project / ".broker").mkdir()
    (project / ".broker" / "keys").write_text("junk\n")  # would fail if it were read
    (project / "broker.toml").write_text('[database]\nurl = "sqlite+aiosqlite:///./other.db"\n')
    result = run_cli(project, "--config", "broker.toml", "check")
    assert "junk" not in result.stdout
    assert re.search(r"^FAIL\s+keys\s+", result.stdout, re.MULTILINE), result.stdout


def test_dev_mode_keeps_its_token_when_a_config_adds_callers(
    launch: Callable[..., DevBroker], project: Path
) -> None:
    (project / "broker.toml").write_text(
        f'[callers.admin]\ntoken_sha256 = "{hash_token(ADMIN_TOKEN)}"\n'
    )
    broker = launch(BROKER_CONFIG="broker.toml")
    token = (project / ".broker" / "dev-caller-token").read_text().strip()
    stub = pb_grpc.CredentialBrokerStub(broker.channel)
    for credential in (token, ADMIN_TOKEN):
        stub.ListIntegrations(
            pb.ListIntegrationsRequest(user_id="u"), metadata=auth(credential), timeout=10
        )
    assert "TOKEN=$(cat" in broker.stdout
    assert broker.stop() == 0


def test_a_configured_dev_caller_wins_and_the_banner_says_so(tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    mine = next(iter(settings.callers.values()))
    settings = settings.model_copy(update={"callers": {"dev": mine}})
    prepared, token = devmode.prepare(settings, home=tmp_path / "home")
    assert token is None
    assert prepared.callers == {"dev": mine}
    assert not (tmp_path / "home" / "dev-caller-token").exists()
    assert "caller 'dev' comes from your configuration" in devmode.banner(
        "127.0.0.1:0", 50051, token
    )


def test_sigterm_drains_health_then_exits_cleanly(launch: Callable[[], DevBroker]) -> None:
    broker = launch()
    watch = health_pb2_grpc.HealthStub(broker.channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=15
    )
    assert next(watch).status == SERVING
    started = time.monotonic()
    broker.process.send_signal(signal.SIGTERM)
    # Health goes NOT_SERVING first, so load balancers drain before the server stops.
    assert next(watch).status == NOT_SERVING
    watch.cancel()
    assert broker.process.wait(timeout=8) == 0
    assert time.monotonic() - started < 8
    assert "Traceback" not in broker.stderr


def test_dev_mode_refuses_a_non_loopback_address(project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--dev"],
        cwd=project,
        env=clean_env(BROKER_LISTEN=f"0.0.0.0:{free_port()}"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "server.listen" in result.stderr
    assert "loopback" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / ".broker").exists(), "a refused start must not create files"


# -- graceful shutdown of an in-process broker ----------------------------------------------


@pytest.fixture
def backend() -> str:
    """Only the in-flight test below uses a database fixture: SQLite, whose write lock the test
    can hold from outside to keep a call in flight."""
    return "sqlite"


async def test_in_flight_call_finishes_during_graceful_shutdown(database_url: str) -> None:
    broker = await start(make_settings(database_url))
    entered = asyncio.Event()
    store = broker.service.store

    async def tracked_store(command: Any) -> Any:
        entered.set()
        return await store(command)

    broker.service.store = tracked_store  # type: ignore[method-assign,assignment]
    blocker = sqlite3.connect(make_url(database_url).database or "", isolation_level=None)
    stopping: asyncio.Task[None] | None = None
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: StoreIntegration must wait
        async with broker_stub(broker.port) as stub:
            call = stub.StoreIntegration(store_request(), metadata=ADMIN, timeout=10)
            in_flight = asyncio.ensure_future(call)
            await asyncio.wait_for(entered.wait(), 10)
            await asyncio.sleep(0.1)  # from the service into the database's lock wait
            assert not in_flight.done()
            stopping = asyncio.create_task(broker.stop(5))
            await asyncio.sleep(0.2)
            assert not stopping.done(), "stop did not wait for the in-flight call"
            blocker.execute("COMMIT")
            response = await in_flight
            assert response.created
            await asyncio.wait_for(stopping, 5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetIntegration(
                    pb.GetIntegrationRequest(integration_id=response.integration.id),
                    metadata=ADMIN,
                    timeout=2,
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        blocker.close()
        if stopping is None:
            await broker.stop(0)


async def test_an_empty_dev_token_file_is_not_an_empty_credential(
    tmp_path: Path, database_url: str
) -> None:
    home = tmp_path / "dev-home"
    home.mkdir()
    (home / "dev-caller-token").write_text("\n")  # e.g. truncated by a full disk
    base = make_settings(database_url).model_copy(update={"callers": {}})
    try:
        settings, _token = devmode.prepare(base, home=home)
    except ConfigError:
        return  # refusing to start is a fine answer too
    broker = await start(settings)
    try:
        async with broker_stub(broker.port) as stub:
            await expect_error(
                stub.ListIntegrations(
                    pb.ListIntegrationsRequest(user_id="u"),
                    metadata=(("authorization", "Bearer "),),
                ),
                grpc.StatusCode.UNAUTHENTICATED,
            )
    finally:
        await broker.stop(0)


# -- the README's walk-through, with the demo provider ------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def walkthrough_script() -> str:
    text = README.read_text()
    start = text.index("<!-- walkthrough:")
    end = text.index("<!-- end of walkthrough -->")
    blocks = re.findall(r"```sh\n(.*?)```", text[start:end], re.DOTALL)
    assert len(blocks) >= 6, "the walk-through lost its steps"
    return "set -euo pipefail\n" + "\n".join(blocks)


def test_the_readme_walkthrough_runs_as_written(project: Path) -> None:
    """Every step of the README's walk-through, pasted into bash beside `make run`'s broker:
    refresh, force_refresh, background refresh, PKCE, Disconnect with revocation, the CLI.
    Only the two ports differ (tests must not take the fixed ones)."""
    provider_port = free_port()
    broker = DevBroker(project, free_port(), args=("--demo-provider", str(provider_port)))
    try:
        broker.wait_ready()
        assert f"http://127.0.0.1:{provider_port}" in broker.stdout
        script = walkthrough_script()
        script = script.replace("127.0.0.1:50051", broker.address)
        script = script.replace("127.0.0.1:8765", f"127.0.0.1:{provider_port}")
        result = bash(script, cwd=project, timeout=180)
        out = result.stdout
        assert result.returncode == 0, f"{out}\n{result.stderr}"
        assert out.count('"refreshed": true') == 2, out  # on demand, then forced
        assert '"refresh_calls": 2' in out
        carol = out.split('"user_id": "carol"')[-1]
        assert '"last_refreshed_at"' in carol, "the background pass refreshed carol's token"
        bob = out.split('"user_id": "bob"', 1)[1]  # CompleteAuthorization's answer
        assert "INTEGRATION_STATUS_CONNECTED" in bob.split("}", 1)[0] or '"created": true' in bob
        assert "REVOCATION_OUTCOME_REVOKED" in out
        assert "INTEGRATION_DISCONNECTED" in result.stderr
        assert "refused, as expected" in out
        assert not re.search(r'"revoked_tokens": 0\b', out.rsplit("refused, as expected", 1)[1])
        assert "FAIL" not in out.rsplit("\n", 12)[-1]  # broker check, last
        assert broker.stop() == 0
    finally:
        broker.kill()


def test_dev_provider_command_prints_its_settings_and_serves(tmp_path: Path) -> None:
    import tomllib

    import httpx

    from broker.config import ProviderSettings

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "dev-provider", "--port", str(port)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while not any(line.startswith("  refreshes answered") for line in lines):
            line = process.stdout.readline()
            assert line, (
                f"dev-provider exited early: {process.stderr.read() if process.stderr else ''}"
            )
            lines.append(line)
        printed = "".join(lines)
        section = printed[printed.index("[providers.demo]") :].split("\n\n", 1)[0]
        demo = tomllib.loads(section)["providers"]["demo"]
        settings = ProviderSettings.model_validate(demo)
        assert settings.token_url == f"http://127.0.0.1:{port}/token"
        base = f"http://127.0.0.1:{port}"
        grant = httpx.get(f"{base}/grant?user_id=zoe&expires_in=30", timeout=10).json()
        assert grant["user_id"] == "zoe"
        assert grant["provider"] == "demo"
        assert grant["expires_in_seconds"] == 30
        assert grant["refresh_token"].startswith("rt-")
        # Consent from a terminal: a BeginAuthorization answer in, the callback's fields out.
        url = (
            f"{base}/authorize?client_id=demo-client&state=s1&redirect_uri="
            f"{base}/callback&code_challenge=abc&code_challenge_method=S256"
        )
        consent = httpx.post(f"{base}/consent", json={"authorization_url": url}, timeout=10).json()
        assert consent["state"] == "s1"
        assert consent["code"].startswith("code-")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_dev_provider_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "broker", "dev-provider", "--port", str(port)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"broker: dev provider: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "pick another port with --port"
    ]


# -- the operator CLI beside `serve --dev --demo-provider` -------------------------------------


def test_cli_disconnect_beside_the_dev_broker_revokes_at_the_demo_provider(
    project: Path,
) -> None:
    """The CLI uses the providers the dev broker has (the demo provider too), so its
    disconnect revokes at the provider exactly as the RPC does."""
    import httpx
    from google.protobuf import json_format

    provider_port = free_port()
    broker = DevBroker(project, free_port(), args=("--demo-provider", str(provider_port)))
    try:
        broker.wait_ready()
        base = f"http://127.0.0.1:{provider_port}"
        grant = httpx.get(f"{base}/grant?user_id=erin", timeout=10).json()
        token = (project / ".broker" / "dev-caller-token").read_text().strip()
        stored = pb_grpc.CredentialBrokerStub(broker.channel).StoreIntegration(
            json_format.ParseDict(grant, pb.StoreIntegrationRequest()),
            metadata=auth(token),
            timeout=10,
        )
        done = run_cli(project, "integrations", "disconnect", stored.integration.id)
        assert done.returncode == 0, done.stderr
        assert "DISCONNECTED; provider revocation: REVOKED" in done.stdout
        assert httpx.get(f"{base}/stats", timeout=10).json()["revoked_tokens"] >= 1
        # Selected by user and provider, as the RPC's other selector form.
        shown = run_cli(project, "integrations", "show", "--user", "erin", "--provider", "demo")
        assert shown.returncode == 0, shown.stderr
        assert "DISCONNECTED" in shown.stdout
        assert broker.stop() == 0
    finally:
        broker.kill()
    # A dev broker started without the demo provider leaves no provider behind for the CLI.
    again = DevBroker(project, free_port())
    try:
        again.wait_ready()
        assert not (project / ".broker" / devmode.PROVIDERS_FILE).exists()
    finally:
        again.kill()


def test_demo_provider_port_in_use_names_the_serve_flag(project: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "broker", "serve", "--dev", "--demo-provider", str(port)],
            cwd=project,
            env=clean_env(BROKER_LISTEN=f"127.0.0.1:{free_port()}"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"broker: dev provider: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "pick another port with --demo-provider PORT"
    )


# -- files are the owner's alone ----------------------------------------------------------------


def test_dev_mode_files_are_private_whatever_the_umask(
    project: Path, launch: Callable[[], DevBroker], loose_umask: None
) -> None:
    broker = launch()
    home = project / ".broker"
    token = (home / "dev-caller-token").read_text().strip()
    stub = pb_grpc.CredentialBrokerStub(broker.channel)
    stub.StoreIntegration(
        pb.StoreIntegrationRequest(user_id="u", provider="github", access_token="at-private"),
        metadata=auth(token),
        timeout=10,
    )
    # -wal and -shm exist while the broker has the database open.
    found = {p.name: mode(p) for p in home.iterdir()}
    assert {"broker.db", "broker.db-wal", "broker.db-shm", "keys", "dev-caller-token"} <= set(
        found
    ), found
    assert mode(home) == 0o700
    assert {name: m for name, m in found.items() if m != 0o600} == {}
    assert broker.stop() == 0


def test_a_loose_dev_token_file_is_tightened_with_a_warning(
    project: Path, launch: Callable[[], DevBroker], loose_umask: None
) -> None:
    home = project / ".broker"
    home.mkdir(mode=0o755)
    token_file = home / "dev-caller-token"
    token_file.write_text("dev-token-from-an-older-broker\n")
    token_file.chmod(0o644)
    broker = launch()
    assert mode(token_file) == 0o600
    assert mode(home) == 0o700
    warnings = [
        line
        for line in broker.stderr.splitlines()
        if "WARNING" in line and ".broker/dev-caller-token" in line
    ]
    assert len(warnings) == 1, broker.stderr
    assert "0644" in warnings[0]
    assert "0600" in warnings[0]
    # Tightened, not replaced: the token the developer has still works.
    stub = pb_grpc.CredentialBrokerStub(broker.channel)
    listed = stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="u"),
        metadata=auth("dev-token-from-an-older-broker"),
        timeout=10,
    )
    assert list(listed.integrations) == []
    assert "dev-token-from-an-older-broker" not in broker.stderr
    assert broker.stop() == 0


def test_keys_command_gets_no_broker_variables(
    project: Path, launch: Callable[..., DevBroker], tmp_path: Path
) -> None:
    """A keys.command that prints its environment, in a real broker whose environment holds
    the database URL, a client secret and a secrets manager's credentials."""
    dump = tmp_path / "child-env.txt"
    key = generate_key("cmd")
    config = project / "broker.toml"
    config.write_text(
        f'[keys]\ncommand = "sh -c \'env > {dump}; echo {key}\'"\ncommand_env = ["VAULT_*"]\n'
    )
    launch(
        BROKER_CONFIG=str(config),
        BROKER_DATABASE_URL=f"sqlite+aiosqlite:///{project / 'private.db'}",
        GITHUB_CLIENT_SECRET="client-secret-canary",
        VAULT_ADDR="https://vault.test",
        VAULT_TOKEN="vault-token-canary",
    )
    seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert [name for name in seen if name.startswith("BROKER_")] == []
    assert "client-secret-canary" not in dump.read_text()
    assert seen["VAULT_ADDR"] == "https://vault.test"
    assert seen["VAULT_TOKEN"] == "vault-token-canary"
    assert "PATH" in seen
