"""``broker keygen``, ``keys status``, ``keys reencrypt`` and ``callers``: the keyring and the
callers' tokens. Keys and tokens are printed only where the operator asked for a new one."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import TYPE_CHECKING, Any

from broker.cli import common, output
from broker.cli.exits import EXIT_FAILED, EXIT_OK, CommandFailed, UsageError
from broker.config import METHODS
from broker.crypto.keys import generate_key
from broker.errors import ConfigError
from broker.server.callers import hash_token

if TYPE_CHECKING:
    from broker.runtime import Runtime


def cmd_keygen(args: argparse.Namespace) -> int:
    print(generate_key(args.id))
    return EXIT_OK


def cmd_callers_new(args: argparse.Namespace) -> int:
    token = "cb_" + secrets.token_urlsafe(32)
    methods = args.methods or list(METHODS)
    print(f"# token for caller {args.name!r} (shown once; give it to the caller, keep it secret):")
    print(f"# {token}")
    print(f"[callers.{args.name}]")
    print(f'token_sha256 = "{hash_token(token)}"')
    print("methods = [" + ", ".join(f'"{m}"' for m in methods) + "]")
    return EXIT_OK


def cmd_callers_hash(_args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if not token:
        raise UsageError("give the token on standard input")
    print(hash_token(token))
    return EXIT_OK


def cmd_keys_status(args: argparse.Namespace) -> int:
    from broker.checks import describe_missing, schema_problem, schema_state
    from broker.crypto.aead import NONCE_LIMIT
    from broker.domain.key_usage import read_key_usage
    from broker.domain.rotation import KeyCount, key_status, row_bound_status

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
        found: list[dict[str, Any]] = []
        for kid in list(keyring.ids) + sorted(set(counts) - set(keyring.ids)):
            count = counts.get(kid, KeyCount())
            if kid == keyring.primary_id:
                role = "primary"
            elif kid in keyring.ids:
                role = "decrypt-only"
            else:
                role = "MISSING"
            used = usage.get(kid, 0) + keyring.usage().get(kid, 0)
            found.append(
                {
                    "key_id": kid,
                    "role": role,
                    "integrations": count.integrations,
                    "flows": count.flows,
                    "ciphertexts": count.ciphertexts,
                    "encryptions": used,
                    "nonce_budget_used": round(used / NONCE_LIMIT, 6),
                }
            )
        if args.json:
            output.records(found, [], as_json=True, empty="")
        else:
            header = ["KEY ID", "ROLE", "INTEGRATIONS", "FLOWS", "CIPHERTEXTS", "ENCRYPTIONS"]
            rows = [
                [
                    *(output.cell(k[f]) for f in ("key_id", "role", "integrations", "flows")),
                    str(k["ciphertexts"]),
                    f"{k['encryptions']} ({k['nonce_budget_used']:.2%} of 2^32)",
                ]
                for k in found
            ]
            output.table([header, *rows])
        old = sum(c.ciphertexts for k, c in counts.items() if k != keyring.primary_id)
        missing = describe_missing(counts, keyring)
        if missing:
            raise CommandFailed(
                f"ciphertexts under key id(s) missing from the keyring: {missing}; "
                "a broker with this keyring refuses to start"
            )
        if old:
            print(
                f"{old} ciphertext(s) under older keys; run `broker keys reencrypt`",
                file=sys.stderr,
            )
        unbound = await row_bound_status(runtime.engine)
        if not args.json:
            print(
                f"owner binding: {unbound.integrations} integration(s), {unbound.flows} "
                f"flow(s), {unbound.ciphertexts} ciphertext(s) still bound to their row only"
            )
        if unbound.rows:
            refused = runtime.settings.keys.require_owner_binding
            print(
                f"{unbound.rows} row(s) not bound to their owner"
                + (" (refused: keys.require_owner_binding is set)" if refused else "")
                + "; run `broker keys reencrypt`",
                file=sys.stderr,
            )
        return EXIT_OK

    return common.with_runtime(args, body, check_database=False)


def cmd_keys_reencrypt(args: argparse.Namespace) -> int:
    from broker.domain.key_usage import flush_key_usage
    from broker.domain.rotation import reencrypt

    if args.batch_size < 1:
        raise UsageError("--batch-size: must be at least 1")

    async def body(runtime: Runtime) -> int:
        bar = output.ProgressBar("re-encrypting", sys.stderr)
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
        if report.upgraded:
            print(f"  {report.upgraded} ciphertext(s) upgraded to the owner binding")
        if report.resolved_by_others:
            print(f"  {report.resolved_by_others} row(s) were rewritten by a broker meanwhile")
        for where, reason in sorted(report.failed.items()):
            print(f"broker: {where}: {reason}", file=sys.stderr)
        if report.complete:
            print("no ciphertext is left under another key or without its owner binding")
            return EXIT_OK
        print(
            f"broker: {report.remaining} row(s) still under other keys (or row-bound) "
            f"({report.deferred} busy being refreshed, {len(report.failed)} undecryptable); "
            "run `broker keys reencrypt` again to resume",
            file=sys.stderr,
        )
        return EXIT_FAILED

    return common.with_runtime(args, body)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    status = keys.add_parser(
        "status", help="how many ciphertexts each key protects, and its nonce budget"
    )
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_keys_status)
    reenc = keys.add_parser(
        "reencrypt",
        help="re-encrypt every ciphertext to the primary key and the owner binding, online "
        "and resumable",
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
