"""Who is calling: bearer tokens (stored as SHA-256) or client-certificate identities (mTLS),
mapped to named callers with their methods and providers."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Container, Iterable, Mapping

from broker.config import TLS_IDENTITY_KINDS, CallerSettings, split_tls_identity
from broker.domain.context import Caller
from broker.errors import ConfigError


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class CallerRegistry:
    def __init__(
        self,
        callers: Mapping[str, CallerSettings],
        aliases: Mapping[str, str] | None = None,
        known: Container[str] | None = None,
    ) -> None:
        """``aliases`` map provider aliases to the stored name ("x" → "twitter"); with
        ``known``, a policy naming a provider nobody configured is refused (a typo would
        otherwise deny silently)."""
        self._by_hash: list[tuple[bytes, Caller]] = []
        self._by_identity: dict[tuple[str, str], Caller] = {}
        self.names: set[str] = set()
        aliases = aliases or {}
        for name, settings in callers.items():
            providers = None
            if settings.providers is not None:
                for provider in settings.providers:
                    if known is not None and provider not in known:
                        raise ConfigError(
                            f"callers.{name}.providers: unknown provider {provider!r}"
                        )
                providers = frozenset(aliases.get(p, p) for p in settings.providers)
            caller = Caller(
                name=name,
                methods=frozenset(settings.methods),
                providers=providers,
                users=None if settings.users is None else frozenset(settings.users),
                requires_grant=settings.requires_grant,
                max_grant_ttl=settings.max_grant_ttl,
                manage_all_grants=settings.manage_all_grants,
                proxy_only=settings.proxy_only,
                proxy_methods=(
                    None if settings.proxy_methods is None else frozenset(settings.proxy_methods)
                ),
            )
            self.names.add(name)
            if settings.token_sha256:
                self._by_hash.append((bytes.fromhex(settings.token_sha256), caller))
            if settings.tls_identity:
                self._by_identity[split_tls_identity(settings.tls_identity)] = caller

    def __len__(self) -> int:
        return len(self._by_hash) + len(self._by_identity)

    def authenticate(self, token: str) -> Caller | None:
        """Compare against every caller in constant time, so timing says nothing about hashes."""
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found: Caller | None = None
        for expected, caller in self._by_hash:
            if hmac.compare_digest(digest, expected):
                found = caller
        return found

    def by_certificate(self, auth: Mapping[str, Iterable[bytes]]) -> Caller | None:
        """The caller whose configured tls_identity is one of the certificate's SANs of the
        configured type (``auth``: the call's gRPC auth context). Only SANs: a name in the
        subject CN, or of another SAN type, is no identity (a CA that issues a CN or an email
        address to anyone must not thereby issue a caller's DNS identity)."""
        if not self._by_identity:
            return None
        for kind, prop in TLS_IDENTITY_KINDS.items():
            for raw in auth.get(prop, ()):
                name = raw.decode(errors="replace")
                caller = self._by_identity.get((kind, name.lower() if kind == "dns" else name))
                if caller is not None:
                    return caller
        return None
