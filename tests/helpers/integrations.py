"""Integrations of the fake's grants: storing them, asking for their token, reading the row."""

from __future__ import annotations

import uuid
from typing import Any

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import Broker
from broker.storage import repository
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.settings import ADMIN


async def store_grant(
    stub: pb_grpc.CredentialBrokerAsyncStub,
    fake: FakeAuthServer,
    expires_in: int = 0,
    **fields: Any,
) -> tuple[str, str, str]:
    """Store a fresh grant of the fake; returns (integration id, access token, refresh token)."""
    access, refresh = fake.issue_grant(scopes=("read", "write"))
    values: dict[str, Any] = {
        "user_id": "user-1",
        "provider": "acme",
        "access_token": access,
        "refresh_token": refresh,
        "expires_in_seconds": expires_in,
        "scopes": ["read", "write"],
    }
    values.update(fields)
    response = await stub.StoreIntegration(pb.StoreIntegrationRequest(**values), metadata=ADMIN)
    return response.integration.id, access, refresh


async def token(
    stub: pb_grpc.CredentialBrokerAsyncStub, iid: str, **fields: Any
) -> pb.GetAccessTokenResponse:
    return await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=iid, **fields), metadata=ADMIN
    )


async def row(broker: Broker, iid: str) -> Any:
    async with broker.engine.connect() as conn:
        stored = await repository.get(conn, iid)
    assert stored is not None
    return stored


def store_request(**fields: Any) -> pb.StoreIntegrationRequest:
    values: dict[str, Any] = {
        "user_id": "user-1",
        "provider": "twitter",
        "access_token": "at-" + uuid.uuid4().hex,
        "refresh_token": "rt-" + uuid.uuid4().hex,
        "expires_in_seconds": 3600,
        "scopes": ["tweet.read", "users.read"],
    }
    values.update(fields)
    return pb.StoreIntegrationRequest(**values)
