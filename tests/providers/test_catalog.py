"""The built-in catalog as data (broker/providers/catalog.toml): every entry validates, the six
providers the code used to hold keep their values, and a bad entry, template value or adapter
is refused with a message naming it."""

from __future__ import annotations

from importlib import resources
from typing import Any

import pytest

from broker import egress
from broker.config import ProviderSettings
from broker.errors import ConfigError, ProviderMisconfigured
from broker.providers import ALIASES, BUILTINS, ProviderRegistry, Quirk, build_registry
from broker.providers.catalog import CATALOG_FILE, CatalogEntry, load_catalog, read_catalog
from broker.providers.profile import KINDS, URL_FIELDS, render

ENV = {"SECRET": "s3cret"}


def registry(**providers: dict[str, Any]) -> ProviderRegistry:
    settings = {name: ProviderSettings.model_validate(data) for name, data in providers.items()}
    return build_registry(settings, ENV)


def catalog_text() -> str:
    return resources.files("broker.providers").joinpath(CATALOG_FILE).read_text()


def test_every_catalog_entry_validates() -> None:
    import tomllib

    raw = tomllib.loads(catalog_text())
    profiles = load_catalog()
    assert len(profiles) >= 40
    assert set(raw) == set(profiles)
    for name, data in raw.items():
        entry = CatalogEntry.model_validate(data)  # strict: unknown keys refused
        profile = profiles[name]
        assert profile.title == entry.title
        assert profile.docs is not None, name
        assert profile.docs.startswith("https://"), name
        assert profile.token_url, name
        assert profile.authorization_url, name
        assert set(profile.kinds) <= set(KINDS)
        # Templates: a client comes only from configuration.
        assert profile.client_id is None
        assert profile.client_secret is None
        assert not profile.is_configured
        for field in (*URL_FIELDS, "api_url"):
            url = getattr(profile, field)
            if url is not None:
                sample = render(url, dict.fromkeys(profile.template_names, "acme"))
                assert egress.problem(sample) is None, (name, field, url)
                assert sample.startswith("https://"), (name, field)
        for host in profile.api_hosts:
            assert egress.problem(host) is None
        # Every entry is usable once a client is configured.
        section: dict[str, Any] = {"client_id": "cid", "client_secret_env": "SECRET"}
        if profile.unfilled_templates:
            section["template_values"] = dict.fromkeys(profile.unfilled_templates, "acme")
        configured = registry(**{name: section}).get(name)
        assert configured.is_configured
        assert not configured.unfilled_templates
    for alias, target in ALIASES.items():
        assert target in profiles
        assert alias not in profiles


