"""Fixtures for the provider tests: a started FakeAuthServer and an OAuthClient on real httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from broker.providers import OAuthClient, ProviderProfile
from tests.helpers.fakes import FakeAuthServer, serve_fake

ProfileFactory = Callable[..., ProviderProfile]


@pytest.fixture
def fake() -> Iterator[FakeAuthServer]:
    yield from serve_fake(expires_in=60)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def oauth(http: httpx.AsyncClient) -> OAuthClient:
    return OAuthClient(http, timeout=2.0)


@pytest.fixture
def fake_profile(fake: FakeAuthServer) -> ProfileFactory:
    """A custom RFC 6749 provider pointing at the fake; keyword arguments override fields."""

    def make(**changes: Any) -> ProviderProfile:
        fields: dict[str, Any] = {
            "name": "fake",
            "token_url": fake.token_url,
            "authorization_url": fake.authorization_url,
            "revocation_url": fake.revocation_url,
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
        }
        fields.update(changes)
        return ProviderProfile(**fields)

    return make
