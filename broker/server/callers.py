"""Who is calling: bearer tokens (stored as SHA-256) mapped to named callers and their methods."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from broker.config import CallerSettings


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    methods: frozenset[str]
    providers: frozenset[str] | None  # None: every provider

    def may_call(self, method: str) -> bool:
        return method in self.methods

    def may_use(self, provider: str) -> bool:
        return self.providers is None or provider in self.providers


# Set by the auth interceptor for the duration of one RPC.
current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "current_caller", default=None
)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class CallerRegistry:
    def __init__(self, callers: Mapping[str, CallerSettings]) -> None:
        self._by_hash: list[tuple[bytes, Caller]] = []
        for name, settings in callers.items():
            caller = Caller(
                name=name,
                methods=frozenset(settings.methods),
                providers=None if settings.providers is None else frozenset(settings.providers),
            )
            if settings.token_sha256:
                self._by_hash.append((bytes.fromhex(settings.token_sha256), caller))

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, token: str) -> Caller | None:
        """Compare against every caller in constant time, so timing says nothing about hashes."""
        digest = hashlib.sha256(token.encode()).digest()
        found: Caller | None = None
        for expected, caller in self._by_hash:
            if hmac.compare_digest(digest, expected):
                found = caller
        return found
