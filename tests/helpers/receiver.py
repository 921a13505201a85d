"""A webhook receiver for tests: a real HTTP server on loopback that records every request and
answers from a script (e.g. 500 five times, then 200); and a signing secret for its endpoint."""

from __future__ import annotations

import base64
import secrets
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler

from tests.helpers.http import LoopbackServer, QuietHandler


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    status: int


class Receiver(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Received] = []
        self.script: list[int] = []  # statuses to answer first, in order; then `otherwise`
        self.otherwise = 200
        # When set, every request waits for it (a slow endpoint) before being answered.
        self.hold: threading.Event | None = None
        self.arrived = 0  # requests read, answered or not
        self.lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    receiver.arrived += 1
                if receiver.hold is not None:
                    receiver.hold.wait(60)
                with receiver.lock:
                    status = receiver.script.pop(0) if receiver.script else receiver.otherwise
                    receiver.requests.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        return Handler

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.requests)

    def delivered_ids(self) -> list[str]:
        """webhook-id of every request answered 2xx, in arrival order."""
        return [r.headers["webhook-id"] for r in self.received() if 200 <= r.status < 300]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
