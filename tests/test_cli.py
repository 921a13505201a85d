"""The operator CLI: keys status/reencrypt, integrations list/show/disconnect/purge, check.

Commands run through ``broker.cli.main`` in a worker thread (each runs its own event loop, as
from a shell); one test runs the real ``python -m broker`` for the exit code end to end.
"""

from __future__ import annotations

import asyncio
import io
import re
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from broker.cli import main
from broker.config import DatabaseSettings
from broker.crypto.keys import generate_key, parse_keyring
from broker.domain.integrations import IntegrationService
from broker.domain.tokens import TokenCipher
from broker.model import NewTokens, StoreCommand
from broker.server.app import Broker
from broker.server.callers import hash_token
from broker.storage.engine import create_engine
from broker.storage.tables import audit_events, integrations
from tests.helpers.cli import CliResult, broker, config
from tests.helpers.processes import write_toml
from tests.helpers.settings import ADMIN_TOKEN, ENVIRONMENT, KEYS

NEW = generate_key("test2")


async def seed(database_url: str, keys: str, users: dict[str, int]) -> dict[str, str]:
    """Integrations per user; returns id → access token."""
    engine = create_engine(DatabaseSettings(url=database_url))
    svc = IntegrationService(
        engine, TokenCipher(parse_keyring(keys, "t"), ENVIRONMENT), {"twitter", "google"}
    )
    tokens: dict[str, str] = {}
    try:
        for user, count in users.items():
            for n in range(count):
                access = f"at-{user}-{n}-secretvalue"
                integration, _ = await svc.store(
                    StoreCommand(
                        user_id=user,
                        provider="twitter" if n % 2 == 0 else "google",
                        account_id=f"acct-{n}",
                        tokens=NewTokens(access, f"rt-{user}-{n}-secretvalue", "Bearer", None, ()),
                        metadata={"n": n},
                        expires_in_seconds=3600,
                    )
                )
                tokens[integration.id] = access
    finally:
        await engine.dispose()
    return tokens


def assert_no_secrets(result: CliResult, *secrets: str) -> None:
    text = result.out + result.err
    assert "secretvalue" not in text
    for secret in secrets:
        assert secret.partition(":")[2] not in text


