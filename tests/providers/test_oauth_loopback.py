"""OAuthClient against the FakeAuthServer over real loopback HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from broker.errors import GrantRejected, ProviderMisconfigured, ProviderUnavailable
from broker.providers import (
    OAuthClient,
    ProviderProfile,
    authorization_url,
    code_challenge,
    new_code_verifier,
)
from tests.helpers.fakes import Failure, FakeAuthServer

ProfileFactory = Callable[..., ProviderProfile]


async def test_refresh_rotates_and_reuse_revokes_the_grant(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    access, first = fake.issue_grant(scopes=("read", "write"))

    token = await oauth.refresh(fake_profile(), first)

    assert token.refresh_token is not None
    assert token.refresh_token != first
    assert token.access_token != access
    assert token.expires_in == 60
    assert token.scopes == ("read", "write")
    assert fake.refresh_calls == 1

    # The rotated-out token comes back: the provider must assume theft and kill the grant.
    with pytest.raises(GrantRejected) as caught:
        await oauth.refresh(fake_profile(), first)
    assert caught.value.error == "invalid_grant"
    assert not fake.is_grant_active(token.refresh_token)
    assert token.access_token in fake.revoked
    with pytest.raises(GrantRejected):
        await oauth.refresh(fake_profile(), token.refresh_token)
    assert fake.refresh_calls == 3


async def test_concurrent_refreshes_of_one_grant_lose_it(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    # Why the refresh engine needs single-flight: two racing refreshes of a rotating grant end
    # with one success and the whole grant revoked.
    _, refresh = fake.issue_grant()
    profile = fake_profile()
    await oauth.refresh(profile, refresh)
    results = await asyncio.gather(
        oauth.refresh(profile, refresh), oauth.refresh(profile, refresh), return_exceptions=True
    )
    assert all(isinstance(result, GrantRejected) for result in results)
    assert not fake.is_grant_active(refresh)


async def test_many_sequential_refreshes(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant()
    for _ in range(5):
        token = await oauth.refresh(fake_profile(), refresh)
        assert token.refresh_token is not None
        refresh = token.refresh_token
    assert fake.is_grant_active(refresh)
    assert fake.refresh_calls == 5


async def test_google_like_provider_keeps_the_refresh_token(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    fake.omit_refresh_token = True
    _, refresh = fake.issue_grant()
    for _ in range(2):
        token = await oauth.refresh(fake_profile(), refresh)
        assert token.refresh_token is None
    assert fake.is_grant_active(refresh)


async def test_issue_grant_expires_in_override(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant(expires_in=5)
    assert (await oauth.refresh(fake_profile(), refresh)).expires_in == 5


async def test_narrower_scope_is_granted_wider_is_refused(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant(scopes=("read", "write"))
    token = await oauth.refresh(fake_profile(), refresh, scopes=["read"])
    assert token.scopes == ("read",)
    assert token.refresh_token is not None
    with pytest.raises(GrantRejected) as caught:
        await oauth.refresh(fake_profile(), token.refresh_token, scopes=["admin"])
    assert caught.value.error == "invalid_scope"


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_both_client_auth_methods_are_accepted(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory, auth_method: str
) -> None:
    _, refresh = fake.issue_grant()
    await oauth.refresh(fake_profile(auth_method=auth_method), refresh)
    assert fake.requests[-1].auth_method == auth_method
    assert fake.requests[-1].client_id == fake.client_id


async def test_auth_method_the_server_does_not_allow(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    fake.auth_methods = ("client_secret_basic",)
    _, refresh = fake.issue_grant()
    with pytest.raises(ProviderMisconfigured, match="invalid_client"):
        await oauth.refresh(fake_profile(auth_method="client_secret_post"), refresh)
    assert fake.is_grant_active(refresh)


async def test_wrong_client_secret(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant()
    with pytest.raises(ProviderMisconfigured) as caught:
        await oauth.refresh(fake_profile(client_secret="wrong"), refresh)
    assert "wrong" not in str(caught.value)


async def test_special_characters_in_client_credentials_round_trip(
    oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    with FakeAuthServer(client_id="me:you ü", client_secret="p@ss:w+rd/=") as odd:
        _, refresh = odd.issue_grant()
        profile = fake_profile(
            token_url=odd.token_url, client_id=odd.client_id, client_secret=odd.client_secret
        )
        await oauth.refresh(profile, refresh)
        await oauth.refresh(
            fake_profile(
                token_url=odd.token_url,
                client_id=odd.client_id,
                client_secret=odd.client_secret,
                auth_method="client_secret_post",
            ),
            odd.current_refresh_token(refresh) or "",
        )
        assert [request.auth_method for request in odd.requests] == [
            "client_secret_basic",
            "client_secret_post",
        ]


async def test_public_client(oauth: OAuthClient, fake_profile: ProfileFactory) -> None:
    with FakeAuthServer(auth_methods=("none",)) as public:
        _, refresh = public.issue_grant()
        profile = fake_profile(token_url=public.token_url, auth_method="none", client_secret=None)
        await oauth.refresh(profile, refresh)
        assert public.requests[-1].auth_method == "none"


async def test_json_body_is_accepted(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant()
    await oauth.refresh(fake_profile(body_encoding="json"), refresh)
    request = fake.requests[-1]
    assert request.headers["content-type"] == "application/json"
    assert request.body["grant_type"] == "refresh_token"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("invalid_grant", GrantRejected),
        ("invalid_scope", GrantRejected),
        ("invalid_client", ProviderMisconfigured),
        ("unauthorized_client", ProviderMisconfigured),
        ("rate_limited", ProviderUnavailable),
        ("server_error", ProviderUnavailable),
        ("unavailable", ProviderUnavailable),
        ("garbage", ProviderUnavailable),
        ("no_access_token", ProviderUnavailable),
        ("slack_error", GrantRejected),
    ],
)
async def test_scripted_failures_then_recovery(
    fake: FakeAuthServer,
    oauth: OAuthClient,
    fake_profile: ProfileFactory,
    kind: Failure,
    expected: type[Exception],
) -> None:
    _, refresh = fake.issue_grant()
    fake.fail_next(kind, times=2)
    for _ in range(2):
        with pytest.raises(expected):
            await oauth.refresh(fake_profile(), refresh)
    # Scripted answers do not touch the grant, so the same token still works afterwards.
    await oauth.refresh(fake_profile(), refresh)
    assert fake.refresh_calls == 3


async def test_rate_limit_carries_retry_after(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant()
    fake.fail_next("rate_limited", retry_after="3")
    with pytest.raises(ProviderUnavailable) as caught:
        await oauth.refresh(fake_profile(), refresh)
    assert caught.value.retry_after == 3.0


async def test_fail_always_until_reset(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant()
    fake.fail_always("unavailable")
    for _ in range(3):
        with pytest.raises(ProviderUnavailable):
            await oauth.refresh(fake_profile(), refresh)
    fake.reset_failures()
    await oauth.refresh(fake_profile(), refresh)


async def test_slow_answer_times_out(
    fake: FakeAuthServer, http: httpx.AsyncClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant()
    fake.fail_next("slow", delay=2.0)
    impatient = OAuthClient(http, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable, match=r"within 0\.2s"):
        await impatient.refresh(fake_profile(), refresh)
    assert time.monotonic() - started < 1.5


async def test_fixed_latency(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    fake.latency = 0.2
    _, refresh = fake.issue_grant()
    started = time.monotonic()
    await oauth.refresh(fake_profile(), refresh)
    assert time.monotonic() - started >= 0.2


async def test_connection_refused_is_unavailable(
    oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    stopped = FakeAuthServer().start()
    url = stopped.token_url
    stopped.stop()
    # The cause stays on the exception (and in the log), not in what a caller reads.
    with pytest.raises(ProviderUnavailable) as caught:
        await oauth.refresh(fake_profile(token_url=url), "rt")
    assert caught.value.message == "could not reach fake for the token request"
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_slack_style_server(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    fake.slack_style = True
    fake.extra_token_fields = {"team": {"id": "T9"}}
    _, refresh = fake.issue_grant()
    token = await oauth.refresh(fake_profile(account_id_path="team.id"), refresh)
    assert token.account_id == "T9"
    with pytest.raises(GrantRejected):
        await oauth.refresh(fake_profile(), "rt-unknown")


# -- authorization code + PKCE --------------------------------------------------------------------


async def authorize(
    http: httpx.AsyncClient, url: str, redirect_uri: str = "https://app.test/cb"
) -> dict[str, str]:
    response = await http.get(url)
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(redirect_uri + "?")
    return dict(parse_qsl(urlsplit(location).query))


async def test_authorization_code_with_pkce(
    fake: FakeAuthServer, oauth: OAuthClient, http: httpx.AsyncClient, fake_profile: ProfileFactory
) -> None:
    profile = fake_profile(scopes=("read",))
    verifier = new_code_verifier()
    url = authorization_url(
        profile, redirect_uri="https://app.test/cb", state="st-1", code_verifier=verifier
    )
    callback = await authorize(http, url)
    assert callback["state"] == "st-1"
    query = fake.requests[-1].query
    assert query["code_challenge"] == code_challenge(verifier)
    assert query["code_challenge_method"] == "S256"

    token = await oauth.exchange_code(profile, callback["code"], "https://app.test/cb", verifier)

    assert token.scopes == ("read",)
    assert token.refresh_token is not None
    assert fake.is_grant_active(token.refresh_token)
    refreshed = await oauth.refresh(profile, token.refresh_token)
    assert refreshed.access_token != token.access_token


async def test_wrong_code_verifier_is_invalid_grant(
    oauth: OAuthClient, http: httpx.AsyncClient, fake_profile: ProfileFactory
) -> None:
    profile = fake_profile()
    url = authorization_url(
        profile, redirect_uri="https://app.test/cb", state="s", code_verifier=new_code_verifier()
    )
    callback = await authorize(http, url)
    # The provider's "PKCE verification failed" is for the log; the caller reads the code.
    with pytest.raises(GrantRejected) as caught:
        await oauth.exchange_code(
            profile, callback["code"], "https://app.test/cb", new_code_verifier()
        )
    assert caught.value.error == "invalid_grant"
    assert "PKCE" not in caught.value.message


async def test_missing_code_verifier_is_invalid_grant(
    oauth: OAuthClient, http: httpx.AsyncClient, fake_profile: ProfileFactory
) -> None:
    profile = fake_profile()
    url = authorization_url(
        profile, redirect_uri="https://app.test/cb", state="s", code_verifier=new_code_verifier()
    )
    callback = await authorize(http, url)
    with pytest.raises(GrantRejected):
        await oauth.exchange_code(profile, callback["code"], "https://app.test/cb", None)


async def test_code_reuse_revokes_what_it_issued(
    fake: FakeAuthServer, oauth: OAuthClient, http: httpx.AsyncClient, fake_profile: ProfileFactory
) -> None:
    profile = fake_profile()
    verifier = new_code_verifier()
    url = authorization_url(
        profile, redirect_uri="https://app.test/cb", state="s", code_verifier=verifier
    )
    code = (await authorize(http, url))["code"]
    token = await oauth.exchange_code(profile, code, "https://app.test/cb", verifier)
    with pytest.raises(GrantRejected):
        await oauth.exchange_code(profile, code, "https://app.test/cb", verifier)
    assert token.refresh_token is not None
    assert not fake.is_grant_active(token.refresh_token)


async def test_redirect_uri_must_match(
    oauth: OAuthClient, http: httpx.AsyncClient, fake_profile: ProfileFactory
) -> None:
    profile = fake_profile()
    verifier = new_code_verifier()
    url = authorization_url(
        profile, redirect_uri="https://app.test/cb", state="s", code_verifier=verifier
    )
    code = (await authorize(http, url))["code"]
    # The provider says "redirect_uri does not match" to the log; the caller reads the code.
    with pytest.raises(GrantRejected, match="invalid_grant"):
        await oauth.exchange_code(profile, code, "https://evil.test/cb", verifier)


async def test_denied_authorization_redirects_with_error(
    fake: FakeAuthServer, http: httpx.AsyncClient, fake_profile: ProfileFactory
) -> None:
    fake.deny_authorization = True
    url = authorization_url(fake_profile(), redirect_uri="https://app.test/cb", state="s")
    assert await authorize(http, url) == {"state": "s", "error": "access_denied"}


# -- revocation ------------------------------------------------------------------------------------


async def test_revoking_the_refresh_token_revokes_the_grant(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    access, refresh = fake.issue_grant()
    await oauth.revoke(fake_profile(), refresh, "refresh_token")
    assert not fake.is_grant_active(refresh)
    assert not fake.is_access_token_active(access)
    assert {access, refresh} <= fake.revoked
    with pytest.raises(GrantRejected):
        await oauth.refresh(fake_profile(), refresh)
    assert fake.requests[0].body == {
        "token": refresh,
        "token_type_hint": "refresh_token",
    }


async def test_revoking_an_access_token_keeps_the_grant(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    access, refresh = fake.issue_grant()
    await oauth.revoke(fake_profile(), access, "access_token")
    assert not fake.is_access_token_active(access)
    assert fake.is_grant_active(refresh)


async def test_revoking_an_unknown_token_succeeds(
    oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    await oauth.revoke(fake_profile(), "never-issued")


async def test_revocation_endpoint_down(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    _, refresh = fake.issue_grant()
    fake.fail_next("unavailable", path="/revoke")
    with pytest.raises(ProviderUnavailable):
        await oauth.revoke(fake_profile(), refresh)
    assert fake.is_grant_active(refresh)
