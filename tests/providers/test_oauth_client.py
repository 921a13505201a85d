"""OAuthClient against httpx.MockTransport: request encoding and error classification."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

import httpx
import pytest

from broker.errors import (
    GrantRejected,
    ProviderMisconfigured,
    ProviderOutcomeUnknown,
    ProviderUnavailable,
)
from broker.providers import (
    OAuthClient,
    ProviderProfile,
    Quirk,
    RevocationNotSupported,
    TokenResponse,
    parse_retry_after,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
REFRESH = "rt-very-secret-refresh"
SECRET = "client-secret-value"

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """Answers every request with one canned response and keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.response: Handler = lambda request: httpx.Response(
            200, json={"access_token": "at-new", "expires_in": 3600}
        )

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.response(request)

    def answer(self, status: int, body: Any = None, **kwargs: Any) -> None:
        if isinstance(body, dict | list):
            self.response = lambda request: httpx.Response(status, json=body, **kwargs)
        else:
            self.response = lambda request: httpx.Response(status, content=body or b"", **kwargs)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.last.content.decode()))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(recorder: Recorder) -> AsyncIterator[OAuthClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder)) as http:
        yield OAuthClient(http, timeout=7.5, clock=lambda: NOW)


def profile(**changes: Any) -> ProviderProfile:
    fields: dict[str, Any] = {
        "name": "acme",
        "token_url": "https://auth.acme.test/token",
        "revocation_url": "https://auth.acme.test/revoke",
        "client_id": "acme-client",
        "client_secret": SECRET,
    }
    fields.update(changes)
    return ProviderProfile(**fields)


def decode_basic(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(value).decode().partition(":")
    return unquote_plus(user), unquote_plus(password)


# -- success -------------------------------------------------------------------------------------


async def test_refresh_parses_a_standard_response(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(
        200,
        {
            "access_token": "at-1",
            "refresh_token": "rt-2",
            "token_type": "bearer",
            "expires_in": 3599,
            "scope": "read write",
        },
    )

    token = await client.refresh(profile(), REFRESH)

    assert token == TokenResponse(
        access_token="at-1",
        refresh_token="rt-2",
        received_at=NOW,
        token_type="Bearer",
        expires_in=3599,
        scopes=("read", "write"),
    )
    assert recorder.form()["grant_type"] == "refresh_token"
    assert recorder.form()["refresh_token"] == REFRESH
    assert "scope" not in recorder.form()


async def test_refresh_sends_requested_scopes(client: OAuthClient, recorder: Recorder) -> None:
    await client.refresh(profile(), REFRESH, scopes=["read", "write"])
    assert recorder.form()["scope"] == "read write"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("scope", "a,b", ("a", "b")),
        ("scope", ["a", "b"], ("a", "b")),
        ("scope", "", None),
        ("expires_in", "120", 120),
        ("expires_in", "soon", None),
        ("expires_in", True, None),
        ("expires_in", -5, 0),
        ("expires_in", 10**30, 100 * 365 * 24 * 3600),
        ("expires_in", "1e300", 100 * 365 * 24 * 3600),
    ],
)
async def test_lenient_fields(
    client: OAuthClient, recorder: Recorder, field: str, value: object, expected: object
) -> None:
    recorder.answer(200, {"access_token": "at", field: value})
    token = await client.refresh(profile(), REFRESH)
    assert (token.scopes if field == "scope" else token.expires_in) == expected
    token.expires_at(None)  # any lifetime it keeps can be added to a datetime


