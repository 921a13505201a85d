"""What the broker knows about one OAuth 2.0 provider: endpoints, client, and response quirks."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from broker import egress
from broker.errors import ProviderMisconfigured

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
    """The named request/response adapters: each one deviation from RFC 6749 that the client
    handles in one place, selected by a catalog entry or by ``[providers.NAME] adapters``.

    Some deviations need no adapter and are handled for every provider, because a
    standards-following server never shows them: an ``error`` member in a 200 body (GitHub
    answers errors with 200), ``{"ok": false}`` envelopes, a comma-separated ``scope`` in a
    token response, ``expires_in`` sent as a string, and a refresh answer without
    ``refresh_token`` (the refresh engine keeps the stored one). The adapters of those
    (``string_expires_in``, ``no_refresh_token_on_refresh``) say so about a provider, so the
    catalog tells the whole truth, and change nothing in the client.
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
    # The token members sit in an object of the response (argument: its dotted path, default
    # "data") when the top level has no access_token.
    NESTED_TOKENS = "nested_tokens"
    # expires_in (and refresh_token_expires_in) come as strings of digits. Read for every
    # provider; the adapter records the fact.
    STRING_EXPIRES_IN = "string_expires_in"
    # Scopes are joined with commas, in the authorization URL and in a refresh's scope.
    COMMA_SCOPES = "comma_scopes"
    # Token and revocation requests carry a JSON body instead of a form.
    JSON_TOKEN_REQUEST = "json_token_request"
    # Refresh answers carry no refresh_token and the one used stays valid: the stored one is
    # kept (for every provider); the adapter records the fact.
    NO_REFRESH_TOKEN_ON_REFRESH = "no_refresh_token_on_refresh"
    # The refresh token's own lifetime, in seconds, under a non-standard name (argument: the
    # member, default Intuit's "x_refresh_token_expires_in"), read as refresh_token_expires_in.
    REFRESH_EXPIRY_FIELD = "refresh_expiry_field"
    # Salesforce: the org's API host comes in the token response as instance_url (and the
    # user's identity URL as id); both are kept in the integration's metadata.
    INSTANCE_URL_METADATA = "instance_url_metadata"


# The other name of the concept in configuration and the catalog.
Adapter = Quirk

# Adapters that take an argument ("name:argument"), and the argument when none is given.
ADAPTER_DEFAULTS: Mapping[Quirk, str] = {
    Quirk.NESTED_TOKENS: "data",
    Quirk.REFRESH_EXPIRY_FIELD: "x_refresh_token_expires_in",
}
_ARGUMENT = re.compile(r"[A-Za-z0-9_]{1,64}(\.[A-Za-z0-9_]{1,64}){0,7}")
# Response members the instance_url_metadata adapter keeps as metadata.
INSTANCE_METADATA_FIELDS = ("instance_url", "id")


def parse_adapters(values: Iterable[str]) -> tuple[frozenset[Quirk], dict[str, str]]:
    """``["nested_tokens:data", "comma_scopes"]`` as (adapters, arguments); ValueError names
    an unknown adapter or a bad argument (the caller adds where it was configured)."""
    chosen: set[Quirk] = set()
    arguments: dict[str, str] = {}
    for value in values:
        name, sep, argument = value.partition(":")
        try:
            adapter = Quirk(name)
        except ValueError:
            known = ", ".join(sorted(a.value for a in Quirk))
            raise ValueError(f"unknown adapter {name!r} (known: {known})") from None
        if sep:
            if adapter not in ADAPTER_DEFAULTS:
                raise ValueError(f"adapter {name!r} takes no argument")
            if not _ARGUMENT.fullmatch(argument):
                raise ValueError(
                    f"adapter {name!r}: the argument must be a dotted path of letters, digits "
                    "and '_'"
                )
            arguments[adapter.value] = argument
        chosen.add(adapter)
    return frozenset(chosen), arguments


# A template variable in an endpoint: "{subdomain}", "{tenant}", "{shop}". "{client_id}" in
# GitHub's revocation URL is the client's own id, filled by the client, never a template.
_PLACEHOLDER = re.compile(r"\{([a-z][a-z0-9_]{0,31})\}")
RESERVED_PLACEHOLDERS = frozenset({"client_id"})
# What a template value may be: one DNS label, lower case. It can name a subdomain of the
# provider's own host or one path segment and nothing else: no dot, slash, colon, '@' or
# percent sign, so no value can move a request to another host (operators choose hosts).
TEMPLATE_VALUE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
TEMPLATE_VALUE_RULE = "must be one lowercase DNS label (a-z, 0-9 and '-', at most 63)"
# The endpoint fields that may hold templates.
URL_FIELDS = ("token_url", "authorization_url", "revocation_url", "api_base_url")


