"""AES-256-GCM with associated data that binds each ciphertext to its place and owner."""

from broker.crypto.aead import (
    OWNER_BOUND,
    ROW_BOUND,
    Binding,
    Keyring,
    associated_data,
    key_id_of,
    version_of,
)
from broker.crypto.keys import generate_key, load_keyring, parse_keyring

__all__ = [
    "OWNER_BOUND",
    "ROW_BOUND",
    "Binding",
    "Keyring",
    "associated_data",
    "generate_key",
    "key_id_of",
    "load_keyring",
    "parse_keyring",
    "version_of",
]
