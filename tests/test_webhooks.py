"""Webhooks against a real receiver on loopback: Standard Webhooks signatures, retries with
backoff until delivered, per-endpoint order and filters, FAILED after the retry window and
`broker webhooks retry`, a slow endpoint beside fast RPCs, a broker killed mid-retry, and two
replicas delivering each event once."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from broker import cli
from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings, WebhookSettings
from broker.errors import ConfigError
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from tests.helpers.processes import BrokerProcess, write_toml
from tests.helpers.receiver import Receiver, new_secret
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, ENVIRONMENT, KEYS, make_settings
from tests.helpers.stubs import broker_stub
from tests.helpers.waiting import eventually, holds

SECRET_ENV = "TEST_WEBHOOK_SECRET"
FAST_RETRIES = {"retry_first_seconds": 0.05, "retry_max_seconds": 0.2, "timeout_seconds": 2}


def spec_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """The Standard Webhooks check, written from the specification (not the library): HMAC-SHA256
    over "id.timestamp.body" with the base64-decoded secret, v1 signatures space-separated."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(sig, f"v1,{expected}") for sig in headers["webhook-signature"].split()
    )


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = new_secret()
    monkeypatch.setenv(SECRET_ENV, value)
    return value


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def hook(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {"url": receiver.url, "secret_env": SECRET_ENV, **FAST_RETRIES, **extra}


@pytest.fixture
def settings(database_url: str, receiver: Receiver, secret: str) -> Settings:
    return make_settings(
        database_url,
        webhooks={"app": hook(receiver)},
        events={"poll_seconds": 0.1},
    )


async def connect(
    stub: pb_grpc.CredentialBrokerAsyncStub, user: str, provider: str = "github"
) -> str:
    response = await stub.StoreIntegration(
        pb.StoreIntegrationRequest(user_id=user, provider=provider, access_token=f"at-{user}"),
        metadata=ADMIN,
    )
    return response.integration.id


async def settled(receiver: Receiver, n: int) -> None:
    async def enough() -> bool:
        return len(receiver.delivered_ids()) >= n

    await eventually(enough, f"{n} deliveries")


async def test_signed_per_standard_webhooks(
    stub: pb_grpc.CredentialBrokerAsyncStub, receiver: Receiver, secret: str
) -> None:
    iid = await connect(stub, "u1")
    await settled(receiver, 1)
    (request,) = receiver.received()
    assert spec_verify(secret, request.headers, request.body)
    assert not spec_verify(new_secret(), request.headers, request.body)
    tampered = request.body.replace(b"u1", b"u2")
    assert not spec_verify(secret, request.headers, tampered)
    body = json.loads(request.body)
    assert body["type"] == "integration.connected"
    assert body["data"]["integration_id"] == iid
    assert request.headers["webhook-id"] == f"evt_{body['data']['id']}"
    assert request.headers["content-type"] == "application/json"


def counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "broker_webhook_deliveries_total", {"endpoint": "app", "outcome": outcome}
    )
    return value or 0.0


async def test_retried_after_each_failure_then_stops(
    stub: pb_grpc.CredentialBrokerAsyncStub, receiver: Receiver
) -> None:
    retries, delivered = counted("retry"), counted("delivered")
    receiver.script = [500] * 5
    await connect(stub, "u1")
    await settled(receiver, 1)
    await asyncio.sleep(1.0)  # several backoff periods: nothing more may arrive
    requests = receiver.received()
    assert [r.status for r in requests] == [500] * 5 + [200]
    assert len({r.headers["webhook-id"] for r in requests}) == 1, "one event, the same id"
    assert counted("retry") - retries == 5
    assert counted("delivered") - delivered == 1


@pytest.mark.parametrize("url", ["http://example.com/hooks", "ftp://127.0.0.1/x", "https://"])
def test_webhook_url_must_be_https_unless_loopback(url: str) -> None:
    with pytest.raises(ValidationError, match="https"):
        WebhookSettings(url=url, secret_env="X")
    assert WebhookSettings(url="http://localhost:8080/h", secret_env="X")


