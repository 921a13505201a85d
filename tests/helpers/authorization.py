"""The authorization-code flow as a web backend and its user's browser drive it: begin,
consent at the fake's authorization URL, complete; and what the broker and the fake kept of it."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.server.app import Broker
from broker.storage.tables import oauth_flows
from tests.helpers.fakes import FakeAuthServer
from tests.helpers.providers import CALLBACK
from tests.helpers.settings import ADMIN


async def begin(
    stub: pb_grpc.CredentialBrokerAsyncStub, **fields: Any
) -> pb.BeginAuthorizationResponse:
    values: dict[str, Any] = {"user_id": "user-1", "provider": "acme", "redirect_uri": CALLBACK}
    values.update(fields)
    return await stub.BeginAuthorization(pb.BeginAuthorizationRequest(**values), metadata=ADMIN)


async def consent(url: str) -> dict[str, str]:
    """What the user's browser does: open the URL, land on the callback with code and state."""
    async with httpx.AsyncClient(follow_redirects=False) as http:
        response = await http.get(url)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(CALLBACK + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def complete(stub: pb_grpc.CredentialBrokerAsyncStub, **fields: str) -> Any:
    """The web backend's callback route; its session's user is user-1 unless told."""
    values = {"user_id": "user-1", **fields}
    return await stub.CompleteAuthorization(
        pb.CompleteAuthorizationRequest(**values), metadata=ADMIN
    )


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def code_exchanges(fake: FakeAuthServer) -> int:
    return sum(
        1
        for r in fake.requests
        if r.path == "/token" and r.body.get("grant_type") == "authorization_code"
    )


async def flow_rows(broker: Broker) -> list[dict[str, Any]]:
    async with broker.engine.connect() as conn:
        rows = (await conn.execute(select(oauth_flows))).all()
    return [dict(r._mapping) for r in rows]
