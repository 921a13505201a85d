"""Building the authorization request of the authorization-code flow with PKCE (RFC 7636)."""

from __future__ import annotations

import hashlib
import secrets
from base64 import urlsafe_b64encode
from collections.abc import Sequence
from urllib.parse import urlencode

from broker.errors import ProviderMisconfigured
from broker.providers.profile import ProviderProfile


def new_code_verifier() -> str:
    # 64 random bytes give 86 characters, inside RFC 7636's 43-128 and well over its
    # 256-bit entropy recommendation.
    return secrets.token_urlsafe(64)


def code_challenge(verifier: str) -> str:
    """The S256 challenge for ``verifier``: unpadded base64url of its SHA-256."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorization_url(
    profile: ProviderProfile,
    *,
    redirect_uri: str,
    state: str,
    scopes: Sequence[str] | None = None,
    code_verifier: str | None = None,
) -> str:
    """The URL to send the user to; ``scopes=None`` asks for the profile's default scopes."""
    if not profile.authorization_url or not profile.client_id:
        raise ProviderMisconfigured(
            f"providers.{profile.name}: authorization_url and client_id are needed "
            "to start an authorization",
            provider=profile.name,
        )
    if profile.unfilled_templates:
        raise ProviderMisconfigured(
            f"providers.{profile.name}: the authorization URL needs "
            f"{', '.join(profile.unfilled_templates)} (template_values or the flow's metadata)",
            provider=profile.name,
        )
    # Provider extras go first so they can never replace the parameters the flow relies on.
    params = dict(profile.extra_authorize_params)
    params.update(response_type="code", client_id=profile.client_id, redirect_uri=redirect_uri)
    params["state"] = state
    requested = profile.scopes if scopes is None else tuple(scopes)
    if requested:
        params["scope"] = profile.scope_separator.join(requested)
    if code_verifier is not None and profile.pkce:
        params["code_challenge"] = code_challenge(code_verifier)
        params["code_challenge_method"] = "S256"
    separator = "&" if "?" in profile.authorization_url else "?"
    return profile.authorization_url + separator + urlencode(params)
