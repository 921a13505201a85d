"""The fake OAuth authorization server (a real HTTP server on loopback) and the one way tests
start it, so that a module's ``fake`` fixture differs from the shared one only in its arguments."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from broker_devtools.fakeauth import Failure, FakeAuthServer, Grant, RecordedRequest

__all__ = ["Failure", "FakeAuthServer", "Grant", "RecordedRequest", "serve_fake"]


def serve_fake(
    prepare: Callable[[FakeAuthServer], None] | None = None, **options: Any
) -> Iterator[FakeAuthServer]:
    """Run a fake for the length of a fixture (``yield from serve_fake(...)``), with the
    server's defaults unless ``options`` say otherwise; ``prepare`` registers what the test
    needs before it starts."""
    with FakeAuthServer(**options) as server:
        if prepare is not None:
            prepare(server)
        yield server
