"""The GetAccessToken hot path in one server process, per call: where the broker's own work goes.

    python -m broker_devtools.bench.hotpath                     # CPU µs/call, 3 variants
    python -m broker_devtools.bench.hotpath --callgrind         # instructions/call (valgrind)
    python -m broker_devtools.bench.hotpath --profile out.prof  # cProfile of the broker variant

Each variant is a real ``grpc.aio`` server in a process of its own, on loopback, answering the
same sequential GetAccessToken calls of one client (one call in flight, so nothing batches and
every call costs the same):

``echo``     the echo floor (gRPC, protobuf, the event loop; no broker code at all)
``echo-read`` the echo served the way the guard serves the broker's methods: request-streaming
             to gRPC, the one body read by the handler (so that a refused caller's body is
             never read); no broker code either
``guard``    the broker's server and guard (identity, policy, request id, body read, metrics,
             access log) with GetAccessToken answering a constant response, no audit
``broker``   the real broker on a SQLite file, cache hit, audit events built and handed to the
             group commit, whose sink writes nothing (the audit write is the database's cost,
             measured by ``broker bench``)

``guard - echo`` is the interceptor's work per call, ``broker - guard`` the servicer's and the
domain's (conversion, the cache, the audit bookkeeping). The server measures its own CPU time
(``time.process_time``) over the timed calls only; under ``--callgrind`` it runs in valgrind
with instrumentation switched on for the timed calls only, and the figure is instructions per
call: unlike time, it does not move when other processes load the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.crypto.keys import generate_key
from broker.server.callers import hash_token

VARIANTS = ("echo", "echo-read", "guard", "broker")
_ADMIN = "cb_hotpath_admin_token_0123456789"
_RUNNER = "cb_hotpath_runner_token_0123456789"


def _config(directory: Path) -> Path:
    path = directory / "broker.toml"
    database = directory / "hotpath.db"
    path.write_text(
        "\n".join(
            [
                "[server]",
                'listen = "127.0.0.1:0"',
                'environment = "hotpath"',
                # Work on a timer, not per call, kept out of the figures (under valgrind a
                # call takes 50 times as long, so a timer's share per call would grow too).
                "health_check_interval_seconds = 3600",
                "[events]",
                "poll_seconds = 60",
                "[database]",
                f'url = "sqlite+aiosqlite:///{database}"',
                "[keys]",
                f'keys = "{generate_key("hotpath")}"',
                "[refresh]",
                "background = false",
                "[callers.admin]",
                f'token_sha256 = "{hash_token(_ADMIN)}"',
                "[callers.runner]",
                f'token_sha256 = "{hash_token(_RUNNER)}"',
                'methods = ["GetAccessToken"]',
                "",
            ]
        )
    )
    return path


# -- the server (a child process) ---------------------------------------------------------------


async def _serve(variant: str, config: Path) -> None:
    """Serve; on stdin "start" / "stop" answer the CPU seconds used between them."""
    from broker.config import load_settings
    from broker.storage.engine import create_engine
    from broker.storage.schema import migrate
    from broker_devtools.bench import ceiling, data, echo

    if variant.startswith("echo"):
        server = grpc.aio.server()
        handlers = echo._handlers(data.sample_response())
        if variant == "echo-read":
            handlers = {name: _read_after(h) for name, h in handlers.items()}
        server.add_registered_method_handlers(echo.SERVICE, handlers)  # type: ignore[attr-defined]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stop = server.stop
    else:
        from broker.server import app, interceptors

        if os.environ.get("HOTPATH_ALL_REGISTERED"):
            # As before only the hot methods were registered with gRPC by name: all of them.
            interceptors.REGISTERED = _Everything()  # type: ignore[assignment]

        settings = load_settings(config_path=config, env={})
        engine = create_engine(settings.database)
        await migrate(engine, settings.server.environment)
        await engine.dispose()
        if variant == "guard":
            ceiling._stubbed_servicer()
            ceiling._unaudited_guard()
        else:
            ceiling._without_audit_writes()
        broker = await app.start(settings)
        port = broker.port
        stop = broker.stop
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(port, flush=True)
    began = 0.0
    profile_to = os.environ.get("HOTPATH_PROFILE")
    profiler = cProfile.Profile() if profile_to else None
    while line := (await reader.readline()).strip():
        if line == b"start":
            _callgrind("on")
            if profiler is not None:
                profiler.enable()
            began = time.process_time()
            print("ok", flush=True)
        elif line == b"stop":
            used = time.process_time() - began
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(f"{profile_to}.{variant}")
            _callgrind("off")
            print(used, flush=True)
    await stop(0)


class _Everything:
    def __contains__(self, item: object) -> bool:
        return True


def _read_after(handler: Any) -> Any:
    answer = handler.unary_unary

    async def read_then_answer(unread: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await answer(await context.read(), context)

    return grpc.stream_unary_rpc_method_handler(
        read_then_answer,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _callgrind(state: str) -> None:
    """Switch callgrind's instrumentation for this process (nothing outside valgrind)."""
    if os.environ.get("HOTPATH_CALLGRIND"):
        subprocess.run(
            ["callgrind_control", "-i", state, str(os.getpid())],
            check=True,
            capture_output=True,
        )


