"""An integration's tokens: encrypted and decrypted bound to their place and owner
(``TokenCipher``), whether one may be served (``check_servable``), how long it has left.
The refresh engine, the service and the revoker share these; none of them owns the others."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from broker.crypto import Binding, Keyring
from broker.domain import credentials
from broker.errors import InsufficientScope, IntegrationDisconnected, ReauthorizationRequired
from broker.model import (
    AccessToken,
    Credential,
    NewTokens,
    Owner,
    Status,
    StoredIntegration,
)

# The columns a token's ciphertext is bound to.
ACCESS = "access_token"
REFRESH = "refresh_token"


class TokenCipher:
    """Encrypts and decrypts one integration's tokens, bound to environment, row, column and
    owner (``broker.crypto.aead``). ``require_owner_binding`` refuses ciphertexts written
    before owner binding, which prove only their row."""

    def __init__(
        self, keyring: Keyring, environment: str, *, require_owner_binding: bool = False
    ) -> None:
        self.keyring = keyring
        self.environment = environment
        self.require_owner_binding = require_owner_binding

    def binding(self, owner: Owner, column: str) -> Binding:
        return Binding(
            self.environment,
            owner.row_id,
            column,
            owner.user_id,
            owner.provider,
            owner.account_id,
            owner.kind,
        )

    def encrypt(self, owner: Owner, column: str, plaintext: str) -> bytes:
        return self.keyring.seal(plaintext.encode(), self.binding(owner, column))

    def decrypt(self, owner: Owner, column: str, blob: bytes) -> str:
        binding = self.binding(owner, column)
        return self.keyring.open(blob, binding, row_bound=not self.require_owner_binding).decode()

    def token_values(self, owner: Owner, tokens: NewTokens) -> dict[str, Any]:
        values: dict[str, Any] = {
            "access_token_ct": self.encrypt(owner, ACCESS, tokens.access_token),
            "key_id": self.keyring.primary_id,
            "token_type": tokens.token_type,
            "expires_at": tokens.expires_at,
            "scopes": list(tokens.scopes),
        }
        if tokens.refresh_token:
            values["refresh_token_ct"] = self.encrypt(owner, REFRESH, tokens.refresh_token)
        return values

    def credential_values(self, owner: Owner, credential: Credential) -> dict[str, Any]:
        blob = self.encrypt(owner, credentials.CREDENTIAL, credentials.dump(credential))
        return {"credential_ct": blob, "credential_type": credential.kind.value}

    def credential(self, stored: StoredIntegration) -> Credential:
        """The stored credential of a kind other than the authorization code, decrypted."""
        integration = stored.integration
        if stored.credential_ct is None:
            raise IntegrationDisconnected(
                f"integration {integration.id} was disconnected; the user must connect again",
                integration_id=integration.id,
            )
        plaintext = self.decrypt(
            Owner.of(integration), credentials.CREDENTIAL, stored.credential_ct
        )
        return credentials.load(integration.credential_type, plaintext)

    def access_token(self, stored: StoredIntegration, refreshed: bool = False) -> AccessToken:
        integration = stored.integration
        kind = integration.credential_type
        if kind.static:
            token, headers, query = credentials.static_material(self.credential(stored))
        elif stored.access_token_ct is None or stored.wiped:
            raise IntegrationDisconnected(
                f"integration {integration.id} was disconnected; the user must connect again",
                integration_id=integration.id,
            )
        else:
            token = self.decrypt(Owner.of(integration), ACCESS, stored.access_token_ct)
            headers, query = credentials.bearer_headers(integration.token_type, token), {}
        return AccessToken(
            access_token=token,
            token_type=integration.token_type,
            expires_at=integration.expires_at,
            scopes=integration.scopes,
            integration_id=integration.id,
            refreshed=refreshed,
            credential_type=kind,
            headers=headers,
            query=query,
        )


def check_servable(stored: StoredIntegration, required_scopes: tuple[str, ...] = ()) -> None:
    """Raise the error that says why this integration's token must not be served, if any."""
    integration = stored.integration
    if integration.status is Status.DISCONNECTED or stored.wiped:
        raise IntegrationDisconnected(
            f"integration {integration.id} was disconnected; the user must connect again",
            integration_id=integration.id,
        )
    if integration.status is Status.NEEDS_REAUTHORIZATION:
        raise ReauthorizationRequired(
            f"integration {integration.id} needs the user to authorize again",
            integration_id=integration.id,
        )
    missing = [s for s in required_scopes if s not in integration.scopes]
    if missing:
        raise InsufficientScope(
            f"integration {integration.id} was not granted scope(s) {missing}",
            integration_id=integration.id,
        )


def remaining(expires_at: datetime | None, now: datetime) -> timedelta | None:
    return None if expires_at is None else expires_at - now
