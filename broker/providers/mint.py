"""Minting short-lived access tokens from long-lived credentials (client credentials, a
service-account JWT, a GitHub App installation).

    client_credentials        RFC 6749 §4.4 at the token endpoint, with the integration's own
                              client id and secret
    service_account           RFC 7523 JWT-bearer grant: an assertion signed with the
                              integration's private key (Google service accounts)
    github_app_installation   an App JWT exchanged at
                              POST {api_url}/app/installations/{id}/access_tokens

Answers become the OAuth client's ``TokenResponse`` and its error tree, so the refresh engine
treats a mint like a refresh. One difference in classification: the client a mint
authenticates with is the integration's own credential, not the broker's, so a rejected client
(``invalid_client``, a GitHub 401/403/404: wrong key, revoked key, uninstalled App) is a
``GrantRejected`` for that one integration (NEEDS_REAUTHORIZATION), never a provider flagged
misconfigured for everyone.

JWTs are signed by PyJWT with a short lifetime; ``iat`` is set a little in the past so a
provider whose clock runs behind ours does not reject it as issued in the future.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import quote

import jwt

from broker.errors import GrantRejected, ProviderMisconfigured
from broker.providers.client import (
    OAuthClient,
    TokenResponse,
    classify,
    log_answer,
    raise_for_transient,
    read_body,
)
from broker.providers.profile import AuthMethod, ProviderProfile

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Backdating of iat: how far behind ours a provider's clock may run.
CLOCK_SKEW_SECONDS = 60
# Assertion lifetimes: Google accepts at most an hour, GitHub at most ten minutes.
ASSERTION_SECONDS = 300
GITHUB_JWT_SECONDS = 540
_AUTH_METHODS: dict[str, AuthMethod] = {
    "client_secret_basic": "client_secret_basic",
    "client_secret_post": "client_secret_post",
}
_CLIENT_REJECTED = frozenset({"invalid_client", "unauthorized_client"})
_GITHUB_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}


class Minter:
    """Mints tokens over the shared OAuth client (its HTTP pool, timeout and clock)."""

    def __init__(self, client: OAuthClient) -> None:
        self.client = client

    async def mint(
        self, profile: ProviderProfile, kind: str, fields: Mapping[str, Any]
    ) -> TokenResponse:
        try:
            if kind == "client_credentials":
                return await self._client_credentials(profile, fields)
            if kind == "service_account":
                return await self._jwt_bearer(profile, fields)
            if kind == "github_app_installation":
                return await self._github_installation(profile, fields)
        except ProviderMisconfigured as exc:
            if exc.metadata.get("provider_error") in _CLIENT_REJECTED:
                raise GrantRejected(
                    f"{profile.name} rejected the integration's {kind} credential: "
                    f"{exc.metadata['provider_error']}",
                    error="invalid_client",
                    provider=profile.name,
                ) from None
            raise
        raise ValueError(f"{kind} is not a minted credential kind")

    async def _client_credentials(
        self, profile: ProviderProfile, f: Mapping[str, Any]
    ) -> TokenResponse:
        endpoint = dataclasses.replace(
            profile,
            token_url=token_url(profile, "client_credentials", f),
            client_id=f["client_id"],
            client_secret=f["client_secret"],
            auth_method=_AUTH_METHODS.get(f["auth_method"]) or _secret_method(profile),
        )
        fields = {"grant_type": "client_credentials"}
        if f["scopes"]:
            fields["scope"] = " ".join(f["scopes"])
        if f["audience"]:
            fields["audience"] = f["audience"]
        if f["resource"]:
            fields["resource"] = f["resource"]
        return await self.client.token_request(endpoint, fields)

    async def _jwt_bearer(self, profile: ProviderProfile, f: Mapping[str, Any]) -> TokenResponse:
        url = token_url(profile, "service_account", f)
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": f["issuer"],
            "aud": f["audience"] or url,
            "iat": now - CLOCK_SKEW_SECONDS,
            "exp": now + ASSERTION_SECONDS,
        }
        if f["subject"]:
            claims["sub"] = f["subject"]
        if f["scopes"]:
            claims["scope"] = " ".join(f["scopes"])
        headers = {"kid": f["key_id"]} if f["key_id"] else None
        assertion = jwt.encode(claims, f["private_key"], f["algorithm"], headers=headers)
        # The assertion authenticates the client (RFC 7523 §3.1): no client secret is sent;
        # client_id names the issuer for servers that want one.
        endpoint = dataclasses.replace(
            profile, token_url=url, client_id=f["issuer"], auth_method="none"
        )
        return await self.client.token_request(
            endpoint, {"grant_type": JWT_BEARER, "assertion": assertion}
        )

    async def _github_installation(
        self, profile: ProviderProfile, f: Mapping[str, Any]
    ) -> TokenResponse:
        client = self.client
        url = f"{profile.api_url}/app/installations/{quote(f['installation_id'])}/access_tokens"
        body: dict[str, Any] = {}
        if f["repositories"]:
            body["repositories"] = list(f["repositories"])
        if f["permissions"]:
            body["permissions"] = dict(f["permissions"])
        response, received_at = await client.call(
            profile,
            "POST",
            url,
            "installation token request",
            json=body,
            headers={**_GITHUB_HEADERS, "Authorization": "Bearer " + _app_jwt(f)},
        )
        raise_for_transient(profile, response)
        answer = read_body(response)
        if response.status_code in (401, 403, 404, 422):
            # 401: the App JWT is refused (wrong or revoked key); 403/404: the installation is
            # suspended or gone (App uninstalled); 422: permissions beyond the installation's.
            # GitHub's "message" is for the operator's log, not for the caller.
            log_answer(
                profile.name,
                "installation token request",
                response.status_code,
                {"error_description": (answer or {}).get("message")},
            )
            raise GrantRejected(
                f"{profile.name} refused an installation token (HTTP {response.status_code})",
                error="invalid_grant",
                provider=profile.name,
            )
        token = (answer or {}).get("token")
        if not response.is_success:
            raise classify(profile, response.status_code, answer, "installation token request")
        if not isinstance(token, str) or not token:
            raise classify(profile, 502, None, "installation token request")
        expires_in = None
        expires_at = (answer or {}).get("expires_at")
        if isinstance(expires_at, str):
            try:
                when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
                expires_in = max(0, int((when - received_at).total_seconds()))
            except ValueError:
                expires_in = None
        return TokenResponse(
            access_token=token,
            refresh_token=None,
            received_at=received_at,
            token_type="Bearer",
            expires_in=expires_in,
        )

    async def revoke_installation_token(self, profile: ProviderProfile, token: str) -> None:
        """DELETE {api_url}/installation/token; an unknown token (401/404) counts as revoked."""
        client = self.client
        response, _ = await client.call(
            profile,
            "DELETE",
            f"{profile.api_url}/installation/token",
            "revocation",
            headers={**_GITHUB_HEADERS, "Authorization": "Bearer " + token},
        )
        raise_for_transient(profile, response)
        if response.is_success or response.status_code in (401, 404):
            return
        raise classify(profile, response.status_code, read_body(response), "revocation")


def _app_jwt(f: Mapping[str, Any]) -> str:
    now = int(time.time())
    claims = {"iat": now - CLOCK_SKEW_SECONDS, "exp": now + GITHUB_JWT_SECONDS, "iss": f["app_id"]}
    return jwt.encode(claims, f["private_key"], "RS256")


def _secret_method(profile: ProviderProfile) -> AuthMethod:
    # A profile whose own client is public ("none") still authenticates a client-credentials
    # client, which always has a secret.
    return "client_secret_basic" if profile.auth_method == "none" else profile.auth_method


def token_url(profile: ProviderProfile, kind: str, f: Mapping[str, Any]) -> str | None:
    """Where this credential's tokens are minted: its own token_url when the profile allows
    it (checked again here, so a row stored under an older configuration is refused, never
    sent), else the profile's."""
    own = f.get("token_url") or ""
    if not own:
        return profile.token_url
    if profile.allows_token_url(own):
        return str(own)
    raise ProviderMisconfigured(
        f"the integration's credential.{kind}.token_url is not providers.{profile.name}."
        f"token_url nor in providers.{profile.name}.allowed_token_urls; nothing was sent. "
        "Store the credential again with an allowed token_url, or list it there",
        provider=profile.name,
        field=f"credential.{kind}.token_url",
    )
