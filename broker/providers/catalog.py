"""Built-in provider profiles and the registry that merges them with configuration.

The built-ins are data: ``catalog.toml`` in this package, one table per provider, read and
validated on first use (at start-up, by ``build_registry``) with a strict model: an unknown key,
an unsafe URL or an unknown adapter is a ConfigError naming the entry.

A built-in is only a template: it becomes available once configuration gives it a client
(``[providers.google] client_id = ... client_secret_env = ...``), because the broker cannot
refresh a token without one. Any other ``[providers.NAME]`` section is an RFC 6749 provider
described by configuration alone.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker import egress
from broker.config import ProviderSettings
from broker.errors import ConfigError, UnknownProvider
from broker.providers.profile import (
    KINDS,
    TEMPLATE_VALUE,
    TEMPLATE_VALUE_RULE,
    URL_FIELDS,
    ProviderProfile,
    Quirk,
    parse_adapters,
    placeholders,
    render,
)

CATALOG_FILE = "catalog.toml"


class CatalogEntry(BaseModel):
    """One provider of ``catalog.toml``, as the file may say it (unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(min_length=1)
    # Where the values come from: the provider's own documentation.
    docs: str
    aliases: list[str] = Field(default_factory=list)
    token_url: str
    authorization_url: str | None = None
    revocation_url: str | None = None
    api_base_url: str | None = None
    api_hosts: list[str] = Field(default_factory=list)
    api_url: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post", "none"]
    pkce: bool = True
    scopes: list[str] = Field(default_factory=list)
    scope_separator: str = " "
    extra_authorize_params: dict[str, str] = Field(default_factory=dict)
    extra_headers: dict[str, str] = Field(default_factory=dict)
    rotates_refresh_tokens: bool = False
    default_expires_in_seconds: int | None = Field(default=None, ge=0)
    refresh_token_idle_lifetime_seconds: int | None = Field(default=None, ge=2)
    refresh_token_lifetime_seconds: int | None = Field(default=None, ge=1)
    account_id_path: str | None = None
    kinds: list[str] = Field(default_factory=lambda: ["authorization_code"])
    adapters: list[str] = Field(default_factory=list)
    template_defaults: dict[str, str] = Field(default_factory=dict)
    notes: str | None = None

    @field_validator("docs")
    @classmethod
    def _docs(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError("must be the https:// address of the provider's documentation")
        return value

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(KINDS))
        if unknown or not value:
            raise ValueError(f"give one or more of {', '.join(KINDS)}")
        return value

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, value: list[str]) -> list[str]:
        parse_adapters(value)
        return value

    @field_validator("template_defaults")
    @classmethod
    def _defaults(cls, value: dict[str, str]) -> dict[str, str]:
        for name, default in value.items():
            if not TEMPLATE_VALUE.fullmatch(default):
                raise ValueError(f"{name}: {TEMPLATE_VALUE_RULE}")
        return value