async def test_missing_refresh_token_is_none(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(200, {"access_token": "at", "refresh_token": ""})
    assert (await client.refresh(profile(), REFRESH)).refresh_token is None


async def test_account_id_from_dotted_path(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(200, {"access_token": "at", "team": {"id": "T042", "name": "Acme"}})
    token = await client.refresh(profile(account_id_path="team.id"), REFRESH)
    assert token.account_id == "T042"


async def test_account_id_path_missing_gives_none(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(200, {"access_token": "at", "team": "flat"})
    assert (await client.refresh(profile(account_id_path="team.id"), REFRESH)).account_id is None


async def test_form_encoded_answer_is_understood(client: OAuthClient, recorder: Recorder) -> None:
    # GitHub's answer when Accept: application/json is missing somewhere in between.
    recorder.answer(
        200,
        b"access_token=at-form&scope=repo%2Cuser&token_type=bearer",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    token = await client.refresh(profile(), REFRESH)
    assert (token.access_token, token.scopes) == ("at-form", ("repo", "user"))


def test_expires_at() -> None:
    token = TokenResponse(access_token="at", refresh_token=None, received_at=NOW, expires_in=60)
    assert token.expires_at(3600) == NOW + timedelta(seconds=60)
    unknown = TokenResponse(access_token="at", refresh_token=None, received_at=NOW)
    assert unknown.expires_at(3600) == NOW + timedelta(hours=1)
    assert unknown.expires_at(0) is None
    assert unknown.expires_at(None) is None


async def test_exchange_code_sends_pkce_verifier(client: OAuthClient, recorder: Recorder) -> None:
    await client.exchange_code(profile(), "the-code", "https://app.test/cb", "the-verifier")
    assert recorder.form() == {
        "grant_type": "authorization_code",
        "code": "the-code",
        "redirect_uri": "https://app.test/cb",
        "code_verifier": "the-verifier",
    }


async def test_exchange_code_without_verifier(client: OAuthClient, recorder: Recorder) -> None:
    await client.exchange_code(profile(), "c", "https://app.test/cb", None)
    assert "code_verifier" not in recorder.form()


# -- request shape -------------------------------------------------------------------------------


async def test_basic_auth_urlencodes_credentials(client: OAuthClient, recorder: Recorder) -> None:
    odd_id, odd_secret = "id:with space/ü", "s3cr:t+/=%&é"
    await client.refresh(profile(client_id=odd_id, client_secret=odd_secret), REFRESH)

    header = recorder.last.headers["authorization"]
    # RFC 6749 §2.3.1 form-urlencodes each part first, so ':' never splits them wrongly.
    raw = base64.b64decode(header.removeprefix("Basic ")).decode()
    assert raw == "id%3Awith+space%2F%C3%BC:s3cr%3At%2B%2F%3D%25%26%C3%A9"
    assert decode_basic(header) == (odd_id, odd_secret)
    assert "client_secret" not in recorder.form()
    assert "client_id" not in recorder.form()


async def test_post_auth_puts_credentials_in_body(client: OAuthClient, recorder: Recorder) -> None:
    await client.refresh(
        profile(auth_method="client_secret_post", client_secret="a&b=c d"), REFRESH
    )
    assert "authorization" not in recorder.last.headers
    assert recorder.form()["client_id"] == "acme-client"
    assert recorder.form()["client_secret"] == "a&b=c d"


async def test_none_auth_sends_only_client_id(client: OAuthClient, recorder: Recorder) -> None:
    await client.refresh(profile(auth_method="none", client_secret=None), REFRESH)
    assert "authorization" not in recorder.last.headers
    assert recorder.form()["client_id"] == "acme-client"
    assert "client_secret" not in recorder.form()


async def test_json_body_encoding(client: OAuthClient, recorder: Recorder) -> None:
    await client.refresh(profile(body_encoding="json"), REFRESH)
    assert recorder.last.headers["content-type"] == "application/json"
    assert json.loads(recorder.last.content) == {
        "grant_type": "refresh_token",
        "refresh_token": REFRESH,
    }
    assert decode_basic(recorder.last.headers["authorization"]) == ("acme-client", SECRET)


async def test_headers_and_timeout(client: OAuthClient, recorder: Recorder) -> None:
    await client.refresh(profile(extra_headers={"X-Api-Version": "7"}), REFRESH)
    request = recorder.last
    assert request.method == "POST"
    assert str(request.url) == "https://auth.acme.test/token"
    assert request.headers["accept"] == "application/json"
    assert request.headers["x-api-version"] == "7"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.extensions["timeout"] == {
        "connect": 7.5,
        "read": None,  # the client times the answer itself (stall-safe)
        "write": 7.5,
        "pool": 7.5,
    }


async def test_scope_on_refresh_quirk_sends_default_scopes(
    client: OAuthClient, recorder: Recorder
) -> None:
    quirky = profile(
        scopes=("offline_access", "User.Read"), quirks=frozenset({Quirk.SCOPE_ON_REFRESH})
    )
    await client.refresh(quirky, REFRESH)
    assert recorder.form()["scope"] == "offline_access User.Read"
    await client.refresh(quirky, REFRESH, scopes=["Mail.Read"])
    assert recorder.form()["scope"] == "Mail.Read"


async def test_unconfigured_profile_fails_before_any_request(
    client: OAuthClient, recorder: Recorder
) -> None:
    with pytest.raises(ProviderMisconfigured, match=r"providers\.acme: client_id"):
        await client.refresh(profile(client_id=None), REFRESH)
    assert recorder.requests == []


# -- error classification ------------------------------------------------------------------------

HTML = b"<html>nope</html>"


@pytest.mark.parametrize(
    ("status", "body", "expected", "error"),
    [
        (400, {"error": "invalid_grant"}, GrantRejected, "invalid_grant"),
        (401, {"error": "invalid_grant"}, GrantRejected, "invalid_grant"),
        (400, {"error": "invalid_scope"}, GrantRejected, "invalid_scope"),
        (400, {"error": "invalid_client"}, ProviderMisconfigured, None),
        (401, {"error": "invalid_client"}, ProviderMisconfigured, None),
        (400, {"error": "unauthorized_client"}, ProviderMisconfigured, None),
        (400, {"error": "unsupported_grant_type"}, ProviderMisconfigured, None),
        (400, {"error": "invalid_request"}, ProviderMisconfigured, None),
        (400, {"error": "something_new"}, ProviderMisconfigured, None),
        (400, {"error": "temporarily_unavailable"}, ProviderUnavailable, None),
        (401, HTML, ProviderMisconfigured, None),
        (404, HTML, ProviderMisconfigured, None),
        (302, HTML, ProviderMisconfigured, None),
        (408, HTML, ProviderUnavailable, None),
        (429, {"error": "slow_down"}, ProviderUnavailable, None),
        (500, HTML, ProviderUnavailable, None),
        (502, {"error": "invalid_grant"}, ProviderUnavailable, None),
        (503, b"", ProviderUnavailable, None),
        (200, HTML, ProviderUnavailable, None),
        (200, b"", ProviderUnavailable, None),
        (200, {}, ProviderUnavailable, None),
        (200, ["access_token"], ProviderUnavailable, None),
        (200, {"access_token": 42}, ProviderUnavailable, None),
        # Slack: HTTP 200 with an ok:false envelope.
        (200, {"ok": False, "error": "invalid_refresh_token"}, GrantRejected, "invalid_grant"),
        (200, {"ok": False, "error": "token_revoked"}, GrantRejected, "invalid_grant"),
        (200, {"ok": False, "error": "invalid_grant"}, GrantRejected, "invalid_grant"),
        (200, {"ok": False, "error": "invalid_client_id"}, ProviderMisconfigured, None),
        (200, {"ok": False, "error": "bad_client_secret"}, ProviderMisconfigured, None),
        (200, {"ok": False, "error": "ratelimited"}, ProviderUnavailable, None),
        (200, {"ok": False, "error": "invalid_arguments"}, ProviderUnavailable, None),
        (200, {"ok": False}, ProviderUnavailable, None),
        # GitHub: HTTP 200 with an "error" member.
        (200, {"error": "bad_refresh_token"}, GrantRejected, "invalid_grant"),
        (200, {"error": "bad_verification_code"}, GrantRejected, "invalid_grant"),
        (200, {"error": "incorrect_client_credentials"}, ProviderMisconfigured, None),
    ],
)
async def test_error_classification(
    client: OAuthClient,
    recorder: Recorder,
    status: int,
    body: Any,
    expected: type[Exception],
    error: str | None,
) -> None:
    recorder.answer(status, body)
    with pytest.raises(expected) as caught:
        await client.refresh(profile(), REFRESH)
    if error is not None:
        assert isinstance(caught.value, GrantRejected)
        assert caught.value.error == error
    assert "acme" in str(caught.value)
    assert REFRESH not in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 1.0), ("7", 7.0), ("0", 0.0), ("2.5", 2.5), ("-3", 0.0), ("soon", 1.0)],
)
async def test_retry_after_on_429(
    client: OAuthClient, recorder: Recorder, header: str | None, expected: float
) -> None:
    headers = {} if header is None else {"Retry-After": header}
    recorder.answer(429, {"error": "rate_limited"}, headers=headers)
    with pytest.raises(ProviderUnavailable) as caught:
        await client.refresh(profile(), REFRESH)
    assert caught.value.retry_after == expected
    assert caught.value.metadata["http_status"] == "429"


async def test_retry_after_on_503(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(503, HTML, headers={"Retry-After": "30"})
    with pytest.raises(ProviderUnavailable) as caught:
        await client.refresh(profile(), REFRESH)
    assert caught.value.retry_after == 30.0


def test_retry_after_http_date() -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:42 GMT", now) == 42.0
    assert parse_retry_after("Sun, 01 Mar 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("Xyz, 99 Foo 2026 25:00:00 GMT", now) == 1.0
    assert parse_retry_after("inf", now) == 1.0


@pytest.mark.parametrize(
    ("exception", "sent"),
    [
        (httpx.ConnectTimeout("connect timed out"), False),
        (httpx.ConnectError("connection refused"), False),
        (httpx.PoolTimeout("no free connection"), False),
        (httpx.ReadTimeout("read timed out"), True),
        (httpx.RemoteProtocolError("peer closed connection"), True),
        (httpx.ReadError("connection reset"), True),
        (httpx.WriteError("broken pipe"), True),
    ],
)
async def test_transport_failures_are_unavailable(
    client: OAuthClient, recorder: Recorder, exception: Exception, sent: bool
) -> None:
    """Only what never left is safe to send again; the rest may have rotated the token."""

    def fail(request: httpx.Request) -> httpx.Response:
        raise exception

    recorder.response = fail
    with pytest.raises(ProviderUnavailable) as caught:
        await client.refresh(profile(), REFRESH)
    assert caught.value.retry_after == 1.0
    assert caught.value.__cause__ is exception
    assert isinstance(caught.value, ProviderOutcomeUnknown) is sent


@pytest.mark.parametrize(
    ("status", "sent"), [(429, False), (503, False), (408, False), (500, True), (502, True)]
)
async def test_which_error_answers_may_have_rotated(
    client: OAuthClient, recorder: Recorder, status: int, sent: bool
) -> None:
    recorder.answer(status, {"error": "whatever"})
    with pytest.raises(ProviderUnavailable) as caught:
        await client.refresh(profile(), REFRESH)
    assert isinstance(caught.value, ProviderOutcomeUnknown) is sent


async def test_connect_and_read_timeouts_are_separate(recorder: Recorder) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder)) as http:
        client = OAuthClient(http, timeout=30, connect_timeout=2)
        await client.refresh(profile(), REFRESH)
    assert recorder.last.extensions["timeout"] == {
        "connect": 2,
        "read": None,
        "write": 30,
        "pool": 2,
    }


async def test_error_description_goes_to_the_log_only_cleaned_and_truncated(
    client: OAuthClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: the caller's message carried the description. Now only the operator's log does,
    # on one line and capped; the caller gets the code and the broker's own words.
    recorder.answer(
        400,
        {
            "error": "invalid_grant",
            "error_description": "line one\nFORGED log line\u2028two\x85 " + "x" * 500 + "TAIL",
        },
    )
    with caplog.at_level("DEBUG"), pytest.raises(GrantRejected) as caught:
        await client.refresh(profile(), REFRESH)
    assert str(caught.value) == "acme rejected the grant: invalid_grant"
    logged = [r.getMessage() for r in caplog.records if "line one" in r.getMessage()]
    assert len(logged) == 1
    assert "line one FORGED log line two xxx" in logged[0]
    assert not any(c in logged[0] for c in "\n\u2028\x85")
    assert "TAIL" not in logged[0]
    assert "…" in logged[0]
    assert len(logged[0]) < 400


async def test_odd_error_codes_are_not_echoed(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(400, {"error": f"leak {REFRESH} " * 10})
    with pytest.raises(ProviderMisconfigured) as caught:
        await client.refresh(profile(), REFRESH)
    assert REFRESH not in str(caught.value)
    assert "unrecognized_error" in str(caught.value)


async def test_slack_user_token_under_authed_user(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(
        200,
        {
            "ok": True,
            "team": {"id": "T1"},
            "authed_user": {
                "id": "U1",
                "access_token": "xoxp-1",
                "refresh_token": "xoxe-1",
                "token_type": "user",
                "scope": "search:read,users:read",
                "expires_in": 43200,
            },
        },
    )
    slack = profile(account_id_path="team.id", quirks=frozenset({Quirk.SLACK_ENVELOPE}))
    token = await client.refresh(slack, REFRESH)
    assert (token.access_token, token.refresh_token) == ("xoxp-1", "xoxe-1")
    assert token.token_type == "Bearer"
    assert token.scopes == ("search:read", "users:read")
    assert token.expires_in == 43200
    assert token.account_id == "T1"


def test_token_response_repr_hides_tokens() -> None:
    token = TokenResponse(
        access_token="at-secret-access",
        refresh_token="rt-secret-refresh",
        received_at=NOW,
        scopes=("a",),
    )
    for text in (repr(token), str(token), f"{token}"):
        assert "at-secret-access" not in text
        assert "rt-secret-refresh" not in text
        assert "<hidden>" in text
        assert "scopes=('a',)" in text
    bare = TokenResponse(access_token="at", refresh_token=None, received_at=NOW)
    assert "refresh_token=None" in repr(bare)


def test_profile_repr_hides_client_secret() -> None:
    assert SECRET not in repr(profile())
    assert "acme-client" in repr(profile())


# -- revocation ----------------------------------------------------------------------------------


async def test_revoke_sends_rfc7009_request(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(200, b"")
    await client.revoke(profile(), "tok", "refresh_token")
    assert str(recorder.last.url) == "https://auth.acme.test/revoke"
    assert recorder.form() == {"token": "tok", "token_type_hint": "refresh_token"}
    assert decode_basic(recorder.last.headers["authorization"]) == ("acme-client", SECRET)


async def test_revoke_without_endpoint(client: OAuthClient, recorder: Recorder) -> None:
    with pytest.raises(RevocationNotSupported, match="acme does not support"):
        await client.revoke(profile(revocation_url=None), "tok")
    assert recorder.requests == []


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {"ok": True}),
        (400, {"error": "invalid_token"}),  # Google, for a token it no longer knows
        (400, {"error": "invalid_grant"}),
        (200, {"ok": False, "error": "invalid_auth"}),  # Slack, same situation
        (200, {"ok": False, "error": "token_revoked"}),
    ],
)
async def test_revoke_of_dead_token_succeeds(
    client: OAuthClient, recorder: Recorder, status: int, body: Any
) -> None:
    recorder.answer(status, body)
    await client.revoke(profile(), "tok")


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (503, HTML, ProviderUnavailable),
        (429, b"", ProviderUnavailable),
        (401, {"error": "invalid_client"}, ProviderMisconfigured),
        (403, HTML, ProviderMisconfigured),
        (400, {"error": "unsupported_token_type"}, RevocationNotSupported),
        (200, {"ok": False, "error": "internal_error"}, ProviderUnavailable),
    ],
)
async def test_revoke_failures(
    client: OAuthClient, recorder: Recorder, status: int, body: Any, expected: type[Exception]
) -> None:
    recorder.answer(status, body)
    with pytest.raises(expected):
        await client.revoke(profile(), "tok")


async def test_github_style_revocation(client: OAuthClient, recorder: Recorder) -> None:
    recorder.answer(204)
    github = profile(
        revocation_url="https://api.github.test/applications/{client_id}/grant",
        quirks=frozenset({Quirk.GITHUB_REVOCATION}),
    )
    await client.revoke(github, "gho_token", "access_token")
    request = recorder.last
    assert request.method == "DELETE"
    assert str(request.url) == "https://api.github.test/applications/acme-client/grant"
    assert json.loads(request.content) == {"access_token": "gho_token"}
    assert decode_basic(request.headers["authorization"]) == ("acme-client", SECRET)

    recorder.answer(404, {"message": "Not Found"})
    await client.revoke(github, "gho_token")  # already gone
    recorder.answer(422, {"message": "Validation Failed"})
    with pytest.raises(ProviderMisconfigured):
        await client.revoke(github, "gho_token")
