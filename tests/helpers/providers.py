"""Provider settings for the fake authorization server, and the web app's callback URL."""

from __future__ import annotations

from typing import Any

from tests.helpers.fakes import FakeAuthServer

CALLBACK = "https://app.example.test/callback"
# The environment variable a broker *process* reads the fake's client secret from.
SECRET_ENV = "ACME_SECRET"


def endpoints(fake: FakeAuthServer) -> dict[str, Any]:
    """The fake's URLs and client: enough for every grant the broker can store or start."""
    return {
        "token_url": fake.token_url,
        "authorization_url": fake.authorization_url,
        "revocation_url": fake.revocation_url,
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
    }


def acme(fake: FakeAuthServer, **extra: Any) -> dict[str, Any]:
    """A provider the authorization flow can start with (callback and default scopes)."""
    return {**endpoints(fake), "redirect_uris": [CALLBACK], "scopes": ["read"], **extra}


def provider_settings(fake: FakeAuthServer, **extra: Any) -> dict[str, Any]:
    """``providers`` with one provider, acme, whose refresh tokens rotate."""
    return {"acme": {**endpoints(fake), "rotates_refresh_tokens": True, **extra}}


def acme_from_env(fake: FakeAuthServer) -> dict[str, Any]:
    """Acme for broker processes: the client secret comes from ``SECRET_ENV``, which the
    test sets to ``fake.client_secret`` in the processes' environment."""
    return {
        "token_url": fake.token_url,
        "client_id": fake.client_id,
        "client_secret_env": SECRET_ENV,
        "rotates_refresh_tokens": True,
    }
