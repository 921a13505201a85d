"""Caller policies: which methods and which providers each caller may use, on both backends,
and their reload on SIGHUP in a real broker process (a bad file keeps the old policy)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.config import Settings
from broker.server.app import Broker
from broker.server.callers import hash_token
from broker.storage.tables import integrations
from tests.helpers.errors import error_info, expect_error
from tests.helpers.integrations import store_request
from tests.helpers.processes import BrokerProcess, write_toml
from tests.helpers.settings import (
    ADMIN,
    ADMIN_TOKEN,
    ENVIRONMENT,
    KEYS,
    RUNNER_TOKEN,
    make_settings,
)
from tests.helpers.stubs import broker_stub
from tests.helpers.waiting import eventually

Code = grpc.StatusCode

LIMITED_TOKEN = "limited-runner-token-for-policy-tests"
VIEWER_TOKEN = "viewer-token-for-policy-tests"
ALIAS_TOKEN = "alias-policy-token-for-policy-tests"
LIMITED = (("authorization", f"Bearer {LIMITED_TOKEN}"),)
VIEWER = (("authorization", f"Bearer {VIEWER_TOKEN}"),)
ALIASED = (("authorization", f"Bearer {ALIAS_TOKEN}"),)
RUNNER = (("authorization", f"Bearer {RUNNER_TOKEN}"),)

# acme is only stored and read here: its tokens never expire in these tests, so the token URL
# (a closed port on loopback) is never called.
ACME = {
    "token_url": "http://127.0.0.1:9/token",
    "client_id": "acme-client",
    "client_secret": "acme-secret",
}


def policy_callers() -> dict[str, Any]:
    return {
        "admin": {"token_sha256": hash_token(ADMIN_TOKEN)},
        # The example: a workflow runner that may only fetch tokens, only for acme.
        "limited": {
            "token_sha256": hash_token(LIMITED_TOKEN),
            "methods": ["GetAccessToken"],
            "providers": ["acme"],
        },
        # A UI backend limited to acme.
        "viewer": {
            "token_sha256": hash_token(VIEWER_TOKEN),
            "methods": ["StoreIntegration", "GetIntegration", "ListIntegrations", "Disconnect"],
            "providers": ["acme"],
        },
        # A policy written with a provider alias ("x" is twitter).
        "aliased": {
            "token_sha256": hash_token(ALIAS_TOKEN),
            "methods": ["*"],
            "providers": ["x"],
        },
    }


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, callers=policy_callers(), providers={"acme": ACME})


async def store(
    stub: pb_grpc.CredentialBrokerAsyncStub, provider: str, user: str = "user-1"
) -> str:
    response = await stub.StoreIntegration(
        store_request(user_id=user, provider=provider, scopes=[]), metadata=ADMIN
    )
    return str(response.integration.id)


@pytest.fixture
async def stored(stub: pb_grpc.CredentialBrokerAsyncStub) -> dict[str, str]:
    """user-1 has acme, google and twitter integrations; provider → integration id."""
    return {p: await store(stub, p) for p in ("acme", "google", "twitter")}


async def row_count(broker: Broker) -> int:
    async with broker.engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(integrations))).scalar_one()
        )


def no_token_in(error: grpc.aio.AioRpcError) -> None:
    assert "at-" not in (error.details() or "")


# -- providers ------------------------------------------------------------------------------


async def test_allowed_provider_is_served(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    by_id = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=stored["acme"]), metadata=LIMITED
    )
    assert by_id.access_token.startswith("at-")
    by_owner = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="user-1", provider="acme"), metadata=LIMITED
    )
    assert by_owner.access_token == by_id.access_token
    assert by_owner.integration_id == stored["acme"]


async def test_denied_provider_by_integration_id_is_not_found(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    """By id, another provider's integration is answered as a missing one: naming the
    provider would confirm the id exists and say whose it is."""
    error = await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=stored["google"]), metadata=LIMITED
        ),
        Code.NOT_FOUND,
        "INTEGRATION_NOT_FOUND",
        contains=f"no integration with id {stored['google']!r}",
    )
    assert "google" not in (error.details() or "")
    no_token_in(error)
    # The admin, whose policy allows every provider, gets the same integration's token.
    allowed = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(integration_id=stored["google"]), metadata=ADMIN
    )
    assert allowed.access_token


async def test_denied_provider_by_owner_names_the_provider(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    error = await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-1", provider="google"), metadata=LIMITED
        ),
        Code.PERMISSION_DENIED,
        contains="'google'",
    )
    no_token_in(error)
    info = error_info(error)
    assert info is not None
    assert info.metadata.get("provider") == "google"


async def test_denied_provider_is_refused_before_lookup(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    """A caller may not learn whether a user has an integration of a provider it may not use."""
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="nobody", provider="google"), metadata=LIMITED
        ),
        Code.PERMISSION_DENIED,
        contains="'google'",
    )
    # And an allowed provider with no integration is an honest NOT_FOUND.
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="nobody", provider="acme"), metadata=LIMITED
        ),
        Code.NOT_FOUND,
        "INTEGRATION_NOT_FOUND",
    )


async def test_alias_in_request_does_not_bypass_policy(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    """ "gmail" is google: a caller limited to acme may not reach google under its alias."""
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(user_id="user-1", provider="gmail"), metadata=LIMITED
        ),
        Code.PERMISSION_DENIED,
        contains="google",
    )


async def test_alias_in_policy_allows_the_provider(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    got = await stub.GetAccessToken(
        pb.GetAccessTokenRequest(user_id="user-1", provider="x"), metadata=ALIASED
    )
    assert got.integration_id == stored["twitter"]


async def test_list_shows_only_allowed_providers(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    everything = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN
    )
    assert {i.provider for i in everything.integrations} == {"acme", "google", "twitter"}
    limited = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1"), metadata=VIEWER
    )
    assert [i.id for i in limited.integrations] == [stored["acme"]]
    # Paging does not leak other providers either: one per page, and only one page.
    page = await stub.ListIntegrations(
        pb.ListIntegrationsRequest(user_id="user-1", page_size=1), metadata=VIEWER
    )
    assert [i.provider for i in page.integrations] == ["acme"]
    assert page.next_page_token == ""
    await expect_error(
        stub.ListIntegrations(
            pb.ListIntegrationsRequest(user_id="user-1", provider="google"), metadata=VIEWER
        ),
        Code.PERMISSION_DENIED,
        contains="'google'",
    )


async def test_get_integration_of_denied_provider(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    ok = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=stored["acme"]), metadata=VIEWER
    )
    assert ok.integration.provider == "acme"
    await expect_error(
        stub.GetIntegration(
            pb.GetIntegrationRequest(integration_id=stored["google"]), metadata=VIEWER
        ),
        Code.NOT_FOUND,
        "INTEGRATION_NOT_FOUND",
    )


async def test_store_for_denied_provider_writes_nothing(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, stored: dict[str, str]
) -> None:
    before = await row_count(broker)
    await expect_error(
        stub.StoreIntegration(
            store_request(user_id="user-2", provider="google", scopes=[]), metadata=VIEWER
        ),
        Code.PERMISSION_DENIED,
        contains="'google'",
    )
    assert await row_count(broker) == before
    created = await stub.StoreIntegration(
        store_request(user_id="user-2", provider="acme", scopes=[]), metadata=VIEWER
    )
    assert created.created
    assert await row_count(broker) == before + 1


async def test_disconnect_of_denied_provider_changes_nothing(
    stub: pb_grpc.CredentialBrokerAsyncStub, stored: dict[str, str]
) -> None:
    await expect_error(
        stub.Disconnect(
            pb.DisconnectRequest(integration_id=stored["google"], skip_provider_revocation=True),
            metadata=VIEWER,
        ),
        Code.NOT_FOUND,
        "INTEGRATION_NOT_FOUND",
    )
    still = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=stored["google"]), metadata=ADMIN
    )
    assert still.integration.status == pb.INTEGRATION_STATUS_CONNECTED
    assert (
        await stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=stored["google"]), metadata=ADMIN
        )
    ).access_token


# -- methods --------------------------------------------------------------------------------


async def test_denied_method_names_the_method(
    stub: pb_grpc.CredentialBrokerAsyncStub, broker: Broker, stored: dict[str, str]
) -> None:
    before = await row_count(broker)
    error = await expect_error(
        stub.StoreIntegration(
            store_request(user_id="user-3", provider="acme", scopes=[]), metadata=LIMITED
        ),
        Code.PERMISSION_DENIED,
        contains="StoreIntegration",
    )
    assert "limited" in (error.details() or "")
    assert await row_count(broker) == before
    await expect_error(
        stub.ListIntegrations(pb.ListIntegrationsRequest(user_id="user-1"), metadata=LIMITED),
        Code.PERMISSION_DENIED,
        contains="ListIntegrations",
    )
    await expect_error(
        stub.Disconnect(pb.DisconnectRequest(integration_id=stored["acme"]), metadata=LIMITED),
        Code.PERMISSION_DENIED,
        contains="Disconnect",
    )
    # The viewer may do all that, but not fetch tokens.
    await expect_error(
        stub.GetAccessToken(
            pb.GetAccessTokenRequest(integration_id=stored["acme"]), metadata=VIEWER
        ),
        Code.PERMISSION_DENIED,
        contains="GetAccessToken",
    )
    still = await stub.GetIntegration(
        pb.GetIntegrationRequest(integration_id=stored["acme"]), metadata=ADMIN
    )
    assert still.integration.status == pb.INTEGRATION_STATUS_CONNECTED


# -- SIGHUP in a real process ------------------------------------------------------------------


def process_config(database_url: str, runner: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "environment": ENVIRONMENT},
        "database": {"url": database_url},
        "refresh": {"background": False},
        "providers": {"acme": ACME},
        "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}, "runner": runner},
    }


RUNNER_ACME = {
    "token_sha256": hash_token(RUNNER_TOKEN),
    "methods": ["GetAccessToken"],
    "providers": ["acme"],
}


@pytest.fixture
async def process(database_url: str, tmp_path: Path) -> AsyncIterator[BrokerProcess]:
    config = write_toml(tmp_path / "broker.toml", process_config(database_url, RUNNER_ACME))
    proc = BrokerProcess(config, {"BROKER_KEYS": KEYS})
    await proc.start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.returncode is None:
            code = await proc.stop()
            assert code == 0, "\n".join(proc.log)


def log_count(proc: BrokerProcess, text: str) -> int:
    return sum(text in line for line in proc.log)


async def sighup_and_wait(proc: BrokerProcess, marker: str) -> None:
    """SIGHUP, then wait for the process to log ``marker`` once more than before."""
    assert proc.proc is not None
    before = log_count(proc, marker)
    proc.proc.send_signal(signal.SIGHUP)

    async def logged() -> bool:
        return log_count(proc, marker) > before

    await eventually(logged, f"{marker!r} in the broker log")


async def code_of(call: Awaitable[Any]) -> Code:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return Code.OK


async def test_sighup_reloads_policies_and_keeps_old_on_bad_file(
    process: BrokerProcess, database_url: str
) -> None:
    config = process.config
    async with broker_stub(process.port) as stub:
        acme_id = await store(stub, "acme")
        google_id = await store(stub, "google")

        def google_token() -> Any:
            return stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=google_id), metadata=RUNNER
            )

        def acme_token() -> Any:
            return stub.GetAccessToken(
                pb.GetAccessTokenRequest(integration_id=acme_id), metadata=RUNNER
            )

        def runner_list() -> Any:
            return stub.ListIntegrations(
                pb.ListIntegrationsRequest(user_id="user-1"), metadata=RUNNER
            )

        assert await code_of(acme_token()) == Code.OK
        await expect_error(google_token(), Code.NOT_FOUND, "INTEGRATION_NOT_FOUND")
        await expect_error(runner_list(), Code.PERMISSION_DENIED, contains="ListIntegrations")

        # 1. A wider policy: google and ListIntegrations, applied without a restart.
        pid = process.proc.pid if process.proc else None
        write_toml(
            config,
            process_config(
                database_url,
                {
                    **RUNNER_ACME,
                    "providers": ["acme", "google"],
                    "methods": ["GetAccessToken", "ListIntegrations"],
                },
            ),
        )
        await sighup_and_wait(process, "caller policies reloaded")
        assert (await google_token()).access_token
        listed = await runner_list()
        assert {i.provider for i in listed.integrations} == {"acme", "google"}
        assert process.proc is not None
        assert process.proc.pid == pid
        assert process.proc.returncode is None

        # 2. A file that is not TOML: refused, the wider policy stays, the process serves.
        config.write_text("[callers.runner\ntoken_sha256 = \n")
        await sighup_and_wait(process, "SIGHUP: refused the new configuration")
        assert process.proc.returncode is None
        assert (await google_token()).access_token
        assert (await runner_list()).integrations

        # 3. A valid file with an invalid token hash (and a narrower policy): refused as a
        # whole, so neither the narrowing nor the broken hash applies.
        write_toml(
            config,
            process_config(
                database_url, {**RUNNER_ACME, "token_sha256": "not-a-sha256-hex-digest"}
            ),
        )
        await sighup_and_wait(process, "SIGHUP: refused the new configuration")
        assert any("token_sha256" in line for line in process.log), "the error names the setting"
        assert process.proc.returncode is None
        assert (await google_token()).access_token
        assert (
            await stub.ListIntegrations(
                pb.ListIntegrationsRequest(user_id="user-1"), metadata=ADMIN
            )
        ).integrations

        # 4. A file with no caller at all would lock everybody out: refused too.
        data = process_config(database_url, RUNNER_ACME)
        del data["callers"]
        write_toml(config, data)
        await sighup_and_wait(process, "SIGHUP: refused the new configuration")
        assert (await google_token()).access_token

        # 5. Narrowing works: back to acme only, and removing a caller revokes its token.
        write_toml(config, process_config(database_url, RUNNER_ACME))
        await sighup_and_wait(process, "caller policies reloaded")
        await expect_error(google_token(), Code.NOT_FOUND, "INTEGRATION_NOT_FOUND")
        assert (await acme_token()).access_token
        removed = process_config(database_url, RUNNER_ACME)
        del removed["callers"]["runner"]
        write_toml(config, removed)
        await sighup_and_wait(process, "caller policies reloaded")
        await expect_error(acme_token(), Code.UNAUTHENTICATED)
        assert process.proc.returncode is None
