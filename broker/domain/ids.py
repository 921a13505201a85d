"""Identifiers that must be unique but need not be secret: request ids and audit event ids.

They come from a generator of the broker's own (seeded from the OS at start and again in every
forked worker), not from ``os.urandom``: that is a system call per id, two per call on the hot
path. Not the ``random`` module's shared generator either: other code may seed it (property-based
tests do), and ids must never repeat because of that. Anything secret — tokens, keys, grant
tokens, PKCE verifiers — comes from ``secrets``.
"""

from __future__ import annotations

import os
import random
import time

_rng = random.Random()
# A forked worker must not continue its parent's sequence (same ids in two processes).
os.register_at_fork(after_in_child=_rng.seed)


def request_id() -> str:
    """32 hex digits: a call's id when the caller sent no usable x-request-id."""
    return f"{_rng.getrandbits(128):032x}"


def event_id() -> str:
    """A time-ordered UUID (version 7, RFC 9562: milliseconds, then random bits). In time
    order a batch of audit events lands at the right edge of the primary-key index instead of
    on a random page per event, so a commit writes a few pages, not one per event."""
    rand = _rng.getrandbits(74)
    bits = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76  # version 7
        | (rand >> 62) << 64
        | 0b10 << 62  # RFC 9562 variant
        | (rand & (1 << 62) - 1)
    )
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
