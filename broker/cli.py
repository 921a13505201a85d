"""The ``broker`` command: serve, migrate, keygen, callers, keys, integrations, webhooks,
check, health.

Exit codes (EXIT_CODES, also in ``broker --help`` and the README): 0 ok, 1 a check or an
operation failed, 2 configuration error, 3 database cannot be used. Every failure is one line
on stderr, never a traceback. Nothing printed ever contains a token or a key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from broker import __version__, devmode, devprovider, logs
from broker.config import METHODS, Settings, load_settings
from broker.crypto.keys import generate_key
from broker.domain.model import Status
from broker.errors import BrokerError, ConfigError, StorageUnavailable
from broker.server.callers import hash_token

if TYPE_CHECKING:  # the runtime pulls in the whole stack; commands import it when they run
    from broker.runtime import Runtime
    from broker.testing.fakeauth import FakeAuthServer

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_DATABASE = 0, 1, 2, 3
EXIT_CODES = """exit codes:
  0    success
  1    a check, a health probe or an operation failed
  2    configuration error: the config file, a BROKER_* variable, a setting, the keys
       (the one-line message names the setting, and suggests the name you may have meant)
  3    the database cannot be used: unreachable, refusing connections, no such database
       or role (the message names host, port, database, role and the cause)
  130  interrupted (Ctrl-C)"""


def _settings(args: argparse.Namespace) -> Settings:
    if args.command == "serve":
        return load_settings(config_path=args.config)
    # Beside a dev broker with nothing configured, the operator commands use its key and caller.
    return devmode.operator_settings(args.config)


async def _migrate(settings: Settings) -> str:
    from broker.storage.engine import create_engine, probe
    from broker.storage.schema import migrate

    engine = create_engine(settings.database)
    try:
        await probe(engine, settings.database.timeout_seconds)
        return await migrate(engine, settings.server.environment)
    finally:
        await engine.dispose()


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.server.app import Broker, run

    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format)
    if args.workers > 1:
        if args.dev:
            raise ConfigError("--workers: dev mode runs one process on SQLite")
        from broker.server import workers

        return workers.run(settings, args.workers, args.config)
    token = None
    if args.demo_provider is not None and not args.dev:
        raise ConfigError("--demo-provider: only with --dev (or run `broker dev-provider`)")
    if args.dev:
        settings, token = devmode.prepare(settings)
        settings = _with_demo_provider(settings, args.demo_provider)
        asyncio.run(_migrate(settings))

    def ready(broker: Broker) -> None:
        if args.dev:
            print(devmode.banner(settings.server.listen, broker.port, token), flush=True)
            if args.demo_provider is not None:
                print(devprovider.helpers(_demo[0]), flush=True)

    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional; the default loop works, a little slower
        pass

    def reload() -> Settings:
        fresh = _settings(args)
        if not args.dev:
            return fresh
        return _with_demo_provider(devmode.prepare(fresh)[0], args.demo_provider)

    asyncio.run(run(settings, on_ready=ready, reload=reload))
    return 0


# The demo provider of `serve --dev --demo-provider`: one per process, kept across reloads.
_demo: list[FakeAuthServer] = []


def _with_demo_provider(settings: Settings, port: int | None) -> Settings:
    if port is None:
        return settings
    if not _demo:
        _demo.append(devprovider.start(port))
    if devprovider.NAME in settings.providers:
        raise ConfigError(
            f"providers.{devprovider.NAME}: already configured; --demo-provider adds its own"
        )
    demo = devprovider.provider_settings(_demo[0])
    return settings.model_copy(update={"providers": {**settings.providers, devprovider.NAME: demo}})


def cmd_dev_provider(args: argparse.Namespace) -> int:
    import signal
    import threading

    fake = devprovider.start(args.port, args.host)
    print(devprovider.usage(fake), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        fake.stop()
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    revision = asyncio.run(_migrate(settings))
    print(f"database at revision {revision} (environment {settings.server.environment!r})")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    print(generate_key(args.id))
    return 0


def cmd_callers_new(args: argparse.Namespace) -> int:
    token = "cb_" + secrets.token_urlsafe(32)
    methods = args.methods or list(METHODS)
    print(f"# token for caller {args.name!r} (shown once; give it to the caller, keep it secret):")
    print(f"# {token}")
    print(f"[callers.{args.name}]")
    print(f'token_sha256 = "{hash_token(token)}"')
    print("methods = [" + ", ".join(f'"{m}"' for m in methods) + "]")
    return 0


def cmd_callers_hash(_args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        print("broker: give the token on standard input", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


# -- operator commands (need settings and the database) ----------------------------------------


def _with_runtime(
    args: argparse.Namespace,
    body: Callable[[Runtime], Awaitable[int]],
    *,
    check_database: bool = True,
) -> int:
    """Open the runtime as ``serve`` would (same settings, same start-up checks), run ``body``."""
    from broker.runtime import open_runtime

    settings = _settings(args)
    logs.configure(settings.logging.level, settings.logging.format)

    async def run() -> int:
        runtime = await open_runtime(settings, check_database=check_database)
        try:
            return await body(runtime)
        finally:
            await runtime.close()

    return asyncio.run(run())


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


class ProgressBar:
    """A one-line textual bar on stderr when it is a terminal; otherwise a line per 10%."""

    def __init__(self, out: TextIO, width: int = 30) -> None:
        self.out = out
        self.width = width
        self.tty = out.isatty()
        self._last_tenth = -1

    def __call__(self, progress: Any) -> None:
        if not progress.total:
            return
        done, total = progress.done, progress.total
        share = min(done / total, 1.0)
        extra = ""
        if progress.deferred:
            extra += f", {progress.deferred} busy (retrying)"
        if progress.failed:
            extra += f", {progress.failed} failed"
        if self.tty:
            filled = int(share * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            print(
                f"\rre-encrypting [{bar}] {done}/{progress.total} rows{extra}\x1b[K",
                end="",
                file=self.out,
                flush=True,
            )
        elif int(share * 10) != self._last_tenth:
            self._last_tenth = int(share * 10)
            print(f"re-encrypting: {done}/{progress.total} rows{extra}", file=self.out, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.out, flush=True)


def cmd_keys_status(args: argparse.Namespace) -> int:
    from broker.checks import describe_missing, schema_problem, schema_state
    from broker.crypto.aead import NONCE_LIMIT
    from broker.domain.key_usage import read_key_usage
    from broker.domain.rotation import KeyCount, key_status

    async def body(runtime: Runtime) -> int:
        # Not the full start-up check: a key missing from the keyring is what this shows.
        problem = schema_problem(
            await schema_state(runtime.engine), runtime.settings.server.environment
        )
        if problem is not None:
            raise ConfigError(f"database: {problem}")
        counts = await key_status(runtime.engine)
        usage = await read_key_usage(runtime.engine)
        keyring = runtime.keyring
        ids = list(keyring.ids) + sorted(set(counts) - set(keyring.ids))
        rows = [["KEY ID", "ROLE", "INTEGRATIONS", "FLOWS", "CIPHERTEXTS", "ENCRYPTIONS"]]
        for kid in ids:
            count = counts.get(kid, KeyCount())
            if kid == keyring.primary_id:
                role = "primary"
            elif kid in keyring.ids:
                role = "decrypt-only"
            else:
                role = "MISSING"
            used = usage.get(kid, 0) + keyring.usage().get(kid, 0)
            rows.append(
                [
                    kid,
                    role,
                    str(count.integrations),
                    str(count.flows),
                    str(count.ciphertexts),
                    f"{used} ({used / NONCE_LIMIT:.2%} of 2^32)",
                ]
            )
        _table(rows, sys.stdout)
        old = sum(c.ciphertexts for k, c in counts.items() if k != keyring.primary_id)
        missing = describe_missing(counts, keyring)
        if missing:
            print(
                f"broker: ciphertexts under key id(s) missing from the keyring: {missing}; "
                "a broker with this keyring refuses to start",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if old:
            print(
                f"{old} ciphertext(s) under older keys; run `broker keys reencrypt`",
                file=sys.stderr,
            )
        return EXIT_OK

    return _with_runtime(args, body, check_database=False)


def cmd_keys_reencrypt(args: argparse.Namespace) -> int:
    from broker.domain.key_usage import flush_key_usage
    from broker.domain.rotation import reencrypt

    if args.batch_size < 1:
        raise ConfigError("--batch-size: must be at least 1")

    async def body(runtime: Runtime) -> int:
        bar = ProgressBar(sys.stderr)
        try:
            report = await reencrypt(
                runtime.engine,
                runtime.keyring,
                runtime.settings.server.environment,
                batch_size=args.batch_size,
                max_batches=args.max_batches,
                lease_wait_seconds=args.lease_wait,
                progress=bar,
            )
        finally:
            bar.close()
            # Re-encryption is a burst of encryptions under the primary: they count too.
            await flush_key_usage(
                runtime.engine,
                runtime.keyring,
                warn_fraction=runtime.settings.keys.nonce_warn_fraction,
            )
        moved = sum(report.rewritten.values())
        print(
            f"re-encrypted {report.rows} row(s), {moved} ciphertext(s), "
            f"to primary key {report.primary!r}"
        )
        for kid, n in sorted(report.rewritten.items()):
            print(f"  from {kid!r}: {n} ciphertext(s)")
        if report.resolved_by_others:
            print(f"  {report.resolved_by_others} row(s) were rewritten by a broker meanwhile")
        for where, reason in sorted(report.failed.items()):
            print(f"broker: {where}: {reason}", file=sys.stderr)
        if report.complete:
            print("no ciphertext is left under another key")
            return EXIT_OK
        print(
            f"broker: {report.remaining} row(s) still under other keys "
            f"({report.deferred} busy being refreshed, {len(report.failed)} undecryptable); "
            "run `broker keys reencrypt` again to resume",
            file=sys.stderr,
        )
        return EXIT_FAILED

    return _with_runtime(args, body)


def _integration_dict(integration: Any, key_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": integration.id,
        "user_id": integration.user_id,
        "provider": integration.provider,
        "account_id": integration.account_id,
        "status": integration.status.value,
        "credential_type": integration.credential_type.value,
        "scopes": list(integration.scopes),
        "metadata": integration.metadata,
        "has_refresh_token": integration.has_refresh_token,
        "created_at": _when(integration.created_at),
        "updated_at": _when(integration.updated_at),
        "expires_at": _when(integration.expires_at),
        "last_refreshed_at": _when(integration.last_refreshed_at),
        "disconnected_at": _when(integration.disconnected_at),
        "disconnect_reason": integration.disconnect_reason,
        "version": integration.version,
    }
    if key_id is not None:
        data["key_id"] = key_id
    return data


def cmd_integrations_list(args: argparse.Namespace) -> int:
    from broker.domain.model import Integration

    status = Status(args.status) if args.status else None

    async def body(runtime: Runtime) -> int:
        found: list[Integration] = []
        token = ""
        while True:
            page = await runtime.service.list(args.user, args.provider or "", status, 500, token)
            found += page.integrations
            token = page.next_page_token
            if not token:
                break
        if args.json:
            print(json.dumps([_integration_dict(i) for i in found], indent=2))
            return EXIT_OK
        if not found:
            print(f"user {args.user!r} has no matching integration", file=sys.stderr)
            return EXIT_OK
        rows = [["ID", "PROVIDER", "ACCOUNT", "KIND", "STATUS", "EXPIRES", "UPDATED"]]
        for i in found:
            rows.append(
                [
                    i.id,
                    i.provider,
                    i.account_id or "-",
                    i.credential_type.value,
                    i.status.value,
                    _when(i.expires_at),
                    _when(i.updated_at),
                ]
            )
        _table(rows, sys.stdout)
        return EXIT_OK

    return _with_runtime(args, body)


def cmd_audit(args: argparse.Namespace) -> int:
    from broker.storage import audit_log
    from broker.storage.engine import storage_errors

    if not (args.user or args.integration or args.caller or args.run or args.all):
        print("broker: give --user, --integration, --caller or --run (or --all)", file=sys.stderr)
        return EXIT_CONFIG
    since = datetime.fromisoformat(args.since) if args.since else None

    async def body(runtime: Runtime) -> int:
        async with storage_errors(), runtime.engine.connect() as conn:
            events = await audit_log.list_events(
                conn,
                user_id=args.user,
                integration_id=args.integration,
                caller=args.caller,
                run_id=args.run,
                since=since,
                limit=args.limit,
            )
        if args.json:
            print(json.dumps(events, indent=2, default=str))
            return EXIT_OK
        rows = [
            [
                "TIME",
                "CALLER",
                "METHOD",
                "OUTCOME",
                "INTEGRATION",
                "USER",
                "PROVIDER",
                "KIND",
                "GRANT",
                "RUN",
                "REQUEST",
            ]
        ]
        for e in events:
            rows.append(
                [
                    _when(e["occurred_at"]),
                    e["caller"],
                    e["method"],
                    e["outcome"],
                    e["integration_id"] or "-",
                    e["user_id"] or "-",
                    e["provider"] or "-",
                    e["credential_type"] or "-",
                    e["grant_id"] or "-",
                    e["run_id"] or "-",
                    e["request_id"],
                ]
            )
        _table(rows, sys.stdout)
        return EXIT_OK

    return _with_runtime(args, body)


def cmd_integrations_show(args: argparse.Namespace) -> int:
    from broker.domain.model import Selector

    async def body(runtime: Runtime) -> int:
        stored = await runtime.service.read(Selector(integration_id=args.id))
        data = _integration_dict(stored.integration, stored.key_id or "-")
        data["revocation"] = stored.revocation
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for name, value in data.items():
                shown = json.dumps(value) if isinstance(value, dict | list) else value
                print(f"{name + ':':<19} {'-' if shown is None else shown}")
        return EXIT_OK

    return _with_runtime(args, body)


async def _audited(runtime: Runtime, method: str, step: Awaitable[T]) -> T:
    """Run an operator command as an audited call by caller ``cli:<os user>``, like the RPC
    of the same name (the event is written whether it succeeds or fails)."""
    import getpass

    from broker.domain import ids
    from broker.domain.context import Call, Caller, current_call

    # The machine's operator: every method, provider and user, and every caller's grants.
    caller = Caller(f"cli:{getpass.getuser()}", frozenset(METHODS), None, manage_all_grants=True)
    call = Call(caller, method, ids.request_id())
    current_call.set(call)
    try:
        result = await step
    except BrokerError as error:
        await runtime.auditor.record(call, error.code.name)
        raise
    finally:
        current_call.set(None)
    await runtime.auditor.record(call, "OK")
    return result


def cmd_integrations_disconnect(args: argparse.Namespace) -> int:
    from broker.domain.model import Selector

    async def body(runtime: Runtime) -> int:
        integration, revocation = await _audited(
            runtime,
            "Disconnect",
            runtime.service.disconnect(
                Selector(integration_id=args.id), args.reason or "", args.skip_revocation
            ),
        )
        print(
            f"integration {integration.id} ({integration.provider}, user "
            f"{integration.user_id!r}): {integration.status.value}; "
            f"provider revocation: {revocation.value}"
        )
        return EXIT_OK

    return _with_runtime(args, body)


def _confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in {"y", "yes"}


def cmd_integrations_purge(args: argparse.Namespace) -> int:
    from broker.domain import purge

    kind = purge.Kind.EXPIRED if args.expired else purge.Kind.DISCONNECTED

    async def body(runtime: Runtime) -> int:
        now = runtime.clock()
        found = await purge.candidates(runtime.engine, args.user, kind, now)
        kept = (
            await purge.pending_revocations(runtime.engine, args.user)
            if kind is purge.Kind.DISCONNECTED
            else 0
        )
        verb = "would delete" if args.dry_run else "to delete"
        print(f"{len(found)} {kind.value} integration(s) of user {args.user!r} {verb}:")
        for i in found:
            print(f"  {i.id}  {i.provider}  {i.account_id or '-'}  {i.status.value}")
        if kept:
            print(f"({kept} disconnected integration(s) kept: provider revocation still pending)")
        if args.dry_run or not found:
            return EXIT_OK
        if not args.yes:
            if not sys.stdin.isatty():
                print(
                    "broker: refusing to delete without confirmation: no terminal to ask on; "
                    "pass --yes (or --dry-run to look first)",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            if not _confirm(f"Delete these {len(found)} integration(s)?"):
                print("nothing deleted", file=sys.stderr)
                return EXIT_FAILED
        deleted = await purge.purge(runtime.engine, args.user, kind, [i.id for i in found], now)
        print(f"deleted {deleted} integration(s)")
        if deleted < len(found):
            print(f"({len(found) - deleted} changed meanwhile and were kept)")
        return EXIT_OK

    return _with_runtime(args, body)


def cmd_health(args: argparse.Namespace) -> int:
    from broker import healthprobe

    address = args.address or healthprobe.default_address()
    serving, line = healthprobe.check(
        address, service=args.service, timeout=args.timeout, ca_file=args.ca_file
    )
    print(line, file=sys.stdout if serving else sys.stderr)
    return EXIT_OK if serving else EXIT_FAILED


def _grant_dict(grant: Any, now: datetime) -> dict[str, Any]:
    if grant.revoked_at is not None:
        state = "REVOKED"
    elif grant.expired(now):
        state = "EXPIRED"
    else:
        state = "ACTIVE"
    return {
        "id": grant.id,
        "user_id": grant.user_id,
        "providers": sorted(grant.providers),
        "integration_ids": sorted(grant.integration_ids),
        "audience": sorted(grant.audience),
        "methods": sorted(grant.methods),
        "run_id": grant.run_id,
        "issuer": grant.issuer,
        "state": state,
        "created_at": _when(grant.created_at),
        "expires_at": _when(grant.expires_at),
        "revoked_at": _when(grant.revoked_at),
    }


def _print_grants(grants: list[Any], now: datetime, as_json: bool) -> None:
    shown = [_grant_dict(g, now) for g in grants]
    if as_json:
        print(json.dumps(shown, indent=2))
        return
    rows = [["ID", "USER", "RUN", "STATE", "EXPIRES", "PROVIDERS", "INTEGRATIONS"]]
    for g in shown:
        rows.append(
            [
                g["id"],
                g["user_id"],
                g["run_id"] or "-",
                g["state"],
                g["expires_at"],
                ",".join(g["providers"]) or "-",
                ",".join(g["integration_ids"]) or "-",
            ]
        )
    _table(rows, sys.stdout)


def cmd_grants_list(args: argparse.Namespace) -> int:
    async def body(runtime: Runtime) -> int:
        found: list[Any] = []
        token = ""
        while True:
            page = await runtime.grants.list(args.user or "", args.run or "", args.all, 500, token)
            found += page.grants
            token = page.next_page_token
            if not token:
                break
        if not found and not args.json:
            print("no matching grant", file=sys.stderr)
            return EXIT_OK
        _print_grants(found, runtime.clock(), args.json)
        return EXIT_OK

    return _with_runtime(args, body)


def cmd_grants_show(args: argparse.Namespace) -> int:
    async def body(runtime: Runtime) -> int:
        data = _grant_dict(await runtime.grants.get(args.id), runtime.clock())
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for name, value in data.items():
                shown = ", ".join(value) if isinstance(value, list) else value
                print(f"{name + ':':<17} {shown or '-'}")
        return EXIT_OK

    return _with_runtime(args, body)


def cmd_grants_revoke(args: argparse.Namespace) -> int:
    if bool(args.id) == bool(args.run):
        print("broker: give a grant id or --run RUN_ID", file=sys.stderr)
        return EXIT_CONFIG

    async def body(runtime: Runtime) -> int:
        revoked = await _audited(
            runtime, "RevokeGrant", runtime.grants.revoke(args.id or "", args.run or "")
        )
        print(f"{len(revoked)} grant(s) revoked")
        return EXIT_OK

    return _with_runtime(args, body)


def cmd_check(args: argparse.Namespace) -> int:
    from broker.checks import Level, run_checks

    checks, _ = asyncio.run(run_checks(args.config))
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"{check.level.value:<4}  {check.name:<{width}}  {check.detail}")
    failed = {c.name for c in checks if c.level is Level.FAIL}
    if "configuration" in failed:
        return EXIT_CONFIG
    if "database reachable" in failed:
        return EXIT_DATABASE
    return EXIT_FAILED if failed else EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="broker",
        description="Credential Broker",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"broker {__version__}")
    p.add_argument("--config", help="TOML settings file (default: $BROKER_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="zero set-up: SQLite, key and caller token under ./.broker/, migrate on start",
    )
    serve.add_argument(
        "--demo-provider",
        nargs="?",
        type=int,
        const=devprovider.DEFAULT_PORT,
        metavar="PORT",
        help="with --dev: also run the local test OAuth server as provider 'demo' "
        f"(port {devprovider.DEFAULT_PORT}); see `broker dev-provider`",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N processes on one port (SO_REUSEPORT; needs PostgreSQL)",
    )
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("migrate", help="create or upgrade the schema").set_defaults(func=cmd_migrate)

    dev_provider = sub.add_parser(
        "dev-provider",
        help="run a local test OAuth server and print its [providers.demo] settings",
        description="A strict OAuth 2.0 server on loopback for trying refresh, revocation and "
        "PKCE: /authorize consents at once, /grant mints a grant, /callback shows the code.",
    )
    dev_provider.add_argument("--port", type=int, default=devprovider.DEFAULT_PORT)
    dev_provider.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 in a container; the broker reaches it on loopback)",
    )
    dev_provider.set_defaults(func=cmd_dev_provider)

    keygen = sub.add_parser("keygen", help="print a new KID:BASE64KEY entry for the keyring")
    keygen.add_argument("--id", help="key id (default: time-based)")
    keygen.set_defaults(func=cmd_keygen)

    callers = sub.add_parser("callers", help="caller tokens").add_subparsers(
        dest="sub", required=True
    )
    new = callers.add_parser("new", help="make a token and print its [callers.NAME] section")
    new.add_argument("name")
    new.add_argument("--methods", nargs="+", choices=METHODS, help="methods it may call")
    new.set_defaults(func=cmd_callers_new)
    callers.add_parser("hash", help="SHA-256 of a token read from stdin").set_defaults(
        func=cmd_callers_hash
    )

    keys = sub.add_parser("keys", help="key rotation (docs/key-rotation.md)").add_subparsers(
        dest="sub", required=True
    )
    keys.add_parser(
        "status", help="how many ciphertexts each key protects, and its nonce budget"
    ).set_defaults(func=cmd_keys_status)
    reenc = keys.add_parser(
        "reencrypt", help="re-encrypt every ciphertext to the primary key, online and resumable"
    )
    reenc.add_argument("--batch-size", type=int, default=200, help="rows per transaction")
    reenc.add_argument(
        "--max-batches", type=int, default=None, help="stop after N batches (run again to resume)"
    )
    reenc.add_argument(
        "--lease-wait",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="how long to keep retrying rows that are being refreshed (default 180)",
    )
    reenc.set_defaults(func=cmd_keys_reencrypt)

    from broker import webhook_cli
    from broker.bench import cli as bench_cli

    bench_cli.register(sub)
    webhook_cli.register(sub)

    audit = sub.add_parser("audit", help="read the audit trail, newest first")
    audit.add_argument("--user", help="events of this user_id")
    audit.add_argument("--integration", help="events of this integration id")
    audit.add_argument("--caller", help="events of this caller name")
    audit.add_argument("--run", help="events of calls made under (or about) this run's grants")
    audit.add_argument("--all", action="store_true", help="no filter")
    audit.add_argument("--since", help="ISO time, e.g. 2026-11-26T00:00:00+00:00")
    audit.add_argument("--limit", type=int, default=100)
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_audit)

    integ = sub.add_parser(
        "integrations", help="look at and clean up integrations (metadata only)"
    ).add_subparsers(dest="sub", required=True)
    lst = integ.add_parser("list", help="a user's integrations")
    lst.add_argument("--user", required=True)
    lst.add_argument("--provider")
    lst.add_argument("--status", choices=[s.value for s in Status])
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_integrations_list)
    show = integ.add_parser("show", help="one integration")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_integrations_show)
    disc = integ.add_parser("disconnect", help="disconnect one integration")
    disc.add_argument("id")
    disc.add_argument("--reason", default="")
    disc.add_argument(
        "--skip-revocation", action="store_true", help="do not revoke the grant at the provider"
    )
    disc.set_defaults(func=cmd_integrations_disconnect)
    purge = integ.add_parser("purge", help="delete a user's expired or disconnected integrations")
    purge.add_argument("--user", required=True)
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--expired", action="store_true")
    which.add_argument("--disconnected", action="store_true")
    purge.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(func=cmd_integrations_purge)

    grants = sub.add_parser(
        "grants", help="run-scoped grants of workflow runners (metadata only)"
    ).add_subparsers(dest="sub", required=True)
    glist = grants.add_parser("list", help="grants of a user or a run (active ones by default)")
    glist.add_argument("--user")
    glist.add_argument("--run")
    glist.add_argument("--all", action="store_true", help="also expired and revoked ones")
    glist.add_argument("--json", action="store_true")
    glist.set_defaults(func=cmd_grants_list)
    gshow = grants.add_parser("show", help="one grant")
    gshow.add_argument("id")
    gshow.add_argument("--json", action="store_true")
    gshow.set_defaults(func=cmd_grants_show)
    grevoke = grants.add_parser("revoke", help="revoke one grant, or every grant of a run")
    grevoke.add_argument("id", nargs="?")
    grevoke.add_argument("--run")
    grevoke.set_defaults(func=cmd_grants_revoke)

    sub.add_parser(
        "check", help="check configuration, database, environment, keys and providers"
    ).set_defaults(func=cmd_check)

    health = sub.add_parser(
        "health",
        help="exit 0 only when a broker's health service answers SERVING (for probes)",
        description="Ask a running broker's grpc.health.v1.Health service. Needs no settings.",
    )
    health.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="default: $BROKER_LISTEN (0.0.0.0 read as 127.0.0.1), else 127.0.0.1:50051",
    )
    health.add_argument("--service", default="", help="a service name (default: the server)")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    health.add_argument(
        "--ca-file", type=Path, help="speak TLS, trusting this CA bundle (broker with TLS)"
    )
    health.set_defaults(func=cmd_health)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageUnavailable as exc:
        print(f"broker: {exc.message}", file=sys.stderr)
        return EXIT_DATABASE
    except BrokerError as exc:
        # Domain errors (no such integration, …) carry a message meant for people.
        print(f"broker: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
