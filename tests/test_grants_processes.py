"""Writes by another process reach a running broker: a grant revoked on replica A is refused
on replica B within a second (PostgreSQL, two broker processes), and on SQLite a CLI
disconnect or grant revocation is seen by the very next call of the broker on that file."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import DatabaseSettings
from broker.server.app import Broker, start
from broker.server.callers import hash_token
from broker.storage.engine import create_engine
from broker.storage.schema import migrate
from tests.helpers.databases import PostgresFactory
from tests.helpers.errors import expect_error
from tests.helpers.grants import GRANT_RUNNER, GRANT_RUNNER_TOKEN, grant_callers, with_grant
from tests.helpers.integrations import store_request
from tests.helpers.processes import BrokerProcess, run_cli, write_toml
from tests.helpers.settings import ADMIN, ADMIN_TOKEN, ENVIRONMENT, KEYS, make_settings
from tests.helpers.stubs import broker_stub

Code = grpc.StatusCode


@pytest.fixture
async def sqlite_broker(tmp_path: Path) -> AsyncIterator[tuple[str, Broker]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    engine = create_engine(DatabaseSettings(url=url))
    await migrate(engine, ENVIRONMENT)
    await engine.dispose()
    running = await start(make_settings(url, callers=grant_callers()))
    yield url, running
    await running.stop(0)


async def test_sqlite_cli_disconnect_reaches_the_running_broker(
    sqlite_broker: tuple[str, Broker],
) -> None:
    url, broker = sqlite_broker
    async with broker_stub(broker.port) as stub:
        stored = await stub.StoreIntegration(store_request(user_id="user-a"), metadata=ADMIN)
        iid = stored.integration.id
        request = pb.GetAccessTokenRequest(integration_id=iid)
        # Served twice: the second answer comes from the broker's cache.
        await stub.GetAccessToken(request, metadata=ADMIN)
        await stub.GetAccessToken(request, metadata=ADMIN)
        assert broker.runtime.cache.hits >= 1

        code, out, err = await run_cli(
            url, "integrations", "disconnect", iid, "--skip-revocation", "--reason", "cli test"
        )
        assert code == 0, err
        assert "DISCONNECTED" in out

        await expect_error(
            stub.GetAccessToken(request, metadata=ADMIN),
            Code.FAILED_PRECONDITION,
            "INTEGRATION_DISCONNECTED",
        )
        got = await stub.GetIntegration(
            pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN
        )
        assert got.integration.status == pb.INTEGRATION_STATUS_DISCONNECTED

    # The CLI disconnect is audited like the RPC.
    code, out, _ = await run_cli(url, "audit", "--integration", iid, "--json")
    events = json.loads(out)
    disconnects = [e for e in events if e["method"] == "Disconnect"]
    assert len(disconnects) == 1
    assert disconnects[0]["caller"].startswith("cli:")
    assert disconnects[0]["outcome"] == "OK"


async def test_sqlite_cli_grant_revocation_reaches_the_running_broker(
    sqlite_broker: tuple[str, Broker],
) -> None:
    url, broker = sqlite_broker
    async with broker_stub(broker.port) as stub:
        await stub.StoreIntegration(store_request(user_id="user-a"), metadata=ADMIN)
        created = await stub.CreateGrant(
            pb.CreateGrantRequest(user_id="user-a", providers=["twitter"], run_id="run-cli"),
            metadata=ADMIN,
        )
        md = with_grant(GRANT_RUNNER, created.grant_token)
        request = pb.GetAccessTokenRequest(user_id="user-a", provider="twitter")
        await stub.GetAccessToken(request, metadata=md)
        await stub.GetAccessToken(request, metadata=md)

        code, out, err = await run_cli(url, "grants", "list", "--run", "run-cli")
        assert code == 0, err
        assert created.grant_id in out
        assert created.grant_token not in out
        code, out, err = await run_cli(url, "grants", "revoke", "--run", "run-cli")
        assert code == 0, err
        assert "1 grant(s) revoked" in out

        await expect_error(
            stub.GetAccessToken(request, metadata=md), Code.UNAUTHENTICATED, "GRANT_REVOKED"
        )
        code, out, err = await run_cli(url, "grants", "show", created.grant_id, "--json")
        assert json.loads(out)["state"] == "REVOKED"

    # Everything the run did, and its revocation, by run id.
    code, out, _ = await run_cli(url, "audit", "--run", "run-cli", "--json")
    events = json.loads(out)
    methods = sorted(e["method"] for e in events)
    assert methods == [
        "CreateGrant",
        "GetAccessToken",
        "GetAccessToken",
        "GetAccessToken",
        "RevokeGrant",
    ]
    assert {e["grant_id"] for e in events if e["method"] != "RevokeGrant"} == {created.grant_id}
    assert created.grant_token not in out


@pytest.mark.postgres
async def test_revocation_on_one_replica_is_refused_on_another_within_a_second(
    postgres: PostgresFactory, tmp_path: Path
) -> None:
    url = await postgres.new()
    config = write_toml(
        tmp_path / "broker.toml",
        {
            "server": {"listen": "127.0.0.1:0", "environment": ENVIRONMENT},
            "database": {"url": url},
            "refresh": {"background": False},
            "callers": {
                "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
                "runner": {"token_sha256": hash_token(GRANT_RUNNER_TOKEN), "requires_grant": True},
            },
        },
    )
    processes = [BrokerProcess(config, {"BROKER_KEYS": KEYS}) for _ in range(2)]
    await asyncio.gather(*(p.start() for p in processes))
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p.port}") for p in processes]
    try:
        a, b = (pb_grpc.CredentialBrokerStub(c) for c in channels)
        await a.StoreIntegration(store_request(user_id="user-a"), metadata=ADMIN)
        created = await a.CreateGrant(
            pb.CreateGrantRequest(user_id="user-a", providers=["twitter"]), metadata=ADMIN
        )
        md = with_grant(GRANT_RUNNER, created.grant_token)
        request = pb.GetAccessTokenRequest(user_id="user-a", provider="twitter")
        # B has the grant (and the integration) cached once its listener is up.
        deadline = time.monotonic() + 20
        while True:
            await b.GetAccessToken(request, metadata=md)
            if time.monotonic() > deadline or "cache invalidation channel listening" in "\n".join(
                processes[1].log
            ):
                break
            await asyncio.sleep(0.05)
        for _ in range(3):
            await b.GetAccessToken(request, metadata=md)

        await a.RevokeGrant(pb.RevokeGrantRequest(grant_id=created.grant_id), metadata=ADMIN)
        revoked_at = time.monotonic()
        refused: grpc.StatusCode | None = None
        while refused is None:
            try:
                await b.GetAccessToken(request, metadata=md)
            except grpc.aio.AioRpcError as error:
                refused = error.code()
            else:
                assert time.monotonic() - revoked_at < 1.0, "replica B still served after 1 s"
                await asyncio.sleep(0.01)
        assert refused == Code.UNAUTHENTICATED
        await expect_error(
            b.GetAccessToken(request, metadata=md), Code.UNAUTHENTICATED, "GRANT_REVOKED"
        )
    finally:
        for channel in channels:
            await channel.close(None)
        codes = await asyncio.gather(*(p.stop() for p in processes))
    assert codes == [0, 0]
