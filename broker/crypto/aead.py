"""The stored ciphertext format and the keyring that reads and writes it.

Format::

    version (1 byte) | len(key_id) (1 byte) | key_id (ascii) | nonce (12 bytes) | ciphertext + tag

The version says what the ciphertext is bound to (its AES-GCM associated data):

- 2, owner-bound (every write): environment, row, column, and the row's owner — user_id,
  provider, account_id and credential kind (``Binding.owner_bound``). A row re-parented in
  the database (another user, provider, account or kind) no longer decrypts.
- 1, row-bound (written before owner binding): environment, row and column only
  (``associated_data``). Still read, so an upgrade needs no downtime; ``broker keys reencrypt``
  rewrites such ciphertexts as version 2, and ``keys.require_owner_binding`` refuses them.

The header (version and key id) is authenticated too: it is prefixed to the associated data,
so nobody can relabel a ciphertext with another key id or pass one binding off as the other.
Like ``MultiFernet``, the first key encrypts and every key decrypts; every failure is the one
``CiphertextInvalid``.

Nonce budget: nonces are random, so NIST SP 800-38D caps one key at 2^32 encryptions. The
keyring counts its encryptions per key id in memory (one dict increment); the count is drained
into the ``key_usage`` table by ``broker.domain.key_usage``, which warns well before the cap.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import CiphertextInvalid

# Row-bound (environment, row, column); read, never written any more.
ROW_BOUND = 1
# Owner-bound (also user_id, provider, account_id, credential kind): what every write uses.
OWNER_BOUND = 2
_VERSIONS = (ROW_BOUND, OWNER_BOUND)
NONCE_BYTES = 12
_TAG_BYTES = 16
# Random 96-bit nonces: NIST SP 800-38D allows at most 2^32 encryptions under one key.
NONCE_LIMIT = 2**32


def associated_data(environment: str, row_id: str, column: str) -> bytes:
    """Bind a ciphertext to its environment, row and column: moved anywhere else it fails."""
    return b"\x00".join(
        (b"credentialbroker/v1", environment.encode(), row_id.encode(), column.encode())
    )


@dataclass(frozen=True, slots=True)
class Binding:
    """Where a ciphertext lives and whose it is; its associated data, in either version."""

    environment: str
    row_id: str
    column: str
    user_id: str
    provider: str
    account_id: str
    kind: str

    def row_bound(self) -> bytes:
        return associated_data(self.environment, self.row_id, self.column)

    def owner_bound(self) -> bytes:
        # Length-prefixed: an owner's fields are caller-chosen text, so no separator byte
        # could keep ("ab", "c") apart from ("a", "bc").
        fields = (
            self.environment,
            self.row_id,
            self.column,
            self.user_id,
            self.provider,
            self.account_id,
            self.kind,
        )
        parts = [b"credentialbroker/v2"]
        for text in fields:
            raw = text.encode()
            parts.append(struct.pack(">I", len(raw)) + raw)
        return b"".join(parts)


def _header(version: int, key_id: str) -> bytes:
    raw = key_id.encode("ascii")
    return bytes((version, len(raw))) + raw


def version_of(blob: bytes) -> int:
    """The format version of a ciphertext (raises CiphertextInvalid if unknown)."""
    if not blob or blob[0] not in _VERSIONS:
        raise CiphertextInvalid("ciphertext has an unknown format")
    return blob[0]


def key_id_of(blob: bytes) -> str:
    """The key id named in a ciphertext's header (raises CiphertextInvalid if malformed)."""
    if len(blob) < 2 or blob[0] not in _VERSIONS or len(blob) < 2 + blob[1]:
        raise CiphertextInvalid("ciphertext has an unknown format")
    try:
        return blob[2 : 2 + blob[1]].decode("ascii")
    except UnicodeDecodeError:
        raise CiphertextInvalid("ciphertext has an unknown format") from None


class Keyring:
    """Named AES-256 keys; the first one encrypts, all of them decrypt."""

    __slots__ = ("_ciphers", "_counts", "_headers", "ids", "primary_id")

    # ``seal``/``open`` are what the broker uses: owner-bound, from a ``Binding``.
    # ``encrypt``/``decrypt`` take raw associated data and write the row-bound version 1; they
    # remain for the format's own tests and for writing the old format in upgrade tests.

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        # Cipher objects are built once per key: the hot path only decrypts.
        self._ciphers = {kid: AESGCM(key) for kid, key in keys}
        self._headers = {
            (version, kid): _header(version, kid) for kid, _ in keys for version in _VERSIONS
        }
        self.ids: tuple[str, ...] = tuple(kid for kid, _ in keys)
        self.primary_id = self.ids[0]
        # Encryptions since the last drain; only the primary key ever encrypts.
        self._counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Keyring(ids={self.ids!r})"

    def seal(self, plaintext: bytes, binding: Binding) -> bytes:
        """Encrypt under the primary key, owner-bound."""
        return self._encrypt(OWNER_BOUND, plaintext, binding.owner_bound())

    def open(self, blob: bytes, binding: Binding, *, row_bound: bool = True) -> bytes:
        """Decrypt with the associated data the blob's version names. ``row_bound=False``
        refuses a version-1 ciphertext (it does not prove its owner)."""
        if version_of(blob) == OWNER_BOUND:
            return self.decrypt(blob, binding.owner_bound())
        if not row_bound:
            raise CiphertextInvalid(
                "ciphertext is not bound to its owner (written before owner binding) and "
                "keys.require_owner_binding is set; run `broker keys reencrypt`"
            )
        return self.decrypt(blob, binding.row_bound())

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Encrypt as version 1 with ``aad`` as given (see ``seal`` for the broker's writes)."""
        return self._encrypt(ROW_BOUND, plaintext, aad)

    def _encrypt(self, version: int, plaintext: bytes, aad: bytes) -> bytes:
        header = self._headers[(version, self.primary_id)]
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
                "its row given to another owner, or written by another environment)"
            ) from None

    def needs_rotation(self, blob: bytes) -> bool:
        """Under another key than the primary (``version_of`` tells the binding)."""
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