# -- the client ---------------------------------------------------------------------------------


def _measure(variant: str, config: Path, calls: int, warmup: int, callgrind: Path | None) -> float:
    """CPU µs (or, under callgrind, instructions) per call of the server process."""
    command = [sys.executable, "-m", "broker_devtools.bench.hotpath", "--serve", variant,
               "--config", str(config)]  # fmt: skip
    env = dict(os.environ)
    if callgrind is not None:
        env["HOTPATH_CALLGRIND"] = "1"
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={callgrind}", f"--log-file={callgrind}.log",
                   *command]  # fmt: skip
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        used = asyncio.run(_drive(port, variant, calls, warmup, proc.stdin, proc.stdout))
        proc.stdin.close()
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if callgrind is not None:
        return _instructions(callgrind) / calls
    return used / calls * 1e6


async def _drive(
    port: int, variant: str, calls: int, warmup: int, stdin: Any, stdout: Any
) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        request = pb.GetAccessTokenRequest(integration_id="00000000-0000-4000-8000-000000000000")
        if not variant.startswith("echo"):
            stored = await stub.StoreIntegration(
                pb.StoreIntegrationRequest(
                    user_id="hotpath-user",
                    provider="github",
                    access_token="at-" + "x" * 157,
                    token_type="Bearer",
                    expires_in_seconds=86_400,
                    scopes=["repo", "read:user"],
                ),
                metadata=(("authorization", f"Bearer {_ADMIN}"),),
            )
            request = pb.GetAccessTokenRequest(integration_id=stored.integration.id)
        metadata = (("authorization", f"Bearer {_RUNNER}"),)
        for _ in range(warmup):
            await stub.GetAccessToken(request, metadata=metadata)
        await asyncio.to_thread(_say, stdin, stdout, "start")
        for _ in range(calls):
            await stub.GetAccessToken(request, metadata=metadata)
        return float(await asyncio.to_thread(_say, stdin, stdout, "stop"))


def _say(stdin: Any, stdout: Any, line: str) -> str:
    stdin.write(line + "\n")
    stdin.flush()
    return str(stdout.readline()).strip()


def _instructions(path: Path) -> float:
    """The instructions callgrind collected (instrumentation was on for the timed calls)."""
    log = Path(f"{path}.log").read_text(errors="replace")
    match = re.search(r"Collected : ([\d,]+)", log)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's log:\n{log[-2000:]}")
    return float(match.group(1).replace(",", ""))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker_devtools.bench.hotpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--calls", type=int, default=3000, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=500, help="untimed calls first")
    p.add_argument("--variant", action="append", choices=VARIANTS, help="default: all three")
    p.add_argument("--callgrind", action="store_true", help="instructions/call under valgrind")
    p.add_argument(
        "--profile", metavar="FILE", help="also write a cProfile of each variant to FILE.VARIANT"
    )
    p.add_argument(
        "--all-registered",
        action="store_true",
        help="register every method with gRPC by name, as the broker did before it kept to "
        "GetAccessToken and Proxy (the cost of the others, against a run without this)",
    )
    p.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.serve, args.config))
        return 0
    if args.callgrind and shutil.which("valgrind") is None:
        print("hotpath: --callgrind needs valgrind", file=sys.stderr)
        return 2
    unit = "instructions" if args.callgrind else "CPU us"
    if args.all_registered:
        os.environ["HOTPATH_ALL_REGISTERED"] = "1"
    if args.profile:
        os.environ["HOTPATH_PROFILE"] = str(Path(args.profile).resolve())
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="broker-hotpath-") as tmp:
        for variant in args.variant or VARIANTS:
            directory = Path(tmp) / variant
            directory.mkdir()
            out = directory / "callgrind.out" if args.callgrind else None
            figures[variant] = _measure(variant, _config(directory), args.calls, args.warmup, out)
            print(f"{variant:17} {figures[variant]:>12,.1f} {unit}/call", flush=True)
    for label, high, low, what in (
        ("echo-read - echo", "echo-read", "echo", "the body read after admission"),
        ("guard - echo-read", "guard", "echo-read", "the interceptor"),
        ("broker - guard", "broker", "guard", "servicer, domain, audit bookkeeping"),
    ):
        if {high, low} <= figures.keys():
            print(f"{label:17} {figures[high] - figures[low]:>12,.1f}  ({what})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
