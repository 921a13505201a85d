"""The "Workflow runners and grants" examples of docs/callers.md run as written: its TOML
callers, its grpcurl commands and its Python orchestrator + runner, against a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, make_settings
from tests.helpers.stubs import broker_stub

PAGE = Path(__file__).resolve().parent.parent / "docs" / "callers.md"
ORCHESTRATOR_TOKEN = "cb_readme-orchestrator"
RUNNER_TOKEN = "cb_readme-runner"


def section() -> str:
    text = PAGE.read_text()
    start = text.index("## Workflow runners and grants")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), flags=re.DOTALL)


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
async def broker(database_url: str) -> AsyncIterator[Broker]:
    (toml,) = blocks("toml")
    callers = tomllib.loads(toml)["callers"]
    callers["orchestrator"]["token_sha256"] = hash_token(ORCHESTRATOR_TOKEN)
    callers["workflow-runner"]["token_sha256"] = hash_token(RUNNER_TOKEN)
    # The test looks at every caller's grants, as an operator would.
    callers["admin"] = {"token_sha256": hash_token(ADMIN_TOKEN), "manage_all_grants": True}
    running = await start(make_settings(database_url, callers=callers))
    async with broker_stub(running.port) as stub:
        await stub.StoreIntegration(
            store_request(user_id="user-123", provider="google"), metadata=ADMIN
        )
    yield running
    await running.stop(0)


async def run(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *command,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, out.decode(), err.decode()


async def run_states(broker: Broker, run_id: str) -> list[int]:
    async with broker_stub(broker.port) as stub:
        listed = await stub.ListGrants(
            pb.ListGrantsRequest(run_id=run_id, include_inactive=True), metadata=ADMIN
        )
    return [g.state for g in listed.grants]


async def test_python_orchestrator_and_runner(broker: Broker, tmp_path: Path) -> None:
    (code,) = blocks("python")
    assert not re.search(r"^(from|import) broker\b", code, re.M), "client imports only"
    script = tmp_path / "orchestrator.py"
    script.write_text(code)
    status, out, err = await run(
        [sys.executable, str(script)],
        {
            "BROKER_ADDRESS": f"127.0.0.1:{broker.port}",
            "ORCHESTRATOR_TOKEN": ORCHESTRATOR_TOKEN,
            "RUNNER_TOKEN": RUNNER_TOKEN,
        },
    )
    assert status == 0, err
    assert "calling google as user-123, token valid until" in out
    assert await run_states(broker, "run-0001") == [pb.GRANT_STATE_REVOKED]


async def test_grpcurl_commands(broker: Broker) -> None:
    create, use = (b for b in blocks("sh"))
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "B": f"127.0.0.1:{broker.port}",
        "S": "credentialbroker.v1.CredentialBroker",
        "TOKEN": ORCHESTRATOR_TOKEN,
        "RUNNER_TOKEN": RUNNER_TOKEN,
    }
    status, out, err = await run(["bash", "-ec", create], env)
    assert status == 0, err
    created = json.loads(out)
    assert created["grant_token"].startswith("cbg_")
    assert created["grant"]["run_id"] == "run-0001"
    # The second block sets GRANT to the placeholder shown above; use the real one.
    lines = [line for line in use.splitlines() if not line.startswith("GRANT=")]
    status, out, err = await run(
        ["bash", "-ec", "\n".join(lines)], {**env, "GRANT": created["grant_token"]}
    )
    assert status == 0, err
    answers = [json.loads(part) for part in re.split(r"(?<=\n})\n", out.strip()) if part]
    assert answers[0]["access_token"].startswith("at-")
    assert answers[1]["grants"][0]["state"] == "GRANT_STATE_REVOKED"
    assert await run_states(broker, "run-0001") == [pb.GRANT_STATE_REVOKED]
