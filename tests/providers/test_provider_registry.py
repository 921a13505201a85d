"""build_registry: the catalog merged with [providers.*] settings and the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import ProviderSettings, load_settings
from broker.errors import ConfigError, UnknownProvider
from broker.providers import BUILTINS, ProviderRegistry, build_registry

ENV = {"GOOGLE_SECRET": "g-secret", "ACME_SECRET": "a-secret"}


def registry(env: dict[str, str] | None = None, **providers: dict[str, Any]) -> ProviderRegistry:
    settings = {name: ProviderSettings.model_validate(data) for name, data in providers.items()}
    return build_registry(settings, ENV if env is None else env)


def test_builtins_without_a_client_are_unavailable() -> None:
    empty = registry()
    assert empty.names() == []
    assert "google" not in empty
    with pytest.raises(UnknownProvider) as caught:
        empty.get("google")
    assert caught.value.reason == "UNKNOWN_PROVIDER"
    assert "'google' is not configured" in str(caught.value)


def test_builtin_with_a_client() -> None:
    providers = registry(google={"client_id": "gid", "client_secret_env": "GOOGLE_SECRET"})
    google = providers.get("google")
    assert providers.names() == ["google"]
    assert google.client_id == "gid"
    assert google.client_secret == "g-secret"
    assert google.token_url == BUILTINS["google"].token_url
    assert google.extra_authorize_params == {"access_type": "offline", "prompt": "consent"}
    assert google.is_configured
    assert "g-secret" not in repr(google)


def test_builtin_overridden_key_by_key() -> None:
    google = registry(
        google={
            "client_id": "gid",
            "client_secret": "inline",
            "token_url": "https://proxy.example.com/token",
            "scopes": ["email"],
            "refresh_margin_seconds": 60,
            "extra_authorize_params": {"prompt": "", "hd": "example.com"},
            "redirect_uris": ["https://app.example.com/cb"],
        }
    ).get("google")
    assert google.token_url == "https://proxy.example.com/token"
    assert google.authorization_url == BUILTINS["google"].authorization_url
    assert google.auth_method == "client_secret_post"
    assert google.client_secret == "inline"
    assert google.scopes == ("email",)
    assert google.refresh_margin_seconds == 60
    # An empty value drops a built-in default instead of sending prompt=.
    assert google.extra_authorize_params == {"access_type": "offline", "hd": "example.com"}
    assert google.redirect_uris == ("https://app.example.com/cb",)


def test_client_secret_env_wins_over_client_secret() -> None:
    google = registry(
        google={"client_id": "g", "client_secret": "inline", "client_secret_env": "GOOGLE_SECRET"}
    ).get("google")
    assert google.client_secret == "g-secret"


def test_alias_configures_and_finds_the_canonical_provider() -> None:
    providers = registry(x={"client_id": "xid", "client_secret_env": "ACME_SECRET"})
    assert providers.names() == ["twitter"]
    assert "x" in providers
    assert providers.canonical("x") == "twitter"
    assert providers.get("x") is providers.get("twitter")
    assert providers.get("x").name == "twitter"


def test_alias_and_canonical_both_configured() -> None:
    with pytest.raises(ConfigError, match=r"providers\.x: configures the same provider"):
        registry(
            twitter={"client_id": "a", "client_secret": "s"},
            x={"client_id": "b", "client_secret": "s"},
        )


def test_custom_provider_from_configuration() -> None:
    acme = registry(
        acme={
            "token_url": "https://auth.acme.test/oauth/token",
            "authorization_url": "https://auth.acme.test/oauth/authorize",
            "client_id": "acme-id",
            "client_secret_env": "ACME_SECRET",
        }
    ).get("acme")
    assert acme.name == "acme"
    assert acme.client_secret == "a-secret"
    assert acme.auth_method == "client_secret_basic"
    assert acme.body_encoding == "form"
    assert acme.revocation_url is None
    assert acme.pkce
    assert acme.quirks == frozenset()


def test_custom_public_client_needs_no_secret() -> None:
    acme = registry(
        acme={"token_url": "https://a.test/t", "client_id": "cid", "auth_method": "none"}
    ).get("acme")
    assert acme.client_secret is None
    assert acme.is_configured


@pytest.mark.parametrize(
    ("data", "setting"),
    [
        ({"client_id": "cid", "client_secret": "s"}, "providers.acme.token_url"),
        ({"token_url": "https://a.test/t", "client_secret": "s"}, "providers.acme.client_id"),
        ({"token_url": "https://a.test/t", "client_id": "c"}, "providers.acme.client_secret_env"),
    ],
)
def test_custom_provider_missing_settings(data: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{setting}: required \(it is not a built-in"):
        registry(acme=data)


def test_builtin_section_without_client_id_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^providers\.google\.client_id: required$"):
        registry(google={"client_secret_env": "GOOGLE_SECRET"})


def test_missing_client_secret_env_names_the_setting() -> None:
    with pytest.raises(ConfigError) as caught:
        registry(env={}, google={"client_id": "g", "client_secret_env": "GOOGLE_SECRET"})
    message = str(caught.value)
    assert message.startswith("providers.google.client_secret_env:")
    assert "GOOGLE_SECRET" in message


def test_empty_client_secret_env_counts_as_missing() -> None:
    with pytest.raises(ConfigError, match=r"providers\.google\.client_secret_env"):
        registry(
            env={"GOOGLE_SECRET": ""},
            google={"client_id": "g", "client_secret_env": "GOOGLE_SECRET"},
        )


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("token_url", "http://auth.acme.test/token"),
        ("token_url", "auth.acme.test/token"),
        ("revocation_url", "ftp://auth.acme.test/revoke"),
        ("authorization_url", "https://"),
    ],
)
def test_urls_must_be_https(key: str, url: str) -> None:
    data = {"token_url": "https://a.test/t", "client_id": "c", "client_secret": "s", key: url}
    with pytest.raises(ConfigError, match=rf"providers\.acme\.{key}: must be an https://"):
        registry(acme=data)


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost", "[::1]:9000"])
def test_plain_http_is_allowed_on_loopback(host: str) -> None:
    url = f"http://{host}/token"
    acme = registry(acme={"token_url": url, "client_id": "c", "client_secret": "s"}).get("acme")
    assert acme.token_url == url


def test_redirect_uris_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"providers\.acme\.redirect_uris"):
        registry(
            acme={
                "token_url": "https://a.test/t",
                "client_id": "c",
                "client_secret": "s",
                "redirect_uris": ["http://app.example.com/cb"],
            }
        )


@pytest.mark.parametrize("name", ["Acme", "ac me", "-acme", "a" * 64])
def test_custom_provider_names(name: str) -> None:
    data = {"token_url": "https://a.test/t", "client_id": "c", "client_secret": "s"}
    with pytest.raises(ConfigError, match="provider name"):
        build_registry({name: ProviderSettings.model_validate(data)}, {})


def test_unknown_provider() -> None:
    providers = registry(google={"client_id": "g", "client_secret": "s"})
    assert "nope" not in providers
    with pytest.raises(UnknownProvider):
        providers.get("nope")
    with pytest.raises(UnknownProvider):
        providers.canonical("x")  # twitter is not configured, so neither is its alias


def test_misconfigured_flag() -> None:
    providers = registry(x={"client_id": "c", "client_secret": "s"})
    assert not providers.is_misconfigured("twitter")
    providers.mark_misconfigured("x", "invalid_client")
    assert providers.is_misconfigured("twitter")
    assert providers.misconfigured_reason("twitter") == "invalid_client"
    providers.clear_misconfigured("twitter")
    assert not providers.is_misconfigured("x")
    with pytest.raises(UnknownProvider):
        providers.mark_misconfigured("nope")


def test_iteration_and_len() -> None:
    providers = registry(
        slack={"client_id": "s", "client_secret": "s"},
        github={"client_id": "g", "client_secret": "s"},
    )
    assert len(providers) == 2
    assert [profile.name for profile in providers] == ["github", "slack"]


def test_from_a_toml_file(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        """
[providers.acme]
token_url = "https://auth.acme.test/oauth/token"
authorization_url = "https://auth.acme.test/oauth/authorize"
revocation_url = "https://auth.acme.test/oauth/revoke"
client_id = "acme-client"
client_secret_env = "ACME_CLIENT_SECRET"
auth_method = "client_secret_post"
redirect_uris = ["https://app.example.com/oauth/callback"]

