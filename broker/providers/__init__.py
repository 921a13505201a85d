"""OAuth 2.0 providers: the built-in catalog, the registry, and the client that calls them."""

from broker.providers.authorize import authorization_url, code_challenge, new_code_verifier
from broker.providers.catalog import ALIASES, BUILTINS, ProviderRegistry, build_registry
from broker.providers.client import (
    OAuthClient,
    RevocationNotSupported,
    TokenResponse,
    parse_retry_after,
)
from broker.providers.profile import AuthMethod, BodyEncoding, ProviderProfile, Quirk

__all__ = [
    "ALIASES",
    "BUILTINS",
    "AuthMethod",
    "BodyEncoding",
    "OAuthClient",
    "ProviderProfile",
    "ProviderRegistry",
    "Quirk",
    "RevocationNotSupported",
    "TokenResponse",
    "authorization_url",
    "build_registry",
    "code_challenge",
    "new_code_verifier",
    "parse_retry_after",
]