# The values the six providers had when they were written in code: the catalog keeps them.
SIX: dict[str, dict[str, Any]] = {
    "twitter": {
        "api_base_url": "https://api.x.com",
        "token_url": "https://api.x.com/2/oauth2/token",
        "authorization_url": "https://x.com/i/oauth2/authorize",
        "revocation_url": "https://api.x.com/2/oauth2/revoke",
        "auth_method": "client_secret_basic",
        "rotates_refresh_tokens": True,
        "pkce": True,
        "scopes": ("tweet.read", "users.read", "offline.access"),
        "body_encoding": "form",
        "scope_separator": " ",
        "extra_authorize_params": {},
        "extra_headers": {},
        "default_expires_in_seconds": None,
        "account_id_path": None,
        "kinds": frozenset({"authorization_code"}),
        "api_url": None,
    },
    "google": {
        "api_base_url": "https://www.googleapis.com",
        "token_url": "https://oauth2.googleapis.com/token",
        "authorization_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "revocation_url": "https://oauth2.googleapis.com/revoke",
        "auth_method": "client_secret_post",
        "rotates_refresh_tokens": False,
        "pkce": True,
        "extra_authorize_params": {"access_type": "offline", "prompt": "consent"},
        "scopes": ("openid", "email"),
        "kinds": frozenset({"authorization_code", "service_account"}),
        "body_encoding": "form",
        "default_expires_in_seconds": None,
    },
    "slack": {
        "api_base_url": "https://slack.com/api",
        "token_url": "https://slack.com/api/oauth.v2.access",
        "authorization_url": "https://slack.com/oauth/v2/authorize",
        "revocation_url": "https://slack.com/api/auth.revoke",
        "auth_method": "client_secret_post",
        "rotates_refresh_tokens": True,
        "default_expires_in_seconds": 0,
        "pkce": False,
        "account_id_path": "team.id",
        "scope_separator": ",",
        "quirks": frozenset({Quirk.SLACK_ENVELOPE}),
        "scopes": (),
    },
    "notion": {
        "api_base_url": "https://api.notion.com",
        "token_url": "https://api.notion.com/v1/oauth/token",
        "authorization_url": "https://api.notion.com/v1/oauth/authorize",
        "revocation_url": "https://api.notion.com/v1/oauth/revoke",
        "auth_method": "client_secret_basic",
        "body_encoding": "json",
        "default_expires_in_seconds": 0,
        "pkce": False,
        "extra_authorize_params": {"owner": "user"},
        "extra_headers": {"Notion-Version": "2022-06-28"},
        "account_id_path": "workspace_id",
        "kinds": frozenset({"authorization_code", "api_key"}),
    },
    "github": {
        "api_base_url": "https://api.github.com",
        "token_url": "https://github.com/login/oauth/access_token",
        "authorization_url": "https://github.com/login/oauth/authorize",
        "revocation_url": "https://api.github.com/applications/{client_id}/grant",
        "auth_method": "client_secret_post",
        "rotates_refresh_tokens": True,
        "default_expires_in_seconds": 0,
        "pkce": True,
        "extra_headers": {"Accept": "application/json"},
        "scopes": ("read:user",),
        "quirks": frozenset({Quirk.GITHUB_REVOCATION}),
        "kinds": frozenset({"authorization_code", "github_app_installation"}),
        "api_url": "https://api.github.com",
    },
    "microsoft": {
        "api_base_url": "https://graph.microsoft.com",
        "token_url": "https://login.microsoftonline.com/common/oauth2/v2.0/token",
        "authorization_url": "https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
        "revocation_url": None,
        "auth_method": "client_secret_post",
        "rotates_refresh_tokens": True,
        "pkce": True,
        "scopes": ("offline_access", "User.Read"),
        "quirks": frozenset({Quirk.SCOPE_ON_REFRESH}),
    },
}


@pytest.mark.parametrize("name", sorted(SIX))
def test_the_six_providers_keep_their_values(name: str) -> None:
    profile = BUILTINS[name]
    for field, expected in SIX[name].items():
        assert getattr(profile, field) == expected, field
    # A new alias would move a custom provider of that name onto a built-in.
    assert dict(ALIASES) == {"x": "twitter", "gmail": "google"}


def test_documented_refresh_token_lifetimes() -> None:
    day = 24 * 3600
    idle = {name: p.refresh_token_idle_lifetime_seconds for name, p in BUILTINS.items()}
    assert idle["microsoft"] == idle["atlassian"] == 90 * day
    assert idle["xero"] == 60 * day
    assert idle["intuit"] == 100 * day
    assert idle["google"] == 180 * day
    assert BUILTINS["linkedin"].refresh_token_lifetime_seconds == 365 * day
    assert BUILTINS["linkedin"].refresh_token_idle_lifetime_seconds is None


def test_configuration_overrides_the_lifetimes() -> None:
    google = registry(
        google={
            "client_id": "g",
            "client_secret_env": "SECRET",
            "refresh_token_idle_lifetime_seconds": 60,
            "refresh_token_lifetime_seconds": 600,
        }
    ).get("google")
    assert google.refresh_token_idle_lifetime_seconds == 60
    assert google.refresh_token_lifetime_seconds == 600


