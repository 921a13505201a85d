"""The real grpcurl binary against a running broker, through server reflection only.

grpcurl runs as an asyncio subprocess so the in-process server keeps serving meanwhile.
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from broker.server.app import Broker
from tests.helpers.grpcurl import SERVICE, Grpcurl, grpcurl_binary
from tests.helpers.settings import ADMIN_TOKEN, RUNNER_TOKEN

RPCS = ("StoreIntegration", "GetAccessToken", "Disconnect", "GetIntegration", "ListIntegrations")


@pytest.fixture
def backend() -> str:
    """Overrides the sqlite/postgres parameter: reflection does not depend on storage."""
    return "sqlite"


@pytest.fixture
def grpcurl(broker: Broker) -> Grpcurl:
    return Grpcurl(f"127.0.0.1:{broker.port}", grpcurl_binary())


def exit_code(code: grpc.StatusCode) -> int:
    """grpcurl exits with 64 + the status code of a failed RPC."""
    return 64 + int(code.value[0])


async def test_list_services(grpcurl: Grpcurl) -> None:
    result = await grpcurl("list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services


async def test_list_needs_credentials(grpcurl: Grpcurl) -> None:
    result = await grpcurl("list", token=None)
    assert result.returncode != 0
    assert "Unauthenticated" in result.stderr
    assert SERVICE not in result.stdout


async def test_describe_service_and_messages(grpcurl: Grpcurl) -> None:
    result = await grpcurl("describe", SERVICE)
    assert result.returncode == 0, result.stderr
    assert f"{SERVICE} is a service" in result.stdout
    for rpc in RPCS:
        assert f"rpc {rpc} ( .credentialbroker.v1.{rpc}Request )" in result.stdout
        assert f"returns ( .credentialbroker.v1.{rpc}Response )" in result.stdout
    request = await grpcurl("describe", "credentialbroker.v1.GetAccessTokenRequest")
    assert request.returncode == 0, request.stderr
    for field in ("integration_id", "user_id", "provider", "account_id", "min_valid_for"):
        assert f" {field} = " in request.stdout


async def test_store_and_get_access_token_round_trip(grpcurl: Grpcurl) -> None:
    access, refresh = f"at-{uuid.uuid4().hex}", f"rt-{uuid.uuid4().hex}"
    stored = await grpcurl.call(
        "StoreIntegration",
        {
            "user_id": "u1",
            "provider": "twitter",
            "access_token": access,
            "refresh_token": refresh,
            "expires_in_seconds": 3600,
            "scopes": ["tweet.read"],
            "metadata": {"username": "@u1"},
        },
    )
    assert stored.returncode == 0, stored.stderr
    assert access not in stored.stdout
    assert refresh not in stored.stdout
    integration = stored.json()["integration"]
    assert stored.json()["created"] is True
    assert integration["status"] == "INTEGRATION_STATUS_CONNECTED"
    assert integration["metadata"] == {"username": "@u1"}

    by_id = await grpcurl.call("GetAccessToken", {"integration_id": integration["id"]})
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.json()["access_token"] == access
    assert refresh not in by_id.stdout
    # The runner may call GetAccessToken, by owner this time.
    by_owner = await grpcurl.call(
        "GetAccessToken", {"user_id": "u1", "provider": "twitter"}, token=RUNNER_TOKEN
    )
    assert by_owner.returncode == 0, by_owner.stderr
    assert by_owner.json()["access_token"] == access
    assert by_owner.json()["integration_id"] == integration["id"]


async def test_error_shows_error_info(grpcurl: Grpcurl) -> None:
    missing = await grpcurl.call(
        "GetAccessToken", {"integration_id": "no-such-id"}, "-format-error"
    )
    assert missing.returncode == exit_code(grpc.StatusCode.NOT_FOUND), missing.stderr
    status = json.loads(missing.stdout or missing.stderr)
    assert status["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-id" in status["message"]
    (info,) = status["details"]
    assert info["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert info["reason"] == "INTEGRATION_NOT_FOUND"
    assert info["domain"] == "credentialbroker"

    invalid = await grpcurl.call("StoreIntegration", {"provider": "twitter"})
    assert invalid.returncode == exit_code(grpc.StatusCode.INVALID_ARGUMENT)
    assert "user_id" in invalid.stderr
    assert '"reason":"INVALID_ARGUMENT"' in invalid.stderr

    denied = await grpcurl.call("ListIntegrations", {"user_id": "u1"}, token=RUNNER_TOKEN)
    assert denied.returncode == exit_code(grpc.StatusCode.PERMISSION_DENIED)
    assert "ListIntegrations" in denied.stderr


async def test_health_check_without_credentials(grpcurl: Grpcurl) -> None:
    # Reflection needs a caller; the health call itself goes out with no credentials.
    reflect_only = ("-reflect-header", f"authorization: Bearer {ADMIN_TOKEN}")
    result = await grpcurl("grpc.health.v1.Health/Check", flags=reflect_only, token=None)
    assert result.returncode == 0, result.stderr
    assert result.json() == {"status": "SERVING"}
