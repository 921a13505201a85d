"""Where keys come from: ``BROKER_KEYS``, a command, a key file, or (dev mode) a generated file.

A keyring is written as ``kid:base64key`` entries, comma- or newline-separated, first one
primary. Keys never go to the database or to logs; only their ids do.

The seam is ``KeySource``: something that hands over keyring text, named for error messages.
A secrets manager plugs in without code through ``keys.command`` (its CLI prints the keyring,
nothing touches the disk). A cloud KMS with envelope encryption fits the same seam: its source
returns data keys it unwrapped at start-up, and the stored format already names the key id.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import shlex
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from broker import childenv, filemodes
from broker.config import KeysSettings
from broker.crypto.aead import Keyring
from broker.errors import ConfigError

_KID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NO_KEY = (
    "no encryption key configured: set BROKER_KEYS, keys.command or keys.file "
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


class KeySource(Protocol):
    """Hands over keyring text; ``name`` is the setting to blame in error messages."""

    @property
    def name(self) -> str: ...

    def read(self) -> str: ...


@dataclass(frozen=True)
class EnvKeys:
    value: str = field(repr=False)

    @property
    def name(self) -> str:
        return "BROKER_KEYS"

    def read(self) -> str:
        return self.value


@dataclass(frozen=True)
class FileKeys:
    path: Path

    @property
    def name(self) -> str:
        return f"keys.file ({self.path})"

    def read(self) -> str:
        try:
            with self.path.open() as handle:
                mode = os.fstat(handle.fileno()).st_mode
                # Checked on the open file, not the path, so a swap between check and read
                # cannot slip a world-readable file past us.
                if mode & 0o077:
                    raise ConfigError(
                        f"keys.file: {self.path} has mode {stat.S_IMODE(mode):04o}, so users "
                        f"other than its owner can read it; run `chmod 600 {self.path}` "
                        "(and consider replacing keys that were exposed)"
                    )
                return handle.read()
        except OSError as exc:
            raise ConfigError(f"keys.file: cannot read {self.path}: {exc.strerror}") from None


@dataclass(frozen=True)
class CommandKeys:
    command: str
    timeout: float = 10.0
    # Names (or PREFIX* patterns) of variables passed to the command (keys.command_env).
    env: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"keys.command ({self._program})"

    @property
    def _program(self) -> str:
        args = shlex.split(self.command)
        return args[0] if args else ""

    def read(self) -> str:
        try:
            args = shlex.split(self.command)
        except ValueError as exc:
            raise ConfigError(f"keys.command: cannot be split into arguments: {exc}") from None
        if not args:
            raise ConfigError("keys.command: is empty")
        program = args[0]
        try:
            # No shell: the setting is one program and its arguments (use `sh -c '…'` for a
            # pipeline). A minimal environment: the broker's holds the database URL, client
            # secrets and webhook secrets; a secrets manager's own credentials are passed on
            # by name (keys.command_env).
            done = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                env=childenv.minimal(self.env),
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise ConfigError(f"keys.command: cannot run {program!r}: not found") from None
        except PermissionError:
            raise ConfigError(f"keys.command: cannot run {program!r}: permission denied") from None
        except subprocess.TimeoutExpired:
            raise ConfigError(
                f"keys.command: {program!r} did not finish within {self.timeout:g}s "
                "(keys.command_timeout_seconds)"
            ) from None
        if done.returncode != 0:
            # Only the last line of stderr: the tool's error, never its standard output.
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            said = f": {lines[-1][:200]}" if lines else ""
            raise ConfigError(
                f"keys.command: {program!r} exited with status {done.returncode}{said}"
            )
        try:
            return done.stdout.decode()
        except UnicodeDecodeError:
            raise ConfigError(f"keys.command: {program!r} printed something not UTF-8") from None


def key_source(settings: KeysSettings) -> KeySource:
    """The configured source; precedence BROKER_KEYS, then the command, then the file."""
    if settings.keys is not None:
        return EnvKeys(settings.keys.get_secret_value())
    if settings.command is not None:
        return CommandKeys(
            settings.command, settings.command_timeout_seconds, tuple(settings.command_env)
        )
    if settings.file is not None:
        return FileKeys(settings.file)
    raise ConfigError(_NO_KEY)


def load_keyring(settings: KeysSettings) -> Keyring:
    source = key_source(settings)
    return parse_keyring(source.read(), source.name)


def ensure_dev_keyfile(path: Path) -> Path:
    """Dev mode only: make a key file (0600) on first start, keep it afterwards."""
    if not path.exists():
        filemodes.private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(generate_key("dev") + "\n")
    return path