def read_catalog(text: str) -> dict[str, ProviderProfile]:
    """The profiles of a catalog file's ``text``; ConfigError names the first bad entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"provider catalog: not valid TOML ({exc})") from None
    profiles: dict[str, ProviderProfile] = {}
    for name, raw in data.items():
        where = f"provider catalog: {name}"
        if not _NAME.fullmatch(name) or not isinstance(raw, dict):
            raise ConfigError(f"{where}: a provider is a table named like a provider")
        try:
            entry = CatalogEntry.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise ConfigError(f"{where}.{field}: {first['msg']}") from None
        profiles[name] = _entry_profile(name, entry, where)
    return profiles


def _entry_profile(name: str, entry: CatalogEntry, where: str) -> ProviderProfile:
    adapters, arguments = parse_adapters(entry.adapters)
    profile = ProviderProfile(
        name=name,
        title=entry.title,
        docs=entry.docs,
        token_url=entry.token_url,
        authorization_url=entry.authorization_url,
        revocation_url=entry.revocation_url,
        api_base_url=entry.api_base_url,
        api_hosts=tuple(entry.api_hosts),
        api_url=entry.api_url,
        auth_method=entry.auth_method,
        pkce=entry.pkce,
        scopes=tuple(entry.scopes),
        scope_separator=entry.scope_separator,
        extra_authorize_params=dict(entry.extra_authorize_params),
        extra_headers=dict(entry.extra_headers),
        rotates_refresh_tokens=entry.rotates_refresh_tokens,
        default_expires_in_seconds=entry.default_expires_in_seconds,
        refresh_token_idle_lifetime_seconds=entry.refresh_token_idle_lifetime_seconds,
        refresh_token_lifetime_seconds=entry.refresh_token_lifetime_seconds,
        account_id_path=entry.account_id_path,
        kinds=frozenset(entry.kinds),
        quirks=adapters,
        adapter_arguments=arguments,
        template_defaults=dict(entry.template_defaults),
    )
    profile = _with_adapter_effects(profile, None, None)
    profile = _with_templates(profile, where, {}, {})
    unused = sorted(set(entry.template_defaults) - set(profile.template_names))
    if unused:
        raise ConfigError(f"{where}.template_defaults.{unused[0]}: no endpoint uses it")
    _check_urls(where, profile)
    return profile


@cache
def _catalog() -> tuple[dict[str, ProviderProfile], dict[str, str]]:
    text = resources.files(__package__).joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    profiles = read_catalog(text)
    data = tomllib.loads(text)
    aliases: dict[str, str] = {}
    for name, raw in data.items():
        for alias in raw.get("aliases", []):
            if alias in profiles or alias in aliases or not _NAME.fullmatch(alias):
                raise ConfigError(f"provider catalog: {name}.aliases: {alias!r} is taken")
            aliases[alias] = name
    return profiles, aliases


class _Lazy(Mapping[str, Any]):
    """A mapping read from the catalog file on first use (never at import)."""

    def __init__(self, part: int) -> None:
        self._part = part

    def _data(self) -> Mapping[str, Any]:
        return _catalog()[self._part]

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())

    def __contains__(self, key: object) -> bool:
        return key in self._data()


# The built-in profiles, by name.
BUILTINS: Mapping[str, ProviderProfile] = _Lazy(0)
# Other names callers use for a built-in; the registry answers with the canonical profile, so
# integrations are stored under one name.
ALIASES: Mapping[str, str] = _Lazy(1)


def load_catalog() -> Mapping[str, ProviderProfile]:
    """The built-ins, read and validated now (start-up); raises ConfigError."""
    return _catalog()[0]


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
    "body_encoding",
    "pkce",
    "account_id_path",
    "api_url",
    "api_base_url",
    "refresh_token_idle_lifetime_seconds",
    "refresh_token_lifetime_seconds",
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

    def resolve(self, name: str, metadata: Mapping[str, object] | None) -> ProviderProfile:
        """The profile for one integration: its endpoint templates filled from configuration,
        the integration's ``metadata`` and the catalog's defaults (ProviderMisconfigured
        names a missing or bad value)."""
        return self.get(name).resolved(metadata)

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
    """Merge the catalog with ``Settings.providers``; raise ConfigError naming a bad setting
    (or a bad catalog entry: the catalog is read and validated here, at start-up)."""
    load_catalog()
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
    profile = merge_settings(key, settings, env)
    missing = profile.missing_settings()
    if missing:
        hint = "" if canonical in BUILTINS else " (it is not a built-in provider)"
        raise ConfigError(f"providers.{key}.{missing[0]}: required{hint}")
    return profile


def merge_settings(key: str, settings: ProviderSettings, env: Mapping[str, str]) -> ProviderProfile:
    """The profile ``[providers.KEY]`` describes (the built-in it names, overridden key by
    key), whether or not it is complete (``missing_settings()``); ConfigError names a bad
    value."""
    canonical = ALIASES.get(key, key)
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
    if settings.adapters is not None:
        try:
            changes["quirks"], changes["adapter_arguments"] = parse_adapters(settings.adapters)
        except ValueError as exc:
            raise ConfigError(f"{where}.adapters: {exc}") from None
    changes["client_secret"] = _client_secret(where, settings, env)
    profile = dataclasses.replace(base, **changes)
    if settings.adapters is not None:
        profile = _with_adapter_effects(profile, settings.body_encoding, base)
    overrides = {name: getattr(settings, name) for name in URL_FIELDS}
    profile = _with_templates(
        profile,
        where,
        {name: url for name, url in overrides.items() if url is not None},
        settings.template_values or {},
    )
    _check_urls(where, profile)
    return profile


def _with_adapter_effects(
    profile: ProviderProfile, body_encoding: str | None, base: ProviderProfile | None
) -> ProviderProfile:
    """The request adapters' settings: a JSON body, comma-joined scopes (a body_encoding set
    in configuration wins)."""
    changes: dict[str, Any] = {}
    if profile.has(Quirk.JSON_TOKEN_REQUEST) and body_encoding is None:
        changes["body_encoding"] = "json"
    elif base is not None and base.has(Quirk.JSON_TOKEN_REQUEST) and body_encoding is None:
        changes["body_encoding"] = "form"
    if profile.has(Quirk.COMMA_SCOPES):
        changes["scope_separator"] = ","
    elif base is not None and base.has(Quirk.COMMA_SCOPES):
        changes["scope_separator"] = " "
    return dataclasses.replace(profile, **changes) if changes else profile


def _with_templates(
    profile: ProviderProfile,
    where: str,
    overrides: Mapping[str, str],
    values: Mapping[str, str],
) -> ProviderProfile:
    """``profile`` with its endpoint templates recorded (``overrides``: URLs configuration
    set, which replace the catalog's) and filled with ``values`` and the defaults."""
    templates = dict(profile.url_templates)
    for name in URL_FIELDS:
        if name in overrides:
            if placeholders(overrides[name]):
                templates[name] = overrides[name]
            else:
                templates.pop(name, None)
        elif name not in templates:
            url = getattr(profile, name)
            if placeholders(url):
                templates[name] = url
    used: set[str] = set()
    for url in templates.values():
        used |= placeholders(url)
    for name, value in values.items():
        if name not in used:
            raise ConfigError(
                f"{where}.template_values.{name}: no endpoint of this provider uses {{{name}}}"
            )
        if not TEMPLATE_VALUE.fullmatch(value):
            raise ConfigError(f"{where}.template_values.{name}: {TEMPLATE_VALUE_RULE}")
    filled = {**profile.template_defaults, **values}
    rendered: dict[str, Any] = {name: render(url, filled) for name, url in templates.items()}
    return dataclasses.replace(
        profile, url_templates=templates, template_values=dict(values), **rendered
    )


def _check_urls(where: str, profile: ProviderProfile) -> None:
    for name in ("token_url", "authorization_url", "revocation_url", "api_url", "api_base_url"):
        _check_url(f"{where}.{name}", getattr(profile, name))
    for host in profile.api_hosts:
        _check_url(f"{where}.api_hosts", host)
    for uri in profile.redirect_uris:
        _check_url(f"{where}.redirect_uris", uri)
    for allowed in profile.allowed_token_urls:
        _check_url(f"{where}.allowed_token_urls", allowed)


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
    # A template still unfilled is checked as it will be once filled with a DNS label.
    problem = egress.problem(_SAMPLE_FILL.sub("x", url))
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    authority = url.partition("://")[2].split("/", 1)[0]
    if placeholders(authority) and not _TEMPLATED_HOST.fullmatch(authority):
        # A value (from an integration's metadata) may pick a subdomain of the provider's
        # own domain, never a whole host or a port.
        raise ConfigError(
            f"{where}: a template in the host must be whole leading labels before the "
            "provider's own domain (https://{subdomain}.example.com/...)"
        )


_SAMPLE_FILL = re.compile(r"\{[a-z][a-z0-9_]*\}")
# "{a}.{b}.example.com[:port]": placeholders as whole labels, then two or more fixed labels.
_TEMPLATED_HOST = re.compile(
    r"(\{[a-z][a-z0-9_]*\}\.)+([a-z0-9-]+\.)+[a-z0-9-]+(:[0-9]{1,5})?", re.IGNORECASE
)
