"""The event examples of docs/events.md run as written: the webhook receiver verifies what a broker
sends (and refuses a forged request), and the grpcurl WatchIntegrationEvents call streams."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import sys
from pathlib import Path

import httpx
import pytest

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.server.app import start
from tests.helpers.grpcurl import grpcurl_binary
from tests.helpers.processes import free_port
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, make_settings
from tests.helpers.stubs import broker_stub

PAGE = Path(__file__).parent.parent / "docs" / "events.md"


@pytest.fixture
def backend() -> str:
    """The examples do not depend on the storage backend."""
    return "sqlite"


def readme_block(marker: str) -> str:
    text = PAGE.read_text()
    found = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"docs/events.md has no python block after <!-- {marker} -->"
    return found.group(1)


async def test_the_readme_webhook_receiver_verifies_broker_deliveries(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = readme_block("webhook-receiver")
    assert len(code.strip().splitlines()) <= 25
    script = tmp_path / "receiver.py"
    script.write_text(code)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    port = free_port()
    receiver = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env={**os.environ, "BROKER_WEBHOOK_SECRET": secret, "PORT": str(port)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    monkeypatch.setenv("BROKER_WEBHOOK_SECRET", secret)
    url = f"http://127.0.0.1:{port}/hooks"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(200):  # until it listens
                try:
                    forged = await http.post(url, content=b"{}", headers={"webhook-id": "x"})
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
        assert forged.status_code == 400
        settings = make_settings(
            database_url,
            webhooks={"app": {"url": url, "secret_env": "BROKER_WEBHOOK_SECRET"}},
            events={"poll_seconds": 0.1},
        )
        broker = await start(settings)
        try:
            async with broker_stub(broker.port) as stub:
                stored = await stub.StoreIntegration(
                    pb.StoreIntegrationRequest(user_id="u1", provider="github", access_token="a"),
                    metadata=ADMIN,
                )
            assert receiver.stdout is not None
            line = await asyncio.wait_for(receiver.stdout.readline(), 30)
            assert line.decode().split() == [
                "integration.connected",
                stored.integration.id,
                "u1",
            ]
        finally:
            await broker.stop(0)
    finally:
        receiver.kill()
        await receiver.wait()


async def test_the_readme_grpcurl_watch_streams_events(database_url: str) -> None:
    broker = await start(make_settings(database_url, events={"heartbeat_seconds": 60}))
    try:
        async with broker_stub(broker.port) as stub:
            await stub.StoreIntegration(
                pb.StoreIntegrationRequest(user_id="u1", provider="github", access_token="a"),
                metadata=ADMIN,
            )
            await stub.Disconnect(
                pb.DisconnectRequest(user_id="u1", provider="github"), metadata=ADMIN
            )
        process = await asyncio.create_subprocess_exec(
            grpcurl_binary(),
            "-plaintext",
            "-max-time",
            "3",
            "-H",
            f"authorization: Bearer {ADMIN_TOKEN}",
            "-d",
            '{"after_event_id": 0, "types": ["INTEGRATION_EVENT_TYPE_DISCONNECTED"]}',
            f"127.0.0.1:{broker.port}",
            "credentialbroker.v1.CredentialBroker/WatchIntegrationEvents",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await broker.stop(0)
    # The stream stays open until -max-time ends it (DeadlineExceeded); it printed the event.
    assert b"DeadlineExceeded" in err, err
    (item,) = [json.loads(chunk) for chunk in _objects(out.decode())]
    assert item["event"]["type"] == "INTEGRATION_EVENT_TYPE_DISCONNECTED"
    assert item["event"]["user_id"] == "u1"


def _objects(text: str) -> list[str]:
    """grpcurl prints one pretty JSON object per message."""
    decoder = json.JSONDecoder()
    found, index = [], 0
    text = text.strip()
    while index < len(text):
        _, end = decoder.raw_decode(text, index)
        found.append(text[index:end])
        index = end
        while index < len(text) and text[index].isspace():
            index += 1
    return found
