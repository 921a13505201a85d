"""A run-scoped grant: what one workflow run may read, for how long.

A trusted caller creates it for one user and some integrations (by provider, by id, or
both); a caller configured ``requires_grant`` presents its token in metadata
``x-broker-grant`` next to its own credentials. A grant narrows what its bearer may read and
never widens it: the bearer's own policy still applies, and no grant authorises a write.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

# Recognisable in a leaked log or a secret scanner, like GitHub's ghp_ prefix.
TOKEN_PREFIX = "cbg_"
METADATA_KEY = "x-broker-grant"
# The only methods a grant can ever authorise: reads of the grant's user's integrations, and
# calls to their provider's API through the broker (Proxy, a grant's main use).
READ_METHODS = frozenset({"GetAccessToken", "GetIntegration", "ListIntegrations", "Proxy"})
# What a proxy-only grant lacks: its bearer works through Proxy and never sees a token.
TOKEN_METHOD = "GetAccessToken"
PROXY_METHOD = "Proxy"


def new_token() -> str:
    """256 bits from the OS CSPRNG, URL-safe, shown to the issuer once."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """Only this is stored: a database reader cannot turn it back into a usable token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    user_id: str
    providers: frozenset[str]
    integration_ids: frozenset[str]
    # Caller names that may present it; empty: every caller configured requires_grant.
    audience: frozenset[str]
    # The read methods the issuer itself could call when it created the grant.
    methods: frozenset[str]
    run_id: str
    issuer: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None

    @property
    def proxy_only(self) -> bool:
        return TOKEN_METHOD not in self.methods and PROXY_METHOD in self.methods

    def allows(self, method: str) -> bool:
        """Grants made before Proxy existed list GetAccessToken, never Proxy: what reads the
        token may also have the broker use it."""
        return method in self.methods or (method == PROXY_METHOD and TOKEN_METHOD in self.methods)

    def covers(self, integration_id: str, user_id: str, provider: str) -> bool:
        """Providers cover integrations connected later too; ids cover exactly those rows."""
        return user_id == self.user_id and (
            provider in self.providers or integration_id in self.integration_ids
        )

    def admits(self, caller_name: str, requires_grant: bool) -> bool:
        """An audience admits the callers it names. Without one, a grant admits the callers
        configured ``requires_grant`` and its own issuer: presenting its own grant only
        narrows what the issuer may read (and is how a single dev caller tries grants)."""
        if self.audience:
            return caller_name in self.audience
        return requires_grant or caller_name == self.issuer

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at
