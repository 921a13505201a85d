"""Provider settings for the fake authorization server, and the web app's callback URL."""

from __future__ import annotations

from typing import Any

from tests.helpers.fakes import FakeAuthServer

CALLBACK = "https://app.example.test/callback"


def acme(fake: FakeAuthServer, **extra: Any) -> dict[str, Any]:
    return {
        "token_url": fake.token_url,
        "authorization_url": fake.authorization_url,
        "revocation_url": fake.revocation_url,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "redirect_uris": [CALLBACK],
        "scopes": ["read"],
        **extra,
    }


def provider_settings(fake: FakeAuthServer, **extra: Any) -> dict[str, Any]:
    return {
        "acme": {
            "token_url": fake.token_url,
            "authorization_url": fake.authorization_url,
            "revocation_url": fake.revocation_url,
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
            "rotates_refresh_tokens": True,
            **extra,
        }
    }
