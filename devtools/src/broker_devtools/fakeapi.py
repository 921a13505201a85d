"""A provider's REST API on loopback, for Proxy's tests and benchmark: a real HTTP server that
records every request it gets and answers a small JSON document (or what a test scripts).

    with FakeApi() as api:
        api.url                     # http://127.0.0.1:PORT
        api.accept = lambda req: req.headers.get("authorization") == "Bearer t"
        api.script("/v1/moved", 302, {"Location": "https://elsewhere.example/"})
        api.requests                # [RecordedApiRequest(method, path, query, headers, body)]
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# About 1 KB of JSON: what a typical small API answer weighs.
DOCUMENT = json.dumps(
    {
        "ok": True,
        "items": [{"id": i, "name": f"item-{i:04d}", "tags": ["a", "b"]} for i in range(24)],
    }
).encode()


@dataclass
class RecordedApiRequest:
    method: str
    # The path as received, percent-encoding kept.
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes = field(repr=False)


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    times: int | None  # None: every time


class FakeApi:
    def __init__(self, record: bool = True) -> None:
        self.record = record
        self.requests: list[RecordedApiRequest] = []
        # Decides whether a request's credential is good; False answers 401.
        self.accept: Callable[[RecordedApiRequest], bool] = lambda _request: True
        self._scripts: dict[str, _Answer] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def script(
        self,
        path: str,
        status: int,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        times: int | None = None,
    ) -> None:
        """Answer requests to ``path`` (without query) with this, ``times`` times or always."""
        with self._lock:
            self._scripts[path] = _Answer(status, dict(headers or {}), body, times)

    def _answer(self, path: str) -> _Answer | None:
        with self._lock:
            answer = self._scripts.get(path)
            if answer is None:
                return None
            if answer.times is not None:
                answer.times -= 1
                if answer.times <= 0:
                    del self._scripts[path]
            return answer

    def start(self) -> FakeApi:
        api = self

        class Handler(_Handler):
            owner = api

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    owner: FakeApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        request = RecordedApiRequest(
            method=self.command,
            path=split.path,
            query=parse_qsl(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        owner = self.owner
        if owner.record:
            with owner._lock:
                owner.requests.append(request)
        answer = owner._answer(split.path)
        if answer is None and not owner.accept(request):
            answer = _Answer(401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, b"", None)
        if answer is None:
            answer = _Answer(
                200,
                {"Content-Type": "application/json", "Set-Cookie": "session=abc"},
                DOCUMENT,
                None,
            )
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle
