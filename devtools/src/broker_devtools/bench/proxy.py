"""Proxy's cost: a runner calling a provider's API through the broker (Proxy) against calling
it directly with the token (httpx), in the same run, against one local HTTP API that answers
about 1 KB of JSON.

    python -m broker_devtools.bench.proxy [--in-flight 32] [--seconds 5] [--rounds 3]

Three processes: the API (asyncio, a canned answer), a broker (`broker serve`, SQLite, an
api_key integration so that no refresh is involved), and this one, the client, which runs the
modes in alternating rounds (direct, token+direct, proxy, direct, ...) so that a noisy
neighbour hurts them alike. "token+direct" is what a runner does without Proxy: GetAccessToken,
then the API call with the token. Reported per mode: p50 and p99 latency and throughput, at 1 and at
``--in-flight`` requests in flight; then the p50 overhead (proxy - direct) and the throughput
ratio (proxy / direct). Targets: p50 overhead <= 1 ms, throughput >= 0.6x direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import httpx

from broker.api.credentialbroker.v1 import broker_pb2 as pb
from broker.api.credentialbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.crypto.keys import generate_key
from broker.server.callers import hash_token
from broker_devtools.bench.procs import BrokerServer, broker_env, run_cli
from broker_devtools.fakeapi import DOCUMENT

TOKEN = "bench-proxy-caller"
API_KEY = "sk-bench-api-key"
_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(DOCUMENT)).encode()
    + b"\r\n\r\n"
    + DOCUMENT
)


# -- the API -------------------------------------------------------------------------------


async def _api_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"x-api-key: " + API_KEY.encode() not in head.lower():
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                continue
            length = _LENGTH.search(head)
            if length:
                await reader.readexactly(int(length.group(1)))
            writer.write(_ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _serve_api(conn: Connection) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_api_connection, "127.0.0.1", 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())


# -- load ------------------------------------------------------------------------------------


async def _load(
    call: Callable[[], Awaitable[None]], in_flight: int, seconds: float
) -> tuple[list[float], float]:
    """Latencies (s) of every call finished in ``seconds`` with ``in_flight`` at once, and
    the calls per second."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies, len(latencies) / (time.perf_counter() - began)


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _measure(
    broker: str, api: str, iid: str, in_flights: Sequence[int], seconds: float, rounds: int
) -> dict[str, dict[str, float]]:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    results: dict[str, dict[str, float]] = {}
    async with (
        httpx.AsyncClient(base_url=api, limits=limits) as direct_http,
        grpc.aio.insecure_channel(broker) as channel,
    ):
        stub = pb_grpc.CredentialBrokerStub(channel)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        request = pb.ProxyRequest(integration_id=iid, method="GET", path="/v1/items")

        async def direct() -> None:
            response = await direct_http.get("/v1/items", headers={"X-Api-Key": API_KEY})
            assert response.status_code == 200

        async def proxied() -> None:
            response = await stub.Proxy(request, metadata=metadata)
            assert response.status == 200

        token_request = pb.GetAccessTokenRequest(integration_id=iid)

        async def token_then_direct() -> None:
            # What a runner does without Proxy: fetch the token, then call the API itself.
            token = await stub.GetAccessToken(token_request, metadata=metadata)
            response = await direct_http.get("/v1/items", headers=dict(token.headers))
            assert response.status_code == 200

        modes = (("direct", direct), ("token+direct", token_then_direct), ("proxy", proxied))
        for _name, mode in modes:  # warm-up: connections, caches
            await _load(mode, 8, 1.0)
        for in_flight in in_flights:
            samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in modes}
            for _ in range(rounds):
                for name, mode in modes:
                    latencies, rate = await _load(mode, in_flight, seconds)
                    samples[name].append((_p(latencies, 0.5), _p(latencies, 0.99), rate))
            for name, runs in samples.items():
                results[f"{name}@{in_flight}"] = {
                    "p50_ms": statistics.median(r[0] for r in runs),
                    "p99_ms": statistics.median(r[1] for r in runs),
                    "per_second": statistics.median(r[2] for r in runs),
                }
    return results


def _config(directory: Path, api_port: int) -> Path:
    config = directory / "broker.toml"
    config.write_text(
        f"""
[server]
listen = "127.0.0.1:0"
environment = "bench"
[database]
url = "sqlite+aiosqlite:///{directory / "broker.db"}"
[keys]
keys = "{generate_key("bench1")}"
[refresh]
background = false
[proxy]
max_concurrent_per_provider = 256
[providers.bench]
kinds = ["api_key"]
api_base_url = "http://127.0.0.1:{api_port}"
[callers.runner]
token_sha256 = "{hash_token(TOKEN)}"
"""
    )
    return config


async def _store(broker: str) -> str:
    async with grpc.aio.insecure_channel(broker) as channel:
        stub = pb_grpc.CredentialBrokerStub(channel)
        credential = pb.Credential()
        credential.api_key.key = API_KEY
        credential.api_key.header = "X-Api-Key"
        stored = await stub.StoreIntegration(
            pb.StoreIntegrationRequest(user_id="u1", provider="bench", credential=credential),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )
        return stored.integration.id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    parent, child = multiprocessing.Pipe()
    api_process = multiprocessing.Process(target=_serve_api, args=(child,), daemon=True)
    api_process.start()
    api_port = int(parent.recv())
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp), api_port)
        env = broker_env({"BROKER_LOG_LEVEL": "WARNING"})
        run_cli(config, env, "migrate")
        server = BrokerServer(config, broker_env({})).start()
        try:
            iid = asyncio.run(_store(server.address))
            results = asyncio.run(
                _measure(
                    server.address,
                    f"http://127.0.0.1:{api_port}",
                    iid,
                    sorted({1, args.in_flight}),
                    args.seconds,
                    args.rounds,
                )
            )
        finally:
            server.stop()
            api_process.terminate()
    for in_flight in sorted({1, args.in_flight}):
        direct, proxy = results[f"direct@{in_flight}"], results[f"proxy@{in_flight}"]
        token = results[f"token+direct@{in_flight}"]
        results[f"overhead@{in_flight}"] = {
            "p50_overhead_ms": proxy["p50_ms"] - direct["p50_ms"],
            "throughput_ratio": proxy["per_second"] / direct["per_second"],
            "p50_vs_token_then_direct_ms": proxy["p50_ms"] - token["p50_ms"],
        }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