def placeholders(url: str | None) -> set[str]:
    if not url:
        return set()
    return {name for name in _PLACEHOLDER.findall(url) if name not in RESERVED_PLACEHOLDERS}


def render(url: str, values: Mapping[str, str]) -> str:
    """``url`` with the placeholders ``values`` has filled; the others stay as they are."""
    return _PLACEHOLDER.sub(
        lambda found: (
            values.get(found.group(1), found.group(0))
            if found.group(1) not in RESERVED_PLACEHOLDERS
            else found.group(0)
        ),
        url,
    )


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
    # Arguments of the adapters that take one (ADAPTER_DEFAULTS), by adapter name.
    adapter_arguments: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Credential kinds StoreIntegration accepts for this provider.
    kinds: frozenset[str] = frozenset({AUTHORIZATION_CODE})
    # REST API base URL, for the GitHub App installation-token endpoint.
    api_url: str | None = None
    # Where Proxy sends this provider's API calls (paths are relative to it), and the
    # provider's other API bases; None: the provider cannot be proxied.
    api_base_url: str | None = None
    api_hosts: tuple[str, ...] = ()
    # How long a refresh token the provider issued stays valid at most from its issue,
    # however often it is used (its absolute lifetime); None: unbounded or not known.
    refresh_token_lifetime_seconds: int | None = None
    # Endpoints as written in the catalog or configuration, with their placeholders, by field
    # name; the fields above hold them with the values known at start-up filled in.
    url_templates: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Template values fixed by configuration ([providers.NAME] template_values): an
    # integration's metadata cannot change them.
    template_values: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Values used when neither configuration nor the integration's metadata gives one.
    template_defaults: Mapping[str, str] = field(default_factory=dict, hash=False)
    # The catalog's description: a display name and where its values come from.
    title: str = ""
    docs: str | None = None

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

    def argument(self, adapter: Quirk) -> str:
        """The argument ``adapter`` was given, or its default."""
        return self.adapter_arguments.get(adapter.value, ADAPTER_DEFAULTS.get(adapter, ""))

    @property
    def template_names(self) -> tuple[str, ...]:
        """Every template variable of the endpoints, filled or not."""
        names: set[str] = set()
        for url in self.url_templates.values():
            names |= placeholders(url)
        return tuple(sorted(names))

    @property
    def unfilled_templates(self) -> tuple[str, ...]:
        """Template variables the endpoints still wait for (from an integration's metadata)."""
        names: set[str] = set()
        for name in URL_FIELDS:
            names |= placeholders(getattr(self, name))
        return tuple(sorted(names))

    def template_problem(self, metadata: Mapping[str, object] | None) -> tuple[str, str] | None:
        """What keeps ``metadata`` from filling this profile's templates, as (field, problem)
        for an INVALID_ARGUMENT, or None when every template can be filled."""
        return self._fill(metadata)[1]

    def resolved(self, metadata: Mapping[str, object] | None = None) -> ProviderProfile:
        """This profile with its endpoints' templates filled for one integration: values from
        configuration first, then the integration's ``metadata``, then the catalog's defaults.

        Raises ProviderMisconfigured naming a value that is missing or not a DNS label. A
        profile without templates is returned as it is.
        """
        if not self.url_templates:
            return self
        values, problem = self._fill(metadata)
        if problem is not None:
            field_name, text = problem
            raise ProviderMisconfigured(
                f"provider {self.name!r} cannot be called for this integration: "
                f"{field_name} {text}",
                provider=self.name,
            )
        changes: dict[str, Any] = {
            name: render(url, values) for name, url in self.url_templates.items()
        }
        if all(getattr(self, name) == url for name, url in changes.items()):
            return self
        return dataclasses.replace(self, **changes)

    def _fill(
        self, metadata: Mapping[str, object] | None
    ) -> tuple[dict[str, str], tuple[str, str] | None]:
        values = dict(self.template_defaults)
        for name in self.template_names:
            given = (metadata or {}).get(name)
            if given is None or name in self.template_values:
                continue
            if not isinstance(given, str) or not TEMPLATE_VALUE.fullmatch(given):
                return values, (
                    f"metadata.{name}",
                    f"{TEMPLATE_VALUE_RULE} ({self.name} puts it in its endpoints)",
                )
            values[name] = given
        values.update(self.template_values)
        for name in self.template_names:
            if name not in values:
                return values, (
                    f"metadata.{name}",
                    f"is required: provider {self.name!r} puts it in its endpoints (or set "
                    f"providers.{self.name}.template_values.{name})",
                )
        return values, None
