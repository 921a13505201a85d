"""What the response adapters read from the fake's answers, at the OAuth client: the refresh
token's own lifetime under a non-standard name, and the members kept as metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from broker.providers import BUILTINS, OAuthClient, ProviderProfile, Quirk
from tests.helpers.fakes import FakeAuthServer

# The fake_profile fixture (tests/providers/conftest.py): the fake as a custom provider.
ProfileFactory = Callable[..., ProviderProfile]


@pytest.mark.parametrize(
    ("arguments", "member", "value", "expected"),
    [
        ({}, "x_refresh_token_expires_in", 8726400, 8726400),
        ({}, "x_refresh_token_expires_in", "8726400", 8726400),
        ({"refresh_expiry_field": "refresh_expires_in"}, "refresh_expires_in", 31536000, 31536000),
        ({}, "x_refresh_token_expires_in", "soon", None),
    ],
)
async def test_refresh_expiry_field(
    fake: FakeAuthServer,
    oauth: OAuthClient,
    fake_profile: ProfileFactory,
    arguments: dict[str, str],
    member: str,
    value: object,
    expected: int | None,
) -> None:
    fake.extra_token_fields = {member: value}
    _, refresh = fake.issue_grant()
    profile = fake_profile(
        quirks=frozenset({Quirk.REFRESH_EXPIRY_FIELD}), adapter_arguments=arguments
    )
    token = await oauth.refresh(profile, refresh)
    assert token.refresh_token_expires_in == expected
    # Without the adapter the member is not read.
    plain = await oauth.refresh(fake_profile(), token.refresh_token or "")
    assert plain.refresh_token_expires_in is None


async def test_intuit_reads_its_refresh_token_lifetime(
    fake: FakeAuthServer, oauth: OAuthClient
) -> None:
    fake.extra_token_fields = {"x_refresh_token_expires_in": 8726400}
    _, refresh = fake.issue_grant()
    intuit = dataclasses.replace(
        BUILTINS["intuit"],
        token_url=fake.token_url,
        client_id=fake.client_id,
        client_secret=fake.client_secret,
    )
    token = await oauth.refresh(intuit, refresh)
    assert token.refresh_token_expires_in == 8726400
    assert fake.requests[-1].auth_method == "client_secret_basic"


async def test_instance_url_metadata_keeps_only_short_strings(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    fake.extra_token_fields = {"instance_url": "https://na1.example.test", "id": 42}
    _, refresh = fake.issue_grant()
    profile = fake_profile(quirks=frozenset({Quirk.INSTANCE_URL_METADATA}))
    token = await oauth.refresh(profile, refresh)
    assert token.metadata == {"instance_url": "https://na1.example.test"}
    fake.extra_token_fields = {"instance_url": "https://" + "a" * 3000}
    token = await oauth.refresh(profile, token.refresh_token or "")
    assert token.metadata == {}


async def test_nested_tokens_default_path_is_data(
    fake: FakeAuthServer, oauth: OAuthClient, fake_profile: ProfileFactory
) -> None:
    fake.nest_tokens = "data"
    _, refresh = fake.issue_grant()
    token = await oauth.refresh(fake_profile(quirks=frozenset({Quirk.NESTED_TOKENS})), refresh)
    assert token.access_token
    assert token.refresh_token
    assert token.expires_in == 60
