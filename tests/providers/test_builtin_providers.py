"""Each built-in profile's request shape and quirks, with its token URL pointed at the fake."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.errors import GrantRejected
from broker.providers import (
    BUILTINS,
    OAuthClient,
    ProviderProfile,
    RevocationNotSupported,
    authorization_url,
    new_code_verifier,
)
from tests.helpers.fakes import FakeAuthServer


def aimed_at(fake: FakeAuthServer, name: str) -> ProviderProfile:
    builtin = BUILTINS[name]
    return dataclasses.replace(
        builtin,
        token_url=fake.token_url,
        revocation_url=fake.revocation_url if builtin.revocation_url else None,
        client_id=fake.client_id,
        client_secret=fake.client_secret,
    )


def test_catalog_covers_the_documented_providers() -> None:
    assert {"twitter", "google", "slack", "notion", "github", "microsoft"} <= set(BUILTINS)
    assert len(BUILTINS) >= 40
    for profile in BUILTINS.values():
        for url in (profile.token_url, profile.authorization_url, profile.revocation_url):
            assert url is None or url.startswith("https://")
        assert profile.token_url
        assert profile.authorization_url
        # Templates: a client comes only from configuration.
        assert profile.client_id is None
        assert profile.client_secret is None
        assert not profile.is_configured


@pytest.mark.parametrize(
    ("name", "auth_method", "encoding"),
    [
        ("twitter", "client_secret_basic", "form"),
        ("google", "client_secret_post", "form"),
        ("slack", "client_secret_post", "form"),
        ("notion", "client_secret_basic", "json"),
        ("github", "client_secret_post", "form"),
        ("microsoft", "client_secret_post", "form"),
    ],
)
async def test_refresh_request_shape(
    fake: FakeAuthServer, oauth: OAuthClient, name: str, auth_method: str, encoding: str
) -> None:
    _, refresh = fake.issue_grant(scopes=("offline_access", "User.Read"))

    token = await oauth.refresh(aimed_at(fake, name), refresh)

    assert token.access_token
    request = fake.requests[-1]
    assert (request.method, request.path) == ("POST", "/token")
    assert request.auth_method == auth_method
    assert request.headers["accept"] == "application/json"
    content_type = "application/json" if encoding == "json" else "application/x-www-form-urlencoded"
    assert request.headers["content-type"] == content_type
    assert request.body["grant_type"] == "refresh_token"
    assert request.body["refresh_token"] == refresh


async def test_notion_json_body_with_basic_and_version_header(
    fake: FakeAuthServer, oauth: OAuthClient
) -> None:
    _, refresh = fake.issue_grant()
    fake.extra_token_fields = {"workspace_id": "ws-1", "bot_id": "b-1"}
    token = await oauth.refresh(aimed_at(fake, "notion"), refresh)
    request = fake.requests[-1]
    assert request.headers["notion-version"]
    assert "client_secret" not in request.body
    assert token.account_id == "ws-1"


async def test_notion_revocation_is_json_with_basic(
    fake: FakeAuthServer, oauth: OAuthClient
) -> None:
    _, refresh = fake.issue_grant()
    await oauth.revoke(aimed_at(fake, "notion"), refresh)
    request = fake.requests[-1]
    assert request.path == "/revoke"
    assert request.auth_method == "client_secret_basic"
    assert request.headers["content-type"] == "application/json"
    assert not fake.is_grant_active(refresh)


async def test_github_sends_accept_json(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    _, refresh = fake.issue_grant()
    await oauth.refresh(aimed_at(fake, "github"), refresh)
    assert fake.requests[-1].headers["accept"] == "application/json"


async def test_microsoft_sends_scope_on_refresh(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    _, refresh = fake.issue_grant(scopes=("offline_access", "User.Read"))
    await oauth.refresh(aimed_at(fake, "microsoft"), refresh)
    assert fake.requests[-1].body["scope"] == "offline_access User.Read"


async def test_microsoft_has_no_revocation(oauth: OAuthClient, fake: FakeAuthServer) -> None:
    with pytest.raises(RevocationNotSupported):
        await oauth.revoke(aimed_at(fake, "microsoft"), "tok")


async def test_google_keeps_refresh_token(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    fake.omit_refresh_token = True
    _, refresh = fake.issue_grant()
    token = await oauth.refresh(aimed_at(fake, "google"), refresh)
    assert token.refresh_token is None
    assert fake.is_grant_active(refresh)


async def test_slack_envelope(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    fake.slack_style = True
    fake.extra_token_fields = {"team": {"id": "T0001"}, "token_type": "bot", "scope": "chat:write"}
    _, refresh = fake.issue_grant()
    slack = aimed_at(fake, "slack")

    token = await oauth.refresh(slack, refresh)

    assert token.account_id == "T0001"
    assert token.token_type == "Bearer"
    assert token.scopes == ("chat:write",)
    with pytest.raises(GrantRejected) as caught:
        await oauth.refresh(slack, refresh)  # rotated out
    assert caught.value.error == "invalid_grant"
    assert "invalid_refresh_token" in str(caught.value)


async def test_slack_revocation_envelope(fake: FakeAuthServer, oauth: OAuthClient) -> None:
    fake.slack_style = True
    _, refresh = fake.issue_grant()
    await oauth.revoke(aimed_at(fake, "slack"), refresh)
    assert not fake.is_grant_active(refresh)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("google", {"access_type": "offline", "prompt": "consent", "scope": "openid email"}),
        ("slack", {}),
        ("notion", {"owner": "user"}),
        ("twitter", {"scope": "tweet.read users.read offline.access"}),
        ("microsoft", {"scope": "offline_access User.Read"}),
    ],
)
def test_authorization_urls(name: str, expected: dict[str, str]) -> None:
    profile = dataclasses.replace(BUILTINS[name], client_id="cid")
    url = authorization_url(
        profile, redirect_uri="https://app.test/cb", state="st", code_verifier=new_code_verifier()
    )
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == profile.authorization_url
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    assert query["client_id"] == "cid"
    assert query["redirect_uri"] == "https://app.test/cb"
    assert query["state"] == "st"
    assert query["response_type"] == "code"
    assert ("code_challenge" in query) == profile.pkce
    for key, value in expected.items():
        assert query[key] == value


def test_slack_scopes_are_comma_separated() -> None:
    profile = dataclasses.replace(BUILTINS["slack"], client_id="cid")
    url = authorization_url(
        profile, redirect_uri="https://app.test/cb", state="s", scopes=["chat:write", "users:read"]
    )
    assert parse_qs(urlsplit(url).query)["scope"] == ["chat:write,users:read"]


def test_extra_authorize_params_cannot_replace_flow_parameters() -> None:
    profile = dataclasses.replace(
        BUILTINS["google"], client_id="cid", extra_authorize_params={"state": "evil", "x": "1"}
    )
    url = authorization_url(profile, redirect_uri="https://app.test/cb", state="mine")
    query = parse_qs(urlsplit(url).query)
    assert query["state"] == ["mine"]
    assert query["x"] == ["1"]
