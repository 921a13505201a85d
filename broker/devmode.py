"""``broker serve --dev``: zero set-up on a laptop. SQLite under ./.broker/, a generated key and
a generated caller token, all kept in files so a restart finds the same data."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from broker.config import CallerSettings, KeysSettings, Settings
from broker.crypto.keys import ensure_dev_keyfile
from broker.errors import ConfigError
from broker.server.callers import hash_token

DEV_CALLER = "dev"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def _dev_token(path: Path) -> str:
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
        path.unlink()  # an empty token file must never become an empty credential
    path.parent.mkdir(parents=True, exist_ok=True)
    token = "dev-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def prepare(settings: Settings, home: Path = Path(".broker")) -> tuple[Settings, str | None]:
    """Fill in what a dev broker lacks; returns the settings and the dev caller's token."""
    host = settings.server.listen.rpartition(":")[0]
    if host not in LOOPBACK:
        raise ConfigError(f"server.listen: dev mode only listens on loopback, not {host}")
    update: dict[str, object] = {}
    if settings.keys.keys is None and settings.keys.file is None:
        update["keys"] = KeysSettings(file=ensure_dev_keyfile(home / "keys"))
    token = None
    if not settings.callers:
        token = _dev_token(home / "dev-caller-token")
        update["callers"] = {DEV_CALLER: CallerSettings(token_sha256=hash_token(token))}
    return settings.model_copy(update=update), token


def banner(listen: str, port: int, token: str | None) -> str:
    host = listen.rpartition(":")[0]
    target = f"{host}:{port}"
    auth = f"authorization: Bearer {token}" if token else "authorization: Bearer $TOKEN"
    # One line of JSON: a backslash-newline inside quotes would reach grpcurl literally.
    store = (
        '{"user_id": "u1", "provider": "twitter", "access_token": "at-example", '
        '"expires_in_seconds": 3600}'
    )
    return f"""
Credential Broker (dev mode) listening on {target}
  database: SQLite under ./.broker/   key: ./.broker/keys   caller token: ./.broker/dev-caller-token

Try it:
  grpcurl -plaintext -H '{auth}' {target} list
  grpcurl -plaintext -H '{auth}' \\
      -d '{store}' \\
      {target} credentialbroker.v1.CredentialBroker/StoreIntegration
  grpcurl -plaintext -H '{auth}' -d '{{"user_id": "u1", "provider": "twitter"}}' \\
      {target} credentialbroker.v1.CredentialBroker/GetAccessToken
"""
