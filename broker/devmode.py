"""``broker serve --dev``: zero set-up on a laptop. SQLite under ./.broker/, a generated key and
a generated caller token, all kept in files so a restart finds the same data.

The operator commands (``check``, ``keys status``, ``integrations``, ``audit``) run beside a dev
broker with nothing configured find the same files through ``attach``.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from pathlib import Path

from broker import filemodes
from broker.config import (
    CallerSettings,
    DatabaseSettings,
    KeysSettings,
    ProviderSettings,
    Settings,
    load_settings,
)
from broker.crypto.keys import ensure_dev_keyfile
from broker.errors import ConfigError
from broker.server.callers import hash_token

DEV_CALLER = "dev"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
HOME = Path(".broker")
TOKEN_FILE = "dev-caller-token"
KEY_FILE = "keys"
# The providers a dev addition (the demo provider) brought to the running `serve --dev`.
PROVIDERS_FILE = "dev-providers.json"


def _read_token(path: Path) -> str | None:
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    return None


def _dev_token(path: Path) -> str:
    if path.exists():
        if not filemodes.owned_by_us(path):
            # Whoever wrote it knows the token: it must not become a credential here.
            raise ConfigError(
                f"dev mode: {path} belongs to another user, so it is not used as the dev "
                "caller's token; delete it (a new token is made) or run as its owner"
            )
        filemodes.tighten(path, "dev caller token file")
    token = _read_token(path)
    if token:
        return token
    path.unlink(missing_ok=True)  # an empty token file must never become an empty credential
    filemodes.private_dir(path.parent)
    token = "dev-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def _keys_configured(settings: Settings) -> bool:
    keys = settings.keys
    return keys.keys is not None or keys.file is not None or keys.command is not None


def prepare(settings: Settings, home: Path = HOME) -> tuple[Settings, str | None]:
    """Fill in what a dev broker lacks; returns the settings and the dev caller's token.

    The dev caller is added next to any callers the configuration has (dev mode listens on
    loopback only); the token is None only when the configuration has its own caller named
    ``dev``, which then wins."""
    host = settings.server.listen.rpartition(":")[0]
    if host not in LOOPBACK:
        raise ConfigError(f"server.listen: dev mode only listens on loopback, not {host}")
    update: dict[str, object] = {}
    # The folder of the dev database, key and token: an earlier version made it 0755.
    filemodes.private_dir(home)
    filemodes.tighten(home, "dev mode folder")
    if not _keys_configured(settings):
        update["keys"] = KeysSettings(file=ensure_dev_keyfile(home / KEY_FILE))
    token = None
    if DEV_CALLER not in settings.callers:
        token = _dev_token(home / TOKEN_FILE)
        dev = CallerSettings(token_sha256=hash_token(token))
        update["callers"] = {**settings.callers, DEV_CALLER: dev}
    return settings.model_copy(update=update), token


def attach(settings: Settings, *, configured: bool, home: Path = HOME) -> Settings:
    """The dev broker's key and caller, for a command run beside its ``home`` with no other
    configuration (no file, the default SQLite database, no keys): the same settings as the
    running ``serve --dev`` has. Reads only; creates nothing."""
    default_url = DatabaseSettings().url.get_secret_value()
    if configured or settings.database.url.get_secret_value() != default_url:
        return settings
    update: dict[str, object] = {}
    if not _keys_configured(settings) and (home / KEY_FILE).is_file():
        update["keys"] = KeysSettings(file=home / KEY_FILE)
    token = _read_token(home / TOKEN_FILE)
    if token and DEV_CALLER not in settings.callers:
        update["callers"] = {
            **settings.callers,
            DEV_CALLER: CallerSettings(token_sha256=hash_token(token)),
        }
    added = _dev_providers(home / PROVIDERS_FILE)
    if added:
        update["providers"] = {**added, **settings.providers}
    return settings.model_copy(update=update) if update else settings


def record_dev_providers(base: Settings, settings: Settings, home: Path = HOME) -> None:
    """Keep the providers that ``settings`` has beyond ``base`` (what dev additions such as the
    demo provider brought) where ``attach`` finds them, so an operator command run beside this
    dev broker revokes and refreshes as its RPCs do; no additions: no file."""
    path = home / PROVIDERS_FILE
    added = {n: p for n, p in settings.providers.items() if n not in base.providers}
    if not added:
        path.unlink(missing_ok=True)
        return
    data = {}
    for name, provider in added.items():
        fields = provider.model_dump(mode="json", exclude_none=True)
        if provider.client_secret is not None:
            # A dev provider's own client secret (the demo's is fixed and public).
            fields["client_secret"] = provider.client_secret.get_secret_value()
        data[name] = fields
    filemodes.private_dir(home)
    partial = path.with_suffix(".tmp")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    partial.replace(path)


def _dev_providers(path: Path) -> dict[str, ProviderSettings]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {name: ProviderSettings.model_validate(fields) for name, fields in data.items()}
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a dev providers file ({type(exc).__name__})") from None


def operator_settings(config_path: str | Path | None) -> Settings:
    """Settings for an operator command: the configuration, or beside a dev broker its own."""
    settings = load_settings(config_path=config_path)
    return attach(settings, configured=bool(config_path or os.environ.get("BROKER_CONFIG")))


def banner(listen: str, port: int, token: str | None, home: Path = HOME) -> str:
    host = listen.rpartition(":")[0]
    target = f"{host}:{port}"
    token_file = shlex.quote(str((home / TOKEN_FILE).resolve()))
    if token is None:
        where = "caller 'dev' comes from your configuration: use its token"
        setup = "TOKEN=<the token of your caller 'dev'>"
    else:
        where = f"caller token: {home / TOKEN_FILE}"
        setup = f"TOKEN=$(cat {token_file})"
    # Double quotes, so the shell expands $TOKEN. One line of JSON: a backslash-newline inside
    # quotes would reach grpcurl literally.
    auth = '"authorization: Bearer $TOKEN"'
    store = (
        '{"user_id": "u1", "provider": "twitter", "access_token": "at-example", '
        '"expires_in_seconds": 3600}'
    )
    return f"""
Credential Broker (dev mode) listening on {target}
  database: SQLite under {home}/   key: {home / KEY_FILE}   {where}

Try it (in another terminal):
  {setup}
  grpcurl -plaintext -H {auth} {target} list
  grpcurl -plaintext -H {auth} \\
      -d '{store}' \\
      {target} credentialbroker.v1.CredentialBroker/StoreIntegration
  grpcurl -plaintext -H {auth} -d '{{"user_id": "u1", "provider": "twitter"}}' \\
      {target} credentialbroker.v1.CredentialBroker/GetAccessToken
"""
