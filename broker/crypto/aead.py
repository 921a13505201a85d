"""The stored ciphertext format and the keyring that reads and writes it.

Format (version 1)::

    0x01 | len(key_id) (1 byte) | key_id (ascii) | nonce (12 bytes) | ciphertext + GCM tag

The header (version and key id) is authenticated too: it is prefixed to the associated data,
so nobody can relabel a ciphertext with another key id. Like ``MultiFernet``, the first key
encrypts and every key decrypts; every failure is the one ``CiphertextInvalid``.

Nonce budget: nonces are random, so NIST SP 800-38D caps one key at 2^32 encryptions. The
keyring counts its encryptions per key id in memory (one dict increment); the count is drained
into the ``key_usage`` table by ``broker.domain.key_usage``, which warns well before the cap.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import CiphertextInvalid

VERSION = 1
NONCE_BYTES = 12
_TAG_BYTES = 16
# Random 96-bit nonces: NIST SP 800-38D allows at most 2^32 encryptions under one key.
NONCE_LIMIT = 2**32


def associated_data(environment: str, row_id: str, column: str) -> bytes:
    """Bind a ciphertext to its environment, row and column: moved anywhere else it fails."""
    return b"\x00".join(
        (b"credentialbroker/v1", environment.encode(), row_id.encode(), column.encode())
    )


def _header(key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return bytes((VERSION, len(raw))) + raw


def key_id_of(blob: bytes) -> str:
    """The key id named in a ciphertext's header (raises CiphertextInvalid if malformed)."""
    if len(blob) < 2 or blob[0] != VERSION or len(blob) < 2 + blob[1]:
        raise CiphertextInvalid("ciphertext has an unknown format")
    try:
        return blob[2 : 2 + blob[1]].decode("ascii")
    except UnicodeDecodeError:
        raise CiphertextInvalid("ciphertext has an unknown format") from None


class Keyring:
    """Named AES-256 keys; the first one encrypts, all of them decrypt."""

    __slots__ = ("_ciphers", "_counts", "_headers", "ids", "primary_id")

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        # Cipher objects are built once per key: the hot path only decrypts.
        self._ciphers = {kid: AESGCM(key) for kid, key in keys}
        self._headers = {kid: _header(kid) for kid, _ in keys}
        self.ids: tuple[str, ...] = tuple(kid for kid, _ in keys)
        self.primary_id = self.ids[0]
        # Encryptions since the last drain; only the primary key ever encrypts.
        self._counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Keyring(ids={self.ids!r})"

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        header = self._headers[self.primary_id]
        nonce = os.urandom(NONCE_BYTES)
        self._counts[self.primary_id] = self._counts.get(self.primary_id, 0) + 1
        return (
            header + nonce + self._ciphers[self.primary_id].encrypt(nonce, plaintext, header + aad)
        )

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        kid = key_id_of(blob)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise CiphertextInvalid(
                f"ciphertext uses key id {kid!r}, which this broker does not have"
            )
        start = 2 + blob[1]
        if len(blob) < start + NONCE_BYTES + _TAG_BYTES:
            raise CiphertextInvalid("ciphertext is truncated")
        nonce = blob[start : start + NONCE_BYTES]
        try:
            return cipher.decrypt(nonce, blob[start + NONCE_BYTES :], blob[:start] + aad)
        except InvalidTag:
            raise CiphertextInvalid(
                "ciphertext failed authentication (tampered, moved to another row or column, "
                "or written by another environment)"
            ) from None

    def needs_rotation(self, blob: bytes) -> bool:
        return key_id_of(blob) != self.primary_id

    def usage(self) -> dict[str, int]:
        """Encryptions per key id since the last ``take_usage``."""
        return dict(self._counts)

    def take_usage(self) -> dict[str, int]:
        """Drain the counts (to add them to persistent storage)."""
        counts, self._counts = self._counts, {}
        return counts

    def restore_usage(self, counts: dict[str, int]) -> None:
        """Put drained counts back when storing them failed, so none are lost."""
        for kid, n in counts.items():
            self._counts[kid] = self._counts.get(kid, 0) + n
