"""Kept for imports written before the fake moved into the package."""

from broker.testing.fakeauth import *  # noqa: F403
from broker.testing.fakeauth import FakeAuthServer, Failure, RecordedRequest

__all__ = ["FakeAuthServer", "Failure", "RecordedRequest"]
