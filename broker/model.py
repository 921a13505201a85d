"""Domain records. ``Integration`` carries metadata only; ciphertexts stay in
``StoredIntegration``."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any


class Status(enum.StrEnum):
    CONNECTED = "CONNECTED"
    EXPIRED = "EXPIRED"
    NEEDS_REAUTHORIZATION = "NEEDS_REAUTHORIZATION"
    DISCONNECTED = "DISCONNECTED"


class Kind(enum.StrEnum):
    """What an integration holds; the column ``credential_type``."""

    AUTHORIZATION_CODE = "authorization_code"
    API_KEY = "api_key"
    BASIC = "basic"
    CLIENT_CREDENTIALS = "client_credentials"
    SERVICE_ACCOUNT = "service_account"
    GITHUB_APP_INSTALLATION = "github_app_installation"

    @property
    def minted(self) -> bool:
        """Kinds whose access token the broker mints from a long-lived secret."""
        return self in _MINTED

    @property
    def static(self) -> bool:
        """Kinds handed out as stored: they do not expire."""
        return self in (Kind.API_KEY, Kind.BASIC)


_MINTED = frozenset({Kind.CLIENT_CREDENTIALS, Kind.SERVICE_ACCOUNT, Kind.GITHUB_APP_INSTALLATION})


class Revocation(enum.StrEnum):
    REVOKED = "REVOKED"
    NOT_SUPPORTED = "NOT_SUPPORTED"
    FAILED = "FAILED"
    PENDING = "PENDING"
    SKIPPED = "SKIPPED"


@dataclass(frozen=True, slots=True)
class Integration:
    id: str
    user_id: str
    provider: str
    account_id: str
    status: Status
    token_type: str
    scopes: tuple[str, ...]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None
    last_refreshed_at: datetime | None
    disconnected_at: datetime | None
    disconnect_reason: str | None
    has_refresh_token: bool
    version: int
    credential_type: Kind = Kind.AUTHORIZATION_CODE
    # When the refresh token itself lapses, if the provider said so.
    refresh_token_expires_at: datetime | None = None
    # The last time an access token was served (GetAccessToken, Proxy), to the precision of
    # the batched write (broker.domain.usage).
    last_used_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredIntegration:
    """A row as read from storage: metadata plus ciphertexts (never plaintext)."""

    integration: Integration
    access_token_ct: bytes | None = field(repr=False)
    refresh_token_ct: bytes | None = field(repr=False)
    key_id: str | None
    refresh_failures: int = 0
    revocation: str | None = None
    revocation_attempts: int = 0
    # The long-lived secret of every kind but the authorization code (JSON, encrypted).
    credential_ct: bytes | None = field(default=None, repr=False)

    @property
    def renewable(self) -> bool:
        """Whether the refresh engine can get a new access token: by a refresh token, or by
        minting one from the stored credential."""
        if self.integration.credential_type.minted:
            return self.credential_ct is not None
        return self.refresh_token_ct is not None

    @property
    def wiped(self) -> bool:
        """No secret left to serve from (disconnected, or ciphertexts wiped)."""
        if self.integration.credential_type is Kind.AUTHORIZATION_CODE:
            return self.access_token_ct is None
        return self.credential_ct is None

    # Refresh bookkeeping the engine acts on (never shown to callers).
    last_refresh_error: str | None = None
    next_refresh_at: datetime | None = None
    issued_lifetime_seconds: int | None = None
    # When the refresh token was last issued or used (the keep-alive's idle clock), and the
    # refresh-token expiry an INTEGRATION_EXPIRING event was written for.
    refresh_token_used_at: datetime | None = None
    expiring_notice_for: datetime | None = None


@dataclass(frozen=True, slots=True)
class Selector:
    """integration_id, or (user_id, provider, account_id); account_id None = "the only one"."""

    integration_id: str = ""
    user_id: str = ""
    provider: str = ""
    account_id: str | None = None


@dataclass(frozen=True, slots=True)
class NewTokens:
    """Tokens to store (plaintext lives only in memory, on the way to encryption)."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    token_type: str
    expires_at: datetime | None
    scopes: tuple[str, ...]
    # When the refresh token lapses, if the provider (or the caller) said so.
    refresh_token_expires_at: datetime | None = None


@dataclass(frozen=True, slots=True, repr=False)
class Credential:
    """A credential of any kind but the authorization code, as given to StoreIntegration.
    ``fields`` holds secrets (keys, passwords, private keys): never in a repr."""

    kind: Kind
    fields: dict[str, Any]

    def __repr__(self) -> str:
        return f"Credential(kind={self.kind.value!r}, fields=<hidden>)"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class StoreCommand:
    user_id: str
    provider: str
    account_id: str
    tokens: NewTokens
    metadata: dict[str, Any]
    # Alternative to tokens.expires_at, resolved against the broker's clock.
    expires_in_seconds: int | None = None
    credential: Credential | None = None
    # Alternative to tokens.refresh_token_expires_at, resolved against the broker's clock.
    refresh_token_expires_in_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class AccessToken:
    access_token: str = field(repr=False)
    token_type: str = "Bearer"
    expires_at: datetime | None = None
    scopes: tuple[str, ...] = ()
    integration_id: str = ""
    refreshed: bool = False
    credential_type: Kind = Kind.AUTHORIZATION_CODE
    # Ready to apply to the provider request (secrets inside: never logged).
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    query: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class TokenRequest:
    selector: Selector
    min_valid_for: timedelta = timedelta(0)
    force_refresh: bool = False
    required_scopes: tuple[str, ...] = ()
    # Seconds the caller will still wait (its gRPC deadline); None: no deadline.
    deadline_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Page:
    integrations: list[Integration]
    next_page_token: str


# What every domain object is given to tell the time (tests pass a clock they move).
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose ciphertexts these are: bound into each one, so a row re-parented in the database
    (another user, provider, account or kind) no longer decrypts."""

    row_id: str
    user_id: str
    provider: str
    account_id: str
    kind: str

    @classmethod
    def of(cls, integration: Integration, kind: Kind | None = None) -> Owner:
        """The integration's owner; ``kind``: the kind about to be written, if it changes."""
        return cls(
            integration.id,
            integration.user_id,
            integration.provider,
            integration.account_id,
            (kind or integration.credential_type).value,
        )