[providers.notion]
client_id = "notion-client"
client_secret_env = "NOTION_SECRET"
"""
    )
    env = {"ACME_CLIENT_SECRET": "acme-secret", "NOTION_SECRET": "notion-secret"}
    settings = load_settings(env=env, config_path=config)

    providers = build_registry(settings.providers, env)

    assert providers.names() == ["acme", "notion"]
    assert providers.get("acme").auth_method == "client_secret_post"
    assert providers.get("acme").client_secret == "acme-secret"
    assert providers.get("notion").body_encoding == "json"
    assert providers.get("notion").client_secret == "notion-secret"


def test_kinds_without_the_authorization_code_need_no_client() -> None:
    providers = registry(
        openai={"kinds": ["api_key"]},
        github={"kinds": ["github_app_installation"]},
        google={"kinds": ["service_account"]},
    )
    assert providers.get("openai").kinds == frozenset({"api_key"})
    github = providers.get("github")
    assert github.api_url == "https://api.github.com"
    assert github.client_id is None
    assert providers.get("google").token_url == BUILTINS["google"].token_url
    # Built-ins with a client take the authorization code and their app-level kind.
    full = registry(google={"client_id": "gid", "client_secret_env": "GOOGLE_SECRET"})
    assert full.get("google").kinds == frozenset({"authorization_code", "service_account"})
    assert BUILTINS["github"].kinds == frozenset({"authorization_code", "github_app_installation"})
    assert BUILTINS["twitter"].kinds == frozenset({"authorization_code"})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kinds": ["api_key", "password"]}, "providers.acme.kinds"),
        ({"kinds": []}, "providers.acme.kinds"),
        ({"kinds": ["github_app_installation"]}, "providers.acme.api_url: required"),
        (
            {"kinds": ["github_app_installation"], "api_url": "http://api.example.com"},
            "providers.acme.api_url: must be an https:// URL",
        ),
        ({"kinds": ["authorization_code", "api_key"]}, "providers.acme.token_url: required"),
    ],
)
def test_bad_kinds_settings(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        registry(acme=settings)
    assert message in str(caught.value)


def test_a_moved_token_endpoint_with_the_builtins_other_endpoints_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A [providers.box] written for an in-house service before box joined the catalog
    inherits Box's revocation and API endpoints: revocation would send the client secret and
    the tokens to Box. Start-up says so, naming what to set."""
    secret = {"client_id": "cid", "client_secret_env": "ACME_SECRET"}
    with caplog.at_level("WARNING", logger="broker.providers"):
        registry(box={**secret, "token_url": "https://auth.corp.test/oauth/token"})
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "providers.box: token_url is on auth.corp.test" in warning
    assert "revocation_url, api_base_url" in warning
    assert "a-secret" not in warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="broker.providers"):
        # Set where everything goes, or kept on the built-in's own host: nothing to say.
        registry(
            box={
                **secret,
                "token_url": "https://auth.corp.test/oauth/token",
                "authorization_url": "https://auth.corp.test/authorize",
                "revocation_url": "https://auth.corp.test/revoke",
                "api_base_url": "https://api.corp.test",
            },
            google={**secret, "token_url": "https://oauth2.googleapis.com/token"},
        )
    assert caplog.records == []
