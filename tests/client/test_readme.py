"""The Python client page's examples (docs/python.md, the same two as the package's
clients/python/README.md) run as written against a real `broker serve --dev --demo-provider`
process (what `make run` starts), and the client imports nothing of the server."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.devbroker import DevBroker
from tests.helpers.processes import clean_env, free_port

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)


EXAMPLES = python_blocks(ROOT / "docs" / "python.md")


@pytest.fixture(scope="module")
def dev_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBroker]:
    home = tmp_path_factory.mktemp("checkout")
    broker = DevBroker(home, free_port(), args=("--demo-provider", str(free_port())))
    try:
        broker.wait_ready()
        yield broker
    finally:
        broker.stop()


def run(code: str, broker: DevBroker) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=broker.cwd,
        env=clean_env(BROKER_LISTEN=broker.address),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_readme_has_the_examples() -> None:
    assert len(EXAMPLES) == 2
    # The package's own README shows the same two, so what PyPI shows is what runs here.
    assert python_blocks(CLIENT / "README.md") == EXAMPLES
    assert len([line for line in EXAMPLES[0].splitlines() if line.strip()]) <= 16


def test_sync_example_runs_as_written(dev_broker: DevBroker) -> None:
    result = run(EXAMPLES[0], dev_broker)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.startswith("Bearer at-example valid until ")
    reason, code, request_id = second.split()
    assert (reason, code) == ("INTEGRATION_NOT_FOUND", "NOT_FOUND")
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)


def test_async_example_runs_as_written(dev_broker: DevBroker) -> None:
    assert run(EXAMPLES[0], dev_broker).returncode == 0  # it lists what the first one stored
    result = run(EXAMPLES[1], dev_broker)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    _, provider, status = line.split()
    assert (provider, status) == ("twitter", "INTEGRATION_STATUS_CONNECTED")


def test_client_distribution_stands_alone() -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=~; ]", dep, maxsplit=1)[0] for dep in project["dependencies"]}
    assert names == {"grpcio", "grpcio-status", "protobuf"}
    assert project["requires-python"] == ">=3.11"
    assert (CLIENT / "src" / "credentialbroker_client" / "py.typed").exists()
    probe = (
        "import sys, credentialbroker_client\n"
        "server = {'broker', 'sqlalchemy', 'asyncpg', 'cryptography', 'pydantic', 'httpx'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & server))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_server_and_client_share_one_generated_module() -> None:
    from broker.api.credentialbroker.v1 import broker_pb2, broker_pb2_grpc
    from credentialbroker_client import broker_pb2 as client_pb2
    from credentialbroker_client import broker_pb2_grpc as client_pb2_grpc

    assert broker_pb2.DESCRIPTOR is client_pb2.DESCRIPTOR
    assert broker_pb2.GetAccessTokenRequest is client_pb2.GetAccessTokenRequest
    assert broker_pb2_grpc.CredentialBrokerStub is client_pb2_grpc.CredentialBrokerStub
