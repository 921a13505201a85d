"""AES-256-GCM with associated data that binds each ciphertext to its place."""

from broker.crypto.aead import Keyring, associated_data, key_id_of
from broker.crypto.keys import generate_key, load_keyring, parse_keyring

__all__ = [
    "Keyring",
    "associated_data",
    "generate_key",
    "key_id_of",
    "load_keyring",
    "parse_keyring",
]
