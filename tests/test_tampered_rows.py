"""A row whose credential kind or status was set, outside the broker, to a value the broker
never writes is not to be trusted: DATA_LOSS CIPHERTEXT_INVALID naming the integration, never
INTERNAL, on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy import update

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import Broker, start
from broker.storage.tables import integrations
from tests.helpers.errors import expect_error
from tests.helpers.integrations import store_request
from tests.helpers.settings import ADMIN, make_settings


@pytest.fixture
async def broker(database_url: str) -> AsyncIterator[Broker]:
    running = await start(make_settings(database_url))
    yield running
    await running.stop(0)


@pytest.mark.parametrize(("column", "value"), [("credential_type", "bogus"), ("status", "HACKED")])
async def test_an_unknown_kind_or_status_is_data_loss(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, column: str, value: str
) -> None:
    stored = await stub.StoreIntegration(store_request(user_id="victim"), metadata=ADMIN)
    iid = stored.integration.id
    async with broker.engine.begin() as conn:
        await conn.execute(
            update(integrations).where(integrations.c.id == iid).values(**{column: value})
        )
    cache = broker.runtime.service.cache
    if cache is not None:
        cache.flush()
    for call in (
        stub.GetAccessToken(pb.GetAccessTokenRequest(integration_id=iid), metadata=ADMIN),
        stub.GetIntegration(pb.GetIntegrationRequest(integration_id=iid), metadata=ADMIN),
    ):
        error = await expect_error(call, grpc.StatusCode.DATA_LOSS, "CIPHERTEXT_INVALID")
        assert iid in (error.details() or "")