ENTRY = """
[acme]
title = "Acme"
docs = "https://docs.acme.test/oauth"
token_url = "https://auth.acme.test/token"
auth_method = "client_secret_post"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('colour = "blue"', r"^provider catalog: acme\.colour: Extra inputs"),
        ('revocation_url = "http://evil.test/revoke"', r"acme\.revocation_url: must be an https"),
        ('adapters = ["teleport"]', r"acme\.adapters: .*unknown adapter 'teleport'"),
        ('adapters = ["comma_scopes:x"]', r"adapter 'comma_scopes' takes no argument"),
        ('kinds = ["magic"]', r"acme\.kinds: .*give one or more of"),
        ('template_defaults = { tenant = "x" }', r"template_defaults\.tenant: no endpoint"),
        ('template_defaults = { tenant = "a.b" }', r"template_defaults: .*one lowercase DNS"),
        ('api_base_url = "https://{tenant}@evil.test/"', r"api_base_url: must not contain user"),
        ('api_base_url = "https://{host}/api"', r"api_base_url: a template in the host must"),
        ('revocation_url = "https://{host}.test/r"', r"revocation_url: a template in the host"),
        ('revocation_url = "https://auth.acme.test:{port}/r"', r"acme\.revocation_url: "),
        ('revocation_url = "https://x{sub}.acme.test/r"', r"a template in the host must"),
        ('revocation_url = "https://acme.{tld}/r"', r"a template in the host must"),
    ],
)
def test_a_bad_catalog_entry_is_refused(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_catalog(ENTRY + extra + "\n")


def test_an_entry_without_docs_is_refused() -> None:
    text = ENTRY.replace('docs = "https://docs.acme.test/oauth"\n', "")
    with pytest.raises(ConfigError, match=r"acme\.docs: Field required"):
        read_catalog(text)


# -- templates -----------------------------------------------------------------------------


def zendesk(**section: Any) -> ProviderRegistry:
    return registry(zendesk={"client_id": "z", "client_secret_env": "SECRET", **section})


def test_a_template_is_filled_from_the_integrations_metadata() -> None:
    providers = zendesk()
    profile = providers.get("zendesk")
    assert profile.unfilled_templates == ("subdomain",)
    acme = providers.resolve("zendesk", {"subdomain": "acme"})
    assert acme.token_url == "https://acme.zendesk.com/oauth/tokens"
    assert acme.authorization_url == "https://acme.zendesk.com/oauth/authorizations/new"
    assert acme.api_base_url == "https://acme.zendesk.com/api/v2"


@pytest.mark.parametrize(
    "value",
    ["evil.test", "a/b", "acme.zendesk.com@evil", "ACME", "-x", "x" * 64, "a%2fb", "", 7],
)
def test_a_template_value_from_metadata_is_one_dns_label(value: object) -> None:
    profile = zendesk().get("zendesk")
    assert profile.template_problem({"subdomain": value}) is not None
    with pytest.raises(ProviderMisconfigured, match=r"metadata\.subdomain"):
        profile.resolved({"subdomain": value})


def test_a_missing_template_value_names_it() -> None:
    profile = zendesk().get("zendesk")
    field, problem = profile.template_problem({}) or ("", "")
    assert field == "metadata.subdomain"
    assert "providers.zendesk.template_values.subdomain" in problem
    with pytest.raises(ProviderMisconfigured, match=r"metadata\.subdomain is required"):
        profile.resolved({})


def test_configuration_pins_a_template_value() -> None:
    providers = zendesk(template_values={"subdomain": "pinned"})
    profile = providers.get("zendesk")
    assert profile.token_url == "https://pinned.zendesk.com/oauth/tokens"
    assert not profile.unfilled_templates
    # An integration's metadata cannot move a pinned value.
    assert providers.resolve("zendesk", {"subdomain": "other"}) is profile


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"subdomain": "evil.test"}, r"template_values\.subdomain: must be one lowercase DNS"),
        ({"tenant": "x"}, r"template_values\.tenant: no endpoint of this provider uses"),
    ],
)
def test_bad_template_values_in_configuration(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^providers\.zendesk\.{message}"):
        zendesk(template_values=values)


def test_microsoft_tenant_defaults_to_common() -> None:
    providers = registry(microsoft={"client_id": "m", "client_secret_env": "SECRET"})
    common = providers.get("microsoft")
    assert common.token_url == "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    assert providers.resolve("microsoft", {}) is common
    tenant = providers.resolve("microsoft", {"tenant": "0b5e6f4a-1d2c-4e3b-9a8f-7c6d5e4f3a2b"})
    assert tenant.token_url == (
        "https://login.microsoftonline.com/0b5e6f4a-1d2c-4e3b-9a8f-7c6d5e4f3a2b/oauth2/v2.0/token"
    )
    single = registry(
        microsoft={
            "client_id": "m",
            "client_secret_env": "SECRET",
            "template_values": {"tenant": "contoso"},
        }
    ).get("microsoft")
    assert single.authorization_url == (
        "https://login.microsoftonline.com/contoso/oauth2/v2.0/authorize"
    )


def test_a_custom_provider_can_template_its_endpoints() -> None:
    acme = registry(
        acme={
            "token_url": "https://{region}.auth.acme.test/token",
            "client_id": "a",
            "client_secret_env": "SECRET",
        }
    ).get("acme")
    assert acme.unfilled_templates == ("region",)
    assert acme.resolved({"region": "eu"}).token_url == "https://eu.auth.acme.test/token"


@pytest.mark.parametrize(
    "url", ["https://{host}/token", "https://{host}.internal/token", "https://a.test:{port}/t"]
)
def test_a_custom_template_cannot_choose_the_host(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^providers\.acme\.token_url: "):
        registry(acme={"token_url": url, "client_id": "a", "client_secret_env": "SECRET"})


def test_a_configured_url_replaces_the_catalogs_template() -> None:
    zd = zendesk(token_url="https://proxy.example.test/zendesk/token").get("zendesk")
    assert zd.token_url == "https://proxy.example.test/zendesk/token"
    # The other endpoints keep theirs.
    assert zd.unfilled_templates == ("subdomain",)
    assert "token_url" not in zd.url_templates


# -- adapters in configuration ---------------------------------------------------------------


def test_a_custom_provider_names_its_adapters() -> None:
    acme = registry(
        acme={
            "token_url": "https://auth.acme.test/token",
            "client_id": "a",
            "client_secret_env": "SECRET",
            "adapters": [
                "nested_tokens:data.tokens",
                "comma_scopes",
                "json_token_request",
                "refresh_expiry_field:refresh_expires_in",
                "instance_url_metadata",
                "string_expires_in",
                "no_refresh_token_on_refresh",
            ],
        }
    ).get("acme")
    assert acme.has(Quirk.NESTED_TOKENS)
    assert acme.argument(Quirk.NESTED_TOKENS) == "data.tokens"
    assert acme.argument(Quirk.REFRESH_EXPIRY_FIELD) == "refresh_expires_in"
    assert acme.body_encoding == "json"
    assert acme.scope_separator == ","


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        (["teleport"], r"unknown adapter 'teleport' \(known: .*nested_tokens"),
        (["nested_tokens:a/b"], r"adapter 'nested_tokens': the argument must be"),
        (["json_token_request:x"], r"adapter 'json_token_request' takes no argument"),
    ],
)
def test_an_unknown_adapter_is_a_configuration_error(adapters: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^providers\.acme\.adapters: {message}"):
        registry(
            acme={
                "token_url": "https://auth.acme.test/token",
                "client_id": "a",
                "client_secret_env": "SECRET",
                "adapters": adapters,
            }
        )


def test_adapters_in_configuration_replace_a_builtins() -> None:
    notion = registry(notion={"client_id": "n", "client_secret_env": "SECRET", "adapters": []})
    profile = notion.get("notion")
    assert profile.quirks == frozenset()
    assert profile.body_encoding == "form"
    kept = registry(notion={"client_id": "n", "client_secret_env": "SECRET"}).get("notion")
    assert kept.body_encoding == "json"
