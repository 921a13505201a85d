"""Built-in provider profiles and the registry that merges them with configuration.

A built-in is only a template: it becomes available once configuration gives it a client
(``[providers.google] client_id = ... client_secret_env = ...``), because the broker cannot
refresh a token without one. Any other ``[providers.NAME]`` section is an RFC 6749 provider
described by configuration alone.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

from broker import egress
from broker.config import ProviderSettings
from broker.errors import ConfigError, UnknownProvider
from broker.providers.profile import KINDS, ProviderProfile, Quirk

BUILTINS: Mapping[str, ProviderProfile] = {
    profile.name: profile
    for profile in (
        ProviderProfile(
            name="twitter",
            # The provider's documented REST API base (Proxy's destination).
            api_base_url="https://api.x.com",
            token_url="https://api.x.com/2/oauth2/token",
            authorization_url="https://x.com/i/oauth2/authorize",
            revocation_url="https://api.x.com/2/oauth2/revoke",
            # Confidential clients must use Basic; X rejects credentials in the body.
            auth_method="client_secret_basic",
            # Refresh tokens are single use: a second refresh with the same one fails.
            rotates_refresh_tokens=True,
            pkce=True,
            # Without offline.access X issues no refresh token at all.
            scopes=("tweet.read", "users.read", "offline.access"),
        ),
        ProviderProfile(
            name="google",
            # The provider's documented REST API base (Proxy's destination).
            api_base_url="https://www.googleapis.com",
            token_url="https://oauth2.googleapis.com/token",
            authorization_url="https://accounts.google.com/o/oauth2/v2/auth",
            revocation_url="https://oauth2.googleapis.com/revoke",
            auth_method="client_secret_post",
            # Refresh responses omit refresh_token; the stored one stays valid.
            rotates_refresh_tokens=False,
            pkce=True,
            # offline: otherwise no refresh token. consent: Google sends a refresh token only
            # on the first consent, so a reconnect without it would leave us with none.
            extra_authorize_params={"access_type": "offline", "prompt": "consent"},
            scopes=("openid", "email"),
            # RFC 7523 JWT bearer against the same token endpoint, with the service account's
            # own key: no OAuth client needed for it.
            kinds=frozenset({"authorization_code", "service_account"}),
            # A refresh token unused for six months is invalidated.
            refresh_token_idle_lifetime_seconds=15552000,
        ),
        ProviderProfile(
            name="slack",
            # The provider's documented REST API base (Proxy's destination).
            api_base_url="https://slack.com/api",
            token_url="https://slack.com/api/oauth.v2.access",
            authorization_url="https://slack.com/oauth/v2/authorize",
            revocation_url="https://slack.com/api/auth.revoke",
            auth_method="client_secret_post",
            # With token rotation enabled each refresh revokes the refresh token it used.
            rotates_refresh_tokens=True,
            # Without token rotation Slack issues no refresh token and no expires_in: the
            # token lives until it is revoked. Rotated tokens always carry expires_in.
            default_expires_in_seconds=0,
            pkce=False,
            account_id_path="team.id",
            scope_separator=",",
            quirks=frozenset({Quirk.SLACK_ENVELOPE}),
        ),
        ProviderProfile(
            name="notion",
            # The provider's documented REST API base (Proxy's destination).
            api_base_url="https://api.notion.com",
            token_url="https://api.notion.com/v1/oauth/token",
            authorization_url="https://api.notion.com/v1/oauth/authorize",
            revocation_url="https://api.notion.com/v1/oauth/revoke",
            # Notion wants Basic credentials and a JSON body, on the token and revoke endpoints.
            auth_method="client_secret_basic",
            body_encoding="json",
            default_expires_in_seconds=0,
            pkce=False,
            extra_authorize_params={"owner": "user"},
            extra_headers={"Notion-Version": "2022-06-28"},
            account_id_path="workspace_id",
            # Internal integrations authenticate with a secret sent as a Bearer API key.
            kinds=frozenset({"authorization_code", "api_key"}),
        ),
        ProviderProfile(
            name="github",
            # The provider's documented REST API base (Proxy's destination).
            api_base_url="https://api.github.com",
            token_url="https://github.com/login/oauth/access_token",
            authorization_url="https://github.com/login/oauth/authorize",
            revocation_url="https://api.github.com/applications/{client_id}/grant",
            auth_method="client_secret_post",
            # GitHub App user tokens expire and rotate; classic OAuth app tokens never expire
            # and come without expires_in or refresh_token.
            rotates_refresh_tokens=True,
            default_expires_in_seconds=0,
            pkce=True,
            # Without it GitHub answers application/x-www-form-urlencoded. The client sends it
            # for every provider; it is spelled out here because GitHub depends on it.
            extra_headers={"Accept": "application/json"},
            scopes=("read:user",),
            quirks=frozenset({Quirk.GITHUB_REVOCATION}),
            # App installation tokens: App JWT -> POST {api_url}/app/installations/{id}/...
            kinds=frozenset({"authorization_code", "github_app_installation"}),
            api_url="https://api.github.com",
        ),
        ProviderProfile(
            name="microsoft",
            # The provider's documented REST API base (Proxy's destination).
            api_base_url="https://graph.microsoft.com",
            # "common" accepts work, school and personal accounts; a single-tenant app
            # overrides both URLs with its tenant id.
            token_url="https://login.microsoftonline.com/common/oauth2/v2.0/token",
            authorization_url="https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
            # No RFC 7009 endpoint: sign-in sessions are revoked through Graph, per user.
            revocation_url=None,
            auth_method="client_secret_post",
            # Every refresh returns a new refresh token; the old one is not revoked at once,
            # but only the newest should be kept.
            rotates_refresh_tokens=True,
            pkce=True,
            scopes=("offline_access", "User.Read"),
            quirks=frozenset({Quirk.SCOPE_ON_REFRESH}),
            # Refresh tokens lapse after 90 days of inactivity.
            refresh_token_idle_lifetime_seconds=7776000,
        ),
    )
}

# Other names callers use for a built-in; the registry answers with the canonical profile, so
# integrations are stored under one name.
ALIASES: Mapping[str, str] = {"x": "twitter", "gmail": "google"}

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# Settings copied onto the profile as they are when set; the rest need converting.
_PLAIN = (
    "token_url",
    "authorization_url",
    "revocation_url",
    "client_id",
    "auth_method",
    "rotates_refresh_tokens",
    "refresh_margin_seconds",
    "max_concurrent_refreshes",
    "max_refreshes_per_second",
    "default_expires_in_seconds",
    "refresh_token_idle_lifetime_seconds",
    "body_encoding",
    "pkce",
    "account_id_path",
    "api_url",
    "api_base_url",
)


class ProviderRegistry:
    """The providers this broker can serve, by name (aliases included)."""

    def __init__(
        self, profiles: Mapping[str, ProviderProfile], aliases: Mapping[str, str] | None = None
    ) -> None:
        self._profiles = dict(profiles)
        self._aliases = {
            alias: target
            for alias, target in (ALIASES if aliases is None else aliases).items()
            if target in self._profiles
        }
        self._misconfigured: dict[str, str] = {}

    def canonical(self, name: str) -> str:
        """The name integrations of this provider are stored under; raises UnknownProvider."""
        name = self._aliases.get(name, name)
        if name not in self._profiles:
            raise UnknownProvider(name)
        return name

    def get(self, name: str) -> ProviderProfile:
        return self._profiles[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._profiles)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._aliases.get(name, name) in self._profiles

    def __iter__(self) -> Iterator[ProviderProfile]:
        return iter(self._profiles[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._profiles)

    # The provider rejected our client (invalid_client / unauthorized_client). Kept in memory
    # only: a restart after fixing the configuration clears it.
    def mark_misconfigured(self, name: str, reason: str = "") -> None:
        self._misconfigured[self.canonical(name)] = reason

    def clear_misconfigured(self, name: str) -> None:
        self._misconfigured.pop(self.canonical(name), None)

    def is_misconfigured(self, name: str) -> bool:
        return self.canonical(name) in self._misconfigured

    def misconfigured_reason(self, name: str) -> str | None:
        return self._misconfigured.get(self.canonical(name))


def build_registry(
    providers: Mapping[str, ProviderSettings], env: Mapping[str, str]
) -> ProviderRegistry:
    """Merge the catalog with ``Settings.providers``; raise ConfigError naming a bad setting."""
    by_canonical: dict[str, str] = {}
    for key in providers:
        canonical = ALIASES.get(key, key)
        if canonical in by_canonical:
            raise ConfigError(
                f"providers.{key}: configures the same provider as "
                f"providers.{by_canonical[canonical]}; keep one of them"
            )
        by_canonical[canonical] = key

    profiles: dict[str, ProviderProfile] = {}
    for canonical, key in by_canonical.items():
        profile = _profile(canonical, key, providers[key], env)
        profiles[canonical] = profile
    return ProviderRegistry(profiles)


def _profile(
    canonical: str, key: str, settings: ProviderSettings, env: Mapping[str, str]
) -> ProviderProfile:
    where = f"providers.{key}"
    base = BUILTINS.get(canonical)
    if base is None:
        if not _NAME.fullmatch(key):
            raise ConfigError(
                f"{where}: a provider name is 1-63 lowercase letters, digits, '.', '_' or '-'"
            )
        base = ProviderProfile(name=canonical)

    changes: dict[str, Any] = {
        name: getattr(settings, name) for name in _PLAIN if getattr(settings, name) is not None
    }
    if settings.allowed_token_urls:
        changes["allowed_token_urls"] = tuple(settings.allowed_token_urls)
    if settings.api_hosts:
        changes["api_hosts"] = tuple(settings.api_hosts)
    if settings.scopes is not None:
        changes["scopes"] = tuple(settings.scopes)
    if settings.redirect_uris is not None:
        changes["redirect_uris"] = tuple(settings.redirect_uris)
    if settings.extra_headers is not None:
        changes["extra_headers"] = _merge(base.extra_headers, settings.extra_headers)
    if settings.extra_authorize_params is not None:
        changes["extra_authorize_params"] = _merge(
            base.extra_authorize_params, settings.extra_authorize_params
        )
    if settings.kinds is not None:
        unknown = sorted(set(settings.kinds) - set(KINDS))
        if unknown or not settings.kinds:
            raise ConfigError(f"{where}.kinds: give one or more of {', '.join(KINDS)}")
        changes["kinds"] = frozenset(settings.kinds)
    changes["client_secret"] = _client_secret(where, settings, env)
    profile = dataclasses.replace(base, **changes)

    for name in ("token_url", "authorization_url", "revocation_url", "api_url", "api_base_url"):
        _check_url(f"{where}.{name}", getattr(profile, name))
    for host in profile.api_hosts:
        _check_url(f"{where}.api_hosts", host)
    for uri in profile.redirect_uris:
        _check_url(f"{where}.redirect_uris", uri)
    for allowed in profile.allowed_token_urls:
        _check_url(f"{where}.allowed_token_urls", allowed)
    missing = profile.missing_settings()
    if missing:
        hint = "" if canonical in BUILTINS else " (it is not a built-in provider)"
        raise ConfigError(f"{where}.{missing[0]}: required{hint}")
    return profile


def _client_secret(where: str, settings: ProviderSettings, env: Mapping[str, str]) -> str | None:
    if settings.client_secret_env:
        secret = env.get(settings.client_secret_env)
        if not secret:
            raise ConfigError(
                f"{where}.client_secret_env: environment variable "
                f"{settings.client_secret_env} is not set"
            )
        return secret
    if settings.client_secret is not None:
        return settings.client_secret.get_secret_value()
    return None


def _merge(base: Mapping[str, str], overrides: Mapping[str, str]) -> dict[str, str]:
    # Configured keys win; an empty value removes a built-in default (e.g. Google's
    # prompt=consent) rather than sending an empty parameter.
    merged = {**base, **overrides}
    return {key: value for key, value in merged.items() if value != ""}


def _check_url(where: str, url: str | None) -> None:
    if url is None:
        return
    # Plain http would put client secrets and tokens on the wire; loopback is for tests and
    # local fakes only. Redirect URIs are never sent to, but the same rules keep them honest.
    problem = egress.problem(url)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
