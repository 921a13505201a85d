"""``broker providers list|show``: every catalog entry, what the configuration still has to
give, and no secret in the output. The real command runs as a process (``python -m broker``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from broker.providers import BUILTINS
from tests.helpers.processes import write_toml

SECRET = "provider-secret-value"


def providers_command(
    tmp_path: Path, providers: dict[str, Any], *argv: str
) -> subprocess.CompletedProcess[str]:
    cfg = write_toml(
        tmp_path / "broker.toml",
        {
            "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"},
            "providers": providers,
        },
    )
    env = {**os.environ, "GOOGLE_SECRET": SECRET}
    env.pop("BROKER_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "broker", "--config", str(cfg), "providers", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=tmp_path,
    )


CONFIGURED = {
    "google": {"client_id": "google-client", "client_secret_env": "GOOGLE_SECRET"},
    # A client id but no secret: the configuration still has to give it.
    "slack": {"client_id": "slack-client", "client_secret_env": "SLACK_SECRET_NOT_SET"},
    "zendesk": {"client_id": "zd", "client_secret": SECRET},
    "acme": {
        "token_url": "https://auth.acme.test/token",
        "client_id": "acme",
        "client_secret": SECRET,
        "adapters": ["nested_tokens:data", "comma_scopes"],
    },
}


def test_list_json_lists_every_entry(tmp_path: Path) -> None:
    done = providers_command(tmp_path, CONFIGURED, "list", "--json")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    entries = {entry["name"]: entry for entry in json.loads(done.stdout)}
    assert set(entries) == set(BUILTINS) | {"acme"}
    assert len(entries) >= 41

    google = entries["google"]
    assert google["status"] == "configured"
    assert google["configured"] is True
    assert google["needs"] == []
    assert google["client_id"] == "google-client"
    assert google["client_secret"] == "set"
    assert google["aliases"] == ["gmail"]
    assert google["docs"].startswith("https://developers.google.com/")
    assert google["refresh_token_idle_lifetime_seconds"] == 180 * 24 * 3600

    slack = entries["slack"]
    assert slack["status"] == "error"
    assert not slack["configured"]
    assert "SLACK_SECRET_NOT_SET is not set" in slack["problem"]

    box = entries["box"]
    assert box["status"] == "not configured"
    assert box["needs"] == ["client_id", "client_secret_env"]

    zendesk = entries["zendesk"]
    assert zendesk["status"] == "configured"
    assert zendesk["token_url"] == "https://{subdomain}.zendesk.com/oauth/tokens"
    assert zendesk["templates"] == [
        "subdomain (template_values.subdomain or each integration's metadata.subdomain)"
    ]

    acme = entries["acme"]
    assert acme["builtin"] is False
    assert acme["status"] == "configured"
    assert acme["adapters"] == ["comma_scopes", "nested_tokens:data"]
    assert acme["scope_separator"] == ","


def test_list_table_and_show(tmp_path: Path) -> None:
    table = providers_command(tmp_path, CONFIGURED, "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ALIASES", "STATUS", "NEEDS", "TITLE"]
    assert len(lines) == len(BUILTINS) + 2
    google = next(line for line in lines if line.startswith("google "))
    assert "configured" in google
    assert "gmail" in google
    box = next(line for line in lines if line.startswith("box "))
    assert "not configured" in box
    assert "client_id,client_secret_env" in box

    shown = providers_command(tmp_path, CONFIGURED, "show", "x")
    assert shown.returncode == 0, shown.stderr
    assert "name:" in shown.stdout
    assert "twitter" in shown.stdout
    assert "https://api.x.com/2/oauth2/token" in shown.stdout

    as_json = providers_command(tmp_path, CONFIGURED, "show", "microsoft", "--json")
    microsoft = json.loads(as_json.stdout)
    assert microsoft["template_defaults"] == {"tenant": "common"}
    assert microsoft["adapters"] == ["scope_on_refresh"]


def test_show_unknown_provider_is_a_usage_error(tmp_path: Path) -> None:
    done = providers_command(tmp_path, {}, "show", "nosuch")
    assert done.returncode == 2
    assert "no provider named 'nosuch'" in done.stderr


def test_a_bad_section_is_shown_with_its_problem(tmp_path: Path) -> None:
    acme = {"token_url": "https://auth.acme.test/token", "client_id": "a", "client_secret": "s"}
    done = providers_command(
        tmp_path, {"acme": {**acme, "adapters": ["teleport"]}}, "list", "--json"
    )
    assert done.returncode == 0, done.stderr
    (entry,) = [e for e in json.loads(done.stdout) if e["name"] == "acme"]
    assert entry["status"] == "error"
    assert entry["problem"].startswith("providers.acme.adapters: unknown adapter 'teleport'")


def test_an_unknown_key_fails_the_configuration(tmp_path: Path) -> None:
    acme = {"token_url": "https://auth.acme.test/token", "client_id": "a", "colour": "blue"}
    done = providers_command(tmp_path, {"acme": acme}, "list")
    assert done.returncode == 2
    assert "providers.acme.colour" in done.stderr
