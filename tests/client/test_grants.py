"""Run-scoped grants through the client, on both backends: an issuer creates one, a workflow
runner configured requires_grant presents it with ``with_grant``, revocation ends it."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from broker.config import Settings
from broker.server.app import Broker
from broker.server.callers import hash_token
from credentialbroker_client import (
    AsyncBrokerClient,
    BrokerClient,
    GrantInvalid,
    GrantNotFound,
    GrantRequired,
    GrantRevoked,
    GrantScope,
    Unauthenticated,
    broker_pb2,
)
from tests.helpers.settings import ADMIN_TOKEN, RUNNER_TOKEN, make_settings


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(
        database_url,
        callers={
            "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
            "runner": {"token_sha256": hash_token(RUNNER_TOKEN), "requires_grant": True},
        },
    )


async def test_a_runner_reads_under_its_grant_until_revoked(broker: Broker) -> None:
    address = f"127.0.0.1:{broker.port}"
    async with (
        AsyncBrokerClient(address, token=ADMIN_TOKEN) as issuer,
        AsyncBrokerClient(address, token=RUNNER_TOKEN) as runner,
    ):
        mine = await issuer.store_integration(user_id="u1", provider="twitter", access_token="a1")
        theirs = await issuer.store_integration(user_id="u2", provider="twitter", access_token="a2")
        created = await issuer.create_grant(
            user_id="u1", providers=["twitter"], ttl=timedelta(minutes=5), run_id="run-7"
        )
        assert created.grant_token.startswith("cbg_")
        assert created.grant.state == broker_pb2.GRANT_STATE_ACTIVE

        with pytest.raises(GrantRequired) as required:
            await runner.get_access_token(integration_id=mine.integration.id)
        assert required.value.code == grpc.StatusCode.PERMISSION_DENIED

        run = runner.with_grant(created.grant_token)
        got = await run.get_access_token(integration_id=mine.integration.id)
        assert got.access_token == "a1"
        with pytest.raises(GrantScope):
            await run.get_access_token(integration_id=theirs.integration.id)
        with pytest.raises(GrantInvalid) as invalid:
            await runner.get_access_token(
                integration_id=mine.integration.id, grant="cbg_not-a-grant"
            )
        assert isinstance(invalid.value, Unauthenticated)

        listed = [g.id async for g in issuer.iter_grants(run_id="run-7", page_size=1)]
        assert listed == [created.grant_id]
        revoked = await issuer.revoke_grant(run_id="run-7")
        assert [g.id for g in revoked.grants] == [created.grant_id]
        got_back = await issuer.get_grant(grant_id=created.grant_id)
        assert got_back.grant.state == broker_pb2.GRANT_STATE_REVOKED
        with pytest.raises(GrantNotFound):
            await issuer.get_grant(grant_id="00000000-0000-0000-0000-000000000000")

        with pytest.raises(GrantRevoked):
            await run.get_access_token(integration_id=mine.integration.id)


async def test_sync_client_presents_a_grant(broker: Broker) -> None:
    import asyncio

    address = f"127.0.0.1:{broker.port}"

    def use() -> None:
        with BrokerClient(address, token=ADMIN_TOKEN) as issuer:
            iid = issuer.store_integration(
                user_id="u1", provider="twitter", access_token="a1"
            ).integration.id
            token = issuer.create_grant(user_id="u1", integration_ids=[iid], ttl=60).grant_token
        with BrokerClient(address, token=RUNNER_TOKEN, grant=token) as runner:
            assert runner.get_access_token(integration_id=iid).access_token == "a1"

    await asyncio.to_thread(use)