async def test_a_missing_or_invalid_secret_stops_start_up(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(database_url, webhooks={"app": hook(receiver)})
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(
        ConfigError, match=f"webhooks.app.secret_env: environment variable {SECRET_ENV}"
    ):
        await start(settings)
    monkeypatch.setenv(SECRET_ENV, "whsec_not*base64")
    with pytest.raises(ConfigError) as caught:
        await start(settings)
    assert "not*base64" not in str(caught.value)
    bad_type = make_settings(database_url, webhooks={"app": hook(receiver, types=["NOPE"])})
    monkeypatch.setenv(SECRET_ENV, new_secret())
    with pytest.raises(ConfigError, match="unknown event type"):
        await start(bad_type)


async def test_order_per_endpoint_and_filters(
    database_url: str, receiver: Receiver, secret: str
) -> None:
    with Receiver() as other:
        settings = make_settings(
            database_url,
            webhooks={
                "app": hook(receiver),
                "ops": hook(other, types=["DISCONNECTED"], providers=["slack"]),
            },
            events={"poll_seconds": 0.1},
        )
        broker = await start(settings)
        try:
            async with broker_stub(broker.port) as stub:
                receiver.script = [503, 503]  # the first event is late: the others must wait
                ids = [
                    await connect(stub, f"u{i}", "slack" if i % 2 else "github") for i in range(6)
                ]
                for iid in ids:
                    await stub.Disconnect(
                        pb.DisconnectRequest(integration_id=iid, skip_provider_revocation=True),
                        metadata=ADMIN,
                    )
                await settled(receiver, 12)
                await settled(other, 3)
        finally:
            await broker.stop(0)
    delivered = [int(i.removeprefix("evt_")) for i in receiver.delivered_ids()]
    assert delivered == sorted(delivered)
    assert len(set(delivered)) == 12
    bodies = [json.loads(r.body)["data"] for r in other.received()]
    assert {(b["type"], b["provider"]) for b in bodies} == {("DISCONNECTED", "slack")}
    assert len(bodies) == 3


async def test_failed_after_the_retry_window_then_retried_by_the_cli(
    database_url: str, receiver: Receiver, secret: str, tmp_path: Path
) -> None:
    settings = make_settings(
        database_url,
        webhooks={"app": hook(receiver, retry_for_seconds=0.3)},
        events={"poll_seconds": 0.1},
    )
    broker = await start(settings)
    try:
        async with broker_stub(broker.port) as stub:
            receiver.otherwise = 500
            await connect(stub, "u1")

            async def gave_up() -> bool:
                return len(receiver.received()) >= 2 and await _states(broker) == ["FAILED"]

            await eventually(gave_up, "the delivery to be FAILED")
            # The next event is not held back by the failed one.
            receiver.otherwise = 200
            await connect(stub, "u2")
            await settled(receiver, 1)
            config = write_toml(
                tmp_path / "broker.toml",
                {
                    "server": {"environment": ENVIRONMENT},
                    "database": {"url": database_url},
                    "keys": {"keys": KEYS},
                    "webhooks": {"app": hook(receiver)},
                },
            )
            listed = await asyncio.to_thread(
                _cli, ["--config", str(config), "webhooks", "list", "--json"]
            )
            assert listed[0] == 0
            (row,) = json.loads(listed[1])
            assert (row["name"], row["FAILED"], row["DELIVERED"]) == ("app", 1, 1)
            code, out = await asyncio.to_thread(
                _cli, ["--config", str(config), "webhooks", "retry", "app"]
            )
            assert code == 0
            assert "1 failed delivery" in out
            await settled(receiver, 2)
            code, out = await asyncio.to_thread(
                _cli, ["--config", str(config), "webhooks", "test", "app"]
            )
            assert code == 0
            assert "delivered (HTTP 200)" in out
            assert spec_verify(
                secret, receiver.received()[-1].headers, receiver.received()[-1].body
            )
    finally:
        await broker.stop(0)


def _cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


async def _states(broker: Broker) -> list[str]:
    from sqlalchemy import select

    from broker.storage.tables import webhook_deliveries

    async with broker.engine.connect() as conn:
        rows = await conn.execute(select(webhook_deliveries.c.state))
        return [r[0] for r in rows]


async def test_a_slow_endpoint_does_not_hold_up_rpcs(
    stub: pb_grpc.CredentialBrokerAsyncStub, receiver: Receiver
) -> None:
    receiver.hold = threading.Event()
    try:
        await connect(stub, "u0")
        await eventually(lambda: holds(receiver.arrived == 1), "the first delivery in flight")
        # While the endpoint sits on the first delivery, RPCs that write events go through.
        for i in range(1, 6):
            await asyncio.wait_for(connect(stub, f"u{i}"), 10)
    finally:
        receiver.hold.set()
    await settled(receiver, 6)


# -- broker processes -----------------------------------------------------------------------------


def process_config(path: Path, url: str, receiver: Receiver, **hook_extra: Any) -> Path:
    return write_toml(
        path,
        {
            "server": {"listen": "127.0.0.1:0", "environment": ENVIRONMENT},
            "database": {"url": url},
            "refresh": {"background": False},
            "events": {"poll_seconds": 0.1},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
            "webhooks": {
                "app": {
                    "url": receiver.url,
                    "secret_env": SECRET_ENV,
                    "timeout_seconds": 1,
                    "retry_first_seconds": 0.2,
                    "retry_max_seconds": 0.4,
                    **hook_extra,
                }
            },
        },
    )


@pytest.fixture
async def processes() -> AsyncIterator[list[BrokerProcess]]:
    started: list[BrokerProcess] = []
    yield started
    for process in started:
        await process.kill()


async def test_a_broker_killed_mid_retry_resumes_and_delivers_once(
    database_url: str,
    receiver: Receiver,
    secret: str,
    tmp_path: Path,
    processes: list[BrokerProcess],
) -> None:
    config = process_config(tmp_path / "broker.toml", database_url, receiver)
    env = {"BROKER_KEYS": KEYS, SECRET_ENV: secret}
    first = await BrokerProcess(config, env).start()
    processes.append(first)
    receiver.otherwise = 500
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        await connect(pb_grpc.CredentialBrokerStub(channel), "u1")
    await eventually(lambda: holds(len(receiver.received()) >= 2), "two failed attempts")
    await first.kill()  # SIGKILL between retries: its lease stays behind until it lapses
    failed = len(receiver.received())
    receiver.otherwise = 200
    second = await BrokerProcess(config, env).start()
    processes.append(second)
    await settled(receiver, 1)
    await asyncio.sleep(1.5)
    requests = receiver.received()
    assert [r.status for r in requests] == [500] * failed + [200]
    assert len({r.headers["webhook-id"] for r in requests}) == 1
    assert await second.stop() == 0


@pytest.mark.postgres
async def test_two_replicas_deliver_each_event_once(
    postgres: Any,
    receiver: Receiver,
    secret: str,
    tmp_path: Path,
    processes: list[BrokerProcess],
) -> None:
    url = await postgres.new()
    config = process_config(tmp_path / "broker.toml", url, receiver)
    env = {"BROKER_KEYS": KEYS, SECRET_ENV: secret}
    replicas = await asyncio.gather(*(BrokerProcess(config, env).start() for _ in range(2)))
    processes.extend(replicas)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p.port}") for p in replicas]
    try:
        stubs = [pb_grpc.CredentialBrokerStub(c) for c in channels]
        await asyncio.gather(*(connect(stubs[i % 2], f"u{i}") for i in range(20)))
        await settled(receiver, 20)
        await asyncio.sleep(1.5)
    finally:
        for channel in channels:
            await channel.close(None)
    delivered = receiver.delivered_ids()
    assert len(receiver.received()) == 20, "no event sent twice"
    assert len(set(delivered)) == 20
    numbers = [int(i.removeprefix("evt_")) for i in delivered]
    assert numbers == sorted(numbers)
    codes = await asyncio.gather(*(p.stop() for p in replicas))
    assert codes == [0, 0]
