"""Kept for imports written before the fake moved into the package."""

from broker_devtools.fakeauth import *  # noqa: F403
from broker_devtools.fakeauth import Failure, FakeAuthServer, RecordedRequest

__all__ = ["Failure", "FakeAuthServer", "RecordedRequest"]