async def test_keys_status_and_reencrypt(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(database_url, KEYS, {"u1": 4, "u2": 3})
    old = config(tmp_path, database_url)
    status = await broker(capsys, old, "keys", "status")
    assert status.code == 0, status.err
    assert status.out.split("\n")[1].split()[:5] == ["test1", "primary", "7", "0", "14"]

    rotated = config(tmp_path, database_url, keys=f"{NEW},{KEYS}")
    before = await broker(capsys, rotated, "keys", "status")
    lines = before.out.splitlines()
    assert lines[1].split()[:5] == ["test2", "primary", "0", "0", "0"]
    assert lines[2].split()[:5] == ["test1", "decrypt-only", "7", "0", "14"]
    assert "broker keys reencrypt" in before.err

    done = await broker(capsys, rotated, "keys", "reencrypt", "--batch-size", "3")
    assert done.code == 0, done.err
    assert "re-encrypted 7 row(s), 14 ciphertext(s), to primary key 'test2'" in done.out
    assert "from 'test1': 14 ciphertext(s)" in done.out
    assert "re-encrypting" in done.err  # the progress goes to stderr
    assert_no_secrets(done, KEYS, NEW)

    after = await broker(capsys, rotated, "keys", "status")
    lines = after.out.splitlines()
    assert lines[1].split()[:5] == ["test2", "primary", "7", "0", "14"]
    assert lines[2].split()[:5] == ["test1", "decrypt-only", "0", "0", "0"]
    assert "14 (" in lines[1]  # the re-encryptions were counted against the nonce budget
    assert_no_secrets(after, KEYS, NEW)

    # The old key can go now; without it, status still works (and so does everything else).
    retired = config(tmp_path, database_url, keys=NEW)
    assert (await broker(capsys, retired, "keys", "status")).code == 0
    assert (await broker(capsys, retired, "integrations", "list", "--user", "u1")).code == 0


async def test_keys_reencrypt_resumes_and_status_names_a_missing_key(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(database_url, KEYS, {"u1": 5})
    rotated = config(tmp_path, database_url, keys=f"{NEW},{KEYS}")
    part = await broker(
        capsys, rotated, "keys", "reencrypt", "--batch-size", "2", "--max-batches", "1"
    )
    assert part.code == 1
    assert "3 row(s) still under other keys" in part.err
    assert "again to resume" in part.err

    # Retiring the old key too early: status names it; reencrypt refuses like the server.
    retired = config(tmp_path, database_url, keys=NEW)
    status = await broker(capsys, retired, "keys", "status")
    assert status.code == 1
    assert "MISSING" in status.out
    assert "'test1' (3 integrations, 0 flows)" in status.err
    refused = await broker(capsys, retired, "keys", "reencrypt")
    assert refused.code == 2
    assert "'test1' (3 rows)" in refused.err

    rest = await broker(capsys, rotated, "keys", "reencrypt")
    assert rest.code == 0, rest.err
    assert "re-encrypted 3 row(s)" in rest.out


async def test_integrations_list_show_disconnect(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = await seed(database_url, KEYS, {"alice": 3, "bob": 1})
    cfg = config(tmp_path, database_url)
    listed = await broker(capsys, cfg, "integrations", "list", "--user", "alice")
    assert listed.code == 0, listed.err
    assert listed.out.splitlines()[0].split() == [
        "ID",
        "PROVIDER",
        "ACCOUNT",
        "KIND",
        "STATUS",
        "EXPIRES",
        "REFRESH_TOKEN_EXPIRES",
        "LAST_USED",
        "UPDATED",
    ]
    assert len(listed.out.splitlines()) == 4
    google = await broker(
        capsys, cfg, "integrations", "list", "--user", "alice", "--provider", "google"
    )
    assert len(google.out.splitlines()) == 2
    assert_no_secrets(listed)

    iid = next(i for i in tokens if tokens[i].startswith("at-bob"))
    shown = await broker(capsys, cfg, "integrations", "show", iid)
    assert shown.code == 0
    assert re.search(rf"^id: +{iid}$", shown.out, re.MULTILINE)
    assert re.search(r"^key_id: +test1$", shown.out, re.MULTILINE)
    assert re.search(r"^has_refresh_token: +True$", shown.out, re.MULTILINE)
    assert re.search(r"^credential_type: +authorization_code$", shown.out, re.MULTILINE)
    assert_no_secrets(shown)

    gone = await broker(
        capsys, cfg, "integrations", "disconnect", iid, "--reason", "user left", "--skip-revocation"
    )
    assert gone.code == 0, gone.err
    assert "DISCONNECTED; provider revocation: SKIPPED" in gone.out
    disconnected = await broker(
        capsys, cfg, "integrations", "list", "--user", "bob", "--status", "DISCONNECTED", "--json"
    )
    assert '"disconnect_reason": "user left"' in disconnected.out

    missing = await broker(capsys, cfg, "integrations", "show", "no-such-id")
    assert missing.code == 1
    assert "no integration with id 'no-such-id'" in missing.err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_purge_needs_confirmation(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = await seed(database_url, KEYS, {"carol": 4, "dave": 1})
    carol = [i for i in tokens if "carol" in tokens[i]]
    engine = create_engine(DatabaseSettings(url=database_url))
    past = datetime.now(UTC) - timedelta(hours=1)
    async with engine.begin() as conn:
        await conn.execute(
            update(integrations)
            .where(integrations.c.id.in_(carol[:2]))
            .values(status="DISCONNECTED", access_token_ct=None, refresh_token_ct=None)
        )
        await conn.execute(
            update(integrations)
            .where(integrations.c.id == carol[2])
            .values(status="DISCONNECTED", revocation="PENDING")
        )
        # Expired without a way to refresh, though nobody has asked for it since.
        await conn.execute(
            update(integrations)
            .where(integrations.c.id == carol[3])
            .values(expires_at=past, refresh_token_ct=None)
        )
    cfg = config(tmp_path, database_url)
    purge = ("integrations", "purge", "--user", "carol")

    dry = await broker(capsys, cfg, *purge, "--disconnected", "--dry-run")
    assert dry.code == 0
    assert "2 disconnected integration(s) of user 'carol' would delete" in dry.out
    assert "1 disconnected integration(s) kept: provider revocation still pending" in dry.out

    no_tty = await broker(capsys, cfg, *purge, "--disconnected", stdin=io.StringIO("y\n"))
    assert no_tty.code == 1
    assert "pass --yes" in no_tty.err
    declined = await broker(capsys, cfg, *purge, "--disconnected", stdin=Terminal("n\n"))
    assert declined.code == 1
    assert "nothing deleted" in declined.err

    confirmed = await broker(capsys, cfg, *purge, "--disconnected", stdin=Terminal("y\n"))
    assert confirmed.code == 0, confirmed.err
    assert "deleted 2 integration(s)" in confirmed.out
    expired = await broker(capsys, cfg, *purge, "--expired", "--yes")
    assert "deleted 1 integration(s)" in expired.out
    left = await broker(capsys, cfg, "integrations", "list", "--user", "carol")
    assert len(left.out.splitlines()) == 2  # header + the one with a pending revocation
    assert carol[2] in left.out
    async with engine.connect() as conn:
        audited = (await conn.execute(audit_events.select())).all()
    await engine.dispose()
    assert {a._mapping["integration_id"] for a in audited} == {carol[0], carol[1], carol[3]}
    assert (await broker(capsys, cfg, "integrations", "list", "--user", "dave")).code == 0


async def test_check_exit_codes(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed(database_url, KEYS, {"u1": 2})
    good = await broker(capsys, config(tmp_path, database_url), "check")
    assert good.code == 0, good.out
    assert all(line.startswith("OK") for line in good.out.splitlines()), good.out
    for name in ("keys cover every row", "environment", "database migrated", "providers"):
        assert name in good.out

    missing_key = await broker(capsys, config(tmp_path, database_url, keys=NEW), "check")
    # Each problem exits as `serve` does on it: a configuration error (2).
    assert missing_key.code == 2
    assert "FAIL  keys cover every row" in missing_key.out
    assert "'test1' (2 integrations, 0 flows)" in missing_key.out

    other_env = await broker(
        capsys, config(tmp_path, database_url, environment="production"), "check"
    )
    assert other_env.code == 2
    assert "FAIL  environment" in other_env.out
    assert "'test'" in other_env.out
    assert "'production'" in other_env.out
    assert_no_secrets(other_env, KEYS)

    fresh = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    unmigrated = await broker(capsys, config(tmp_path, fresh), "check")
    assert unmigrated.code == 2
    assert "FAIL  database migrated" in unmigrated.out
    assert "broker migrate" in unmigrated.out

    down = "postgresql+asyncpg://nobody@127.0.0.1:1/none"
    unreachable = await broker(capsys, config(tmp_path, down), "check")
    assert unreachable.code == 3
    assert "FAIL  database reachable" in unreachable.out

    bad = write_toml(tmp_path / "bad.toml", {"server": {"listen": "nowhere"}})
    invalid = await broker(capsys, bad, "check")
    assert invalid.code == 2
    assert "FAIL  configuration" in invalid.out
    assert "server.listen" in invalid.out

    bad_provider = write_toml(
        tmp_path / "provider.toml",
        {
            "server": {"environment": ENVIRONMENT},
            "database": {"url": database_url},
            "keys": {"keys": KEYS},
            "callers": {"admin": {"token_sha256": hash_token(ADMIN_TOKEN)}},
            "providers": {"acme": {"client_id": "x"}},
        },
    )
    incomplete = await broker(capsys, bad_provider, "check")
    assert incomplete.code == 2
    assert "FAIL  providers" in incomplete.out
    assert "providers.acme" in incomplete.out


def test_check_exit_code_from_the_real_command(tmp_path: Path) -> None:
    cfg = config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}", listen="127.0.0.1:0")
    run = [sys.executable, "-m", "broker", "--config", str(cfg)]
    # The same file gives the same exit code to `check` as to `serve`, which refuses it.
    checked = subprocess.run([*run, "check"], capture_output=True, check=False)
    served = subprocess.run([*run, "serve"], capture_output=True, check=False, timeout=60)
    assert checked.returncode == served.returncode == 2, served.stderr
    migrated = subprocess.run([*run, "migrate"], capture_output=True, text=True, check=False)
    assert migrated.returncode == 0, migrated.stderr
    done = subprocess.run([*run, "check"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- broker health -----------------------------------------------------------------------------


def health_command(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "health", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_health_exits_0_only_when_serving(broker: Broker) -> None:
    address = f"127.0.0.1:{broker.port}"
    serving = await asyncio.to_thread(health_command, "--address", address)
    assert serving.returncode == 0, serving.stderr
    assert serving.stdout.strip() == f"{address}: SERVING"
    named = await asyncio.to_thread(
        health_command, "--address", address, "--service", "credentialbroker.v1.CredentialBroker"
    )
    assert named.returncode == 0, named.stderr
    # What SIGTERM does first: NOT_SERVING while in-flight calls finish.
    await broker.health.enter_graceful_shutdown()
    draining = await asyncio.to_thread(health_command, "--address", address)
    assert draining.returncode == 1
    assert draining.stderr.strip() == f"{address}: NOT_SERVING"


def test_health_exits_1_when_nothing_answers() -> None:
    with socket.socket() as sock:  # a port that is bound but never accepts gRPC
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = health_command("--address", f"127.0.0.1:{port}", "--timeout", "1")
    assert result.returncode == 1
    assert "no answer" in result.stderr
    assert "Traceback" not in result.stderr


# -- product text names no issue numbers and no document that is not in the repository ----------

ROOT = Path(__file__).resolve().parent.parent
_UNSHIPPED = re.compile(r"\bissue\s*#?\d|DESIGN|§|context/")


def test_bench_help_and_report_name_only_shipped_documents(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from broker_devtools.bench.report import targets_text

    texts = []
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        texts.append(capsys.readouterr().out)
    texts.append(targets_text([{"target": "x", "value": 1.0, "limit": 2.0, "met": True}]))
    for text in texts:
        assert not _UNSHIPPED.search(text), text
        for document in re.findall(r"[\w/.-]+\.md\b", text):
            assert (ROOT / document).is_file(), document


# -- one way of behaving: listing across users, JSON shape, human times, names ------------------


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


async def test_integrations_list_across_users_with_paging(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = await seed(database_url, KEYS, {"alice": 3, "bob": 2})
    cfg = config(tmp_path, database_url)
    everyone = await broker(capsys, cfg, "integrations", "list")
    assert everyone.code == 0, everyone.err
    lines = everyone.out.splitlines()
    assert lines[0].split()[:3] == ["ID", "USER", "PROVIDER"]
    assert {line.split()[0] for line in lines[1:]} == set(tokens)

    first = await broker(capsys, cfg, "integrations", "list", "--limit", "2", "--json")
    assert first.code == 0, first.err
    page = re.search(r"--page-token (\S+)", first.err)
    assert page, first.err
    rest = await broker(
        capsys, cfg, "integrations", "list", "--page-token", page.group(1), "--json"
    )
    import json

    ids = [i["id"] for i in json.loads(first.out)] + [i["id"] for i in json.loads(rest.out)]
    assert sorted(ids) == sorted(tokens), "every integration once, across the two pages"
    twitter = await broker(capsys, cfg, "integrations", "list", "--provider", "twitter", "--json")
    assert {i["user_id"] for i in json.loads(twitter.out)} == {"alice", "bob"}
    assert {i["provider"] for i in json.loads(twitter.out)} == {"twitter"}
    assert_no_secrets(everyone)


async def test_json_output_uses_null_and_iso_8601(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    tokens = await seed(database_url, KEYS, {"alice": 1})
    cfg = config(tmp_path, database_url)
    (iid,) = tokens
    shown = json.loads((await broker(capsys, cfg, "integrations", "show", iid, "--json")).out)
    # An audited change, for the audit trail's JSON below.
    await broker(capsys, cfg, "integrations", "disconnect", iid, "--skip-revocation")
    assert shown["disconnected_at"] is None
    assert shown["last_refreshed_at"] is None
    for name in ("created_at", "updated_at", "expires_at"):
        assert ISO.match(shown[name]), shown[name]
    assert "-" not in {v for v in shown.values() if isinstance(v, str) and len(v) == 1}
    events = json.loads((await broker(capsys, cfg, "audit", "--all", "--json")).out)
    assert events, "the disconnect is audited"
    assert all(ISO.match(e["occurred_at"]) for e in events), events[0]["occurred_at"]


async def test_audit_since_takes_human_times(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = await seed(database_url, KEYS, {"alice": 1})
    cfg = config(tmp_path, database_url)
    await broker(capsys, cfg, "integrations", "disconnect", *tokens, "--skip-revocation")
    for since in ("1h", "30m", "yesterday", "today", "2020-01-01"):
        found = await broker(capsys, cfg, "audit", "--all", "--since", since)
        assert found.code == 0, (since, found.err)
        assert "Disconnect" in found.out, since
    later = await broker(capsys, cfg, "audit", "--all", "--since", "2999-01-01")
    assert later.code == 0
    assert "Disconnect" not in later.out
    bad = await broker(capsys, cfg, "audit", "--all", "--since", "last tuesday")
    assert bad.code == 2
    assert bad.err.strip().splitlines() == [
        "broker: --since: 'last tuesday' is not a time; use e.g. 1h, 30m, 2d, yesterday, "
        "today, 2026-11-26 or 2026-11-26T09:00:00+00:00"
    ]


async def test_unknown_webhook_is_the_same_error_everywhere(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, database_url)
    answers = set()
    for argv in (("list", "app"), ("retry", "app"), ("test", "app")):
        result = await broker(capsys, cfg, "webhooks", *argv)
        assert result.code == 2, argv
        answers.add(result.err)
    assert answers == {"broker: no webhook named 'app' is configured (configured: none)\n"}


async def test_grants_list_names_its_flags(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await broker(capsys, config(tmp_path, database_url), "grants", "list")
    assert result.code == 2
    assert "--user" in result.err
    assert "--run" in result.err
    assert "user_id" not in result.err


async def test_selector_flags_are_one_form_or_the_other(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = await seed(database_url, KEYS, {"alice": 1})
    cfg = config(tmp_path, database_url)
    (iid,) = tokens
    by_owner = await broker(
        capsys, cfg, "integrations", "show", "--user", "alice", "--provider", "twitter"
    )
    assert by_owner.code == 0, by_owner.err
    assert iid in by_owner.out
    both = await broker(capsys, cfg, "integrations", "show", iid, "--user", "alice")
    assert both.code == 2
    assert "not both" in both.err
    neither = await broker(capsys, cfg, "integrations", "disconnect")
    assert neither.code == 2
