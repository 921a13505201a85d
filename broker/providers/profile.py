"""What the broker knows about one OAuth 2.0 provider: endpoints, client, and response quirks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from broker import egress

# Credential kinds a profile can serve (``broker.model.Kind`` values). Only the
# authorization code needs the broker's own OAuth client.
AUTHORIZATION_CODE = "authorization_code"
KINDS = (
    AUTHORIZATION_CODE,
    "api_key",
    "basic",
    "client_credentials",
    "service_account",
    "github_app_installation",
)


def safe_url(url: str) -> bool:
    """Whether the broker may send to ``url`` (the egress rules: https, or http to loopback,
    no user information)."""
    return egress.problem(url) is None


AuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
BodyEncoding = Literal["form", "json"]


class Quirk(StrEnum):
    """Deviations from RFC 6749 that the client has to know about.

    Some quirks need no flag and are handled for every provider, because a standards-following
    server never triggers them: an ``error`` member in a 200 body (GitHub answers errors with
    200), ``{"ok": false}`` envelopes, a comma-separated ``scope``. Google omits
    ``refresh_token`` from refresh responses; the client returns ``refresh_token=None`` and the
    refresh engine keeps the stored one, as it does for every provider.
    """

    # Slack: a user-token install puts its tokens under "authed_user", and token_type is "bot"
    # or "user" although both are used as Bearer tokens.
    SLACK_ENVELOPE = "slack_envelope"
    # Microsoft identity platform v2: a refresh without "scope" is rejected, so the profile's
    # default scopes are sent when the caller has none.
    SCOPE_ON_REFRESH = "scope_on_refresh"
    # GitHub has no RFC 7009 endpoint: DELETE /applications/{client_id}/grant with Basic auth
    # and {"access_token": ...} revokes the whole authorization.
    GITHUB_REVOCATION = "github_revocation"


@dataclass(frozen=True, slots=True)
class ProviderProfile:
    """A provider as the client uses it; built by the registry from the catalog and settings.

    ``client_secret`` is left out of the repr so a profile can be logged. ``token_url`` and
    ``client_id`` are optional only because built-in templates ship without a client; the
    registry never hands out a profile for which ``missing_settings()`` is not empty.
    """

    name: str
    token_url: str | None = None
    # Token endpoints a credential may name besides token_url (providers.NAME.allowed_token_urls).
    allowed_token_urls: tuple[str, ...] = ()
    authorization_url: str | None = None
    revocation_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    auth_method: AuthMethod = "client_secret_basic"
    # True when every refresh returns a new refresh token and invalidates the old one, so two
    # concurrent refreshes of one grant can get it revoked (RFC 9700 §4.14.2).
    rotates_refresh_tokens: bool = False
    # None: use RefreshSettings.margin_seconds.
    refresh_margin_seconds: float | None = None
    # None: use RefreshSettings.max_concurrent_per_provider / max_refreshes_per_second_per_provider.
    max_concurrent_refreshes: int | None = None
    max_refreshes_per_second: float | None = None
    # Lifetime assumed when a token response has no expires_in. 0: the token never expires.
    # None: use RefreshSettings.default_expires_in_seconds.
    default_expires_in_seconds: int | None = None
    # How long an unused refresh token stays valid at the provider; the background pass
    # refreshes after half of it without use (keep-alive). None: no idle lapse known.
    refresh_token_idle_lifetime_seconds: int | None = None
    body_encoding: BodyEncoding = "form"
    pkce: bool = True
    extra_authorize_params: Mapping[str, str] = field(default_factory=dict, hash=False)
    extra_headers: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Dotted path into the token response JSON, e.g. "team.id".
    account_id_path: str | None = None
    redirect_uris: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    # How scopes are joined in an authorization URL; RFC 6749 says space, Slack wants commas.
    scope_separator: str = " "
    quirks: frozenset[Quirk] = frozenset()
    # Credential kinds StoreIntegration accepts for this provider.
    kinds: frozenset[str] = frozenset({AUTHORIZATION_CODE})
    # REST API base URL, for the GitHub App installation-token endpoint.
    api_url: str | None = None
    # Where Proxy sends this provider's API calls (paths are relative to it), and the
    # provider's other API bases; None: the provider cannot be proxied.
    api_base_url: str | None = None
    api_hosts: tuple[str, ...] = ()

    def missing_settings(self) -> tuple[str, ...]:
        """Names of the settings this profile still needs before it can refresh tokens."""
        missing = []
        if AUTHORIZATION_CODE not in self.kinds:
            # No OAuth client of the broker's own: each integration brings its credential.
            return ("api_url",) if self._needs_api_url else ()
        if not self.token_url:
            missing.append("token_url")
        if not self.client_id:
            missing.append("client_id")
        if self.auth_method != "none" and not self.client_secret:
            missing.append("client_secret_env")
        if self._needs_api_url:
            missing.append("api_url")
        return tuple(missing)

    @property
    def _needs_api_url(self) -> bool:
        return "github_app_installation" in self.kinds and not self.api_url

    @property
    def is_configured(self) -> bool:
        return not self.missing_settings()

    @property
    def supports_authorization(self) -> bool:
        """Whether the broker can run the authorization-code flow itself for this provider."""
        return self.is_configured and bool(self.authorization_url)

    @property
    def supports_revocation(self) -> bool:
        return bool(self.revocation_url)

    def allows_token_url(self, url: str) -> bool:
        """Whether a credential may have its tokens minted at ``url``: the profile's own
        token_url or one of allowed_token_urls, compared as parsed (case, default port)."""
        wanted = egress.canonical(url)
        return wanted is not None and any(
            egress.canonical(allowed) == wanted
            for allowed in (self.token_url, *self.allowed_token_urls)
            if allowed
        )

    def has(self, quirk: Quirk) -> bool:
        return quirk in self.quirks
