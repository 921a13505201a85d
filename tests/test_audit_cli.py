"""`broker audit`: operators read the trail by user, integration or caller."""

from __future__ import annotations

import json

from sqlalchemy import text

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import Broker
from tests.helpers.integrations import store_request
from tests.helpers.processes import run_cli
from tests.helpers.settings import ADMIN, RUNNER


async def audit_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    return await run_cli(database_url, "audit", *args)


async def test_audit_cli_filters(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, database_url: str
) -> None:
    stored = await stub.StoreIntegration(
        store_request(access_token="at-audit-canary"), metadata=ADMIN
    )
    iid = stored.integration.id
    await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=iid), metadata=(*RUNNER, ("x-request-id", "req-42"))
    )
    await stub.StoreIntegration(store_request(user_id="someone-else"), metadata=ADMIN)

    code, out, _ = await audit_cli(database_url, "--user", "user-1", "--json")
    assert code == 0
    events = json.loads(out)
    assert [e["method"] for e in events] == ["GetAccessToken", "StoreIntegration"]
    assert events[0]["caller"] == "runner"
    assert events[0]["request_id"] == "req-42"
    assert events[0]["integration_id"] == iid
    assert all(e["outcome"] == "OK" for e in events)
    assert "at-audit-canary" not in out

    code, out, _ = await audit_cli(database_url, "--caller", "runner")
    assert code == 0
    assert "GetAccessToken" in out
    assert "StoreIntegration" not in out
    code, out, _ = await audit_cli(database_url, "--integration", iid, "--json")
    assert {e["integration_id"] for e in json.loads(out)} == {iid}
    code, _, err = await audit_cli(database_url)
    assert code == 2
    assert "--user" in err


async def test_the_run_index_is_partial_and_serves_run_queries(broker: Broker) -> None:
    """Events without a run (most of them) take no entry in the run index; a query by run
    still goes through it (migration 0008), on both backends."""
    engine = broker.runtime.engine
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = (
                await conn.execute(
                    text(
                        "EXPLAIN QUERY PLAN SELECT * FROM audit_events WHERE run_id = :r "
                        "ORDER BY occurred_at DESC"
                    ),
                    {"r": "run-1"},
                )
            ).all()
            assert "ix_audit_run" in " ".join(str(row[-1]) for row in plan)
            definition = (
                await conn.execute(
                    text("SELECT sql FROM sqlite_master WHERE name = 'ix_audit_run'")
                )
            ).scalar_one()
        else:
            definition = (
                await conn.execute(
                    text("SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_audit_run'")
                )
            ).scalar_one()
    assert "run_id IS NOT NULL" in definition
