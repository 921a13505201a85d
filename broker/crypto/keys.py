"""Where keys come from: ``BROKER_KEYS``, a key file, or (dev mode) a generated file.

A keyring is written as ``kid:base64key`` entries, comma- or newline-separated, first one
primary. Keys never go to the database or to logs; only their ids do.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import time
from pathlib import Path

from broker.config import KeysSettings
from broker.crypto.aead import Keyring
from broker.errors import ConfigError

_KID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NO_KEY = (
    "no encryption key configured: set BROKER_KEYS or keys.file "
    "(create one with `broker keygen > keys && chmod 600 keys`), or use `broker serve --dev`"
)


def generate_key(kid: str | None = None) -> str:
    """A new ``kid:base64key`` entry; the default id is time-ordered, e.g. k20261126-1a2b."""
    kid = kid or time.strftime("k%Y%m%d-", time.gmtime()) + secrets.token_hex(2)
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"


def parse_keyring(text: str, source: str) -> Keyring:
    entries = [e.strip() for e in re.split(r"[,\n]", text) if e.strip() and not e.startswith("#")]
    keys: list[tuple[str, bytes]] = []
    for number, entry in enumerate(entries, 1):
        kid, sep, encoded = entry.partition(":")
        if not sep or not _KID.fullmatch(kid):
            raise ConfigError(
                f"{source}: entry {number} must be KID:BASE64KEY (KID: letters, digits, . _ -)"
            )
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ConfigError(f"{source}: key {kid!r} is not valid base64") from None
        if len(key) != 32:
            raise ConfigError(f"{source}: key {kid!r} must be 32 bytes (AES-256), got {len(key)}")
        if kid in dict(keys):
            raise ConfigError(f"{source}: key id {kid!r} appears twice")
        keys.append((kid, key))
    if not keys:
        raise ConfigError(f"{source}: holds no key. {_NO_KEY}")
    return Keyring(keys)


def load_keyring(settings: KeysSettings) -> Keyring:
    if settings.keys is not None:
        return parse_keyring(settings.keys.get_secret_value(), "BROKER_KEYS")
    if settings.file is not None:
        try:
            text = settings.file.read_text()
        except OSError as exc:
            raise ConfigError(f"keys.file: cannot read {settings.file}: {exc.strerror}") from None
        return parse_keyring(text, f"keys.file ({settings.file})")
    raise ConfigError(_NO_KEY)


def ensure_dev_keyfile(path: Path) -> Path:
    """Dev mode only: make a key file (0600) on first start, keep it afterwards."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(generate_key("dev") + "\n")
    return path
