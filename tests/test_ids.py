"""Request and audit event ids: unique without a system call each, time-ordered event ids, and
no shared sequence between forked workers or with code that seeds ``random``."""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid
from multiprocessing.connection import Connection

from broker.domain import ids


def test_event_ids_are_time_ordered_version_7_uuids() -> None:
    first = ids.event_id()
    time.sleep(0.002)
    later = [ids.event_id() for _ in range(1000)]
    for text in [first, *later]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
    # Milliseconds first: an id made later never sorts before one made earlier.
    assert all(first < text for text in later)
    assert abs((uuid.UUID(first).int >> 80) - time.time() * 1000) < 5_000
    assert len(set(later)) == len(later)


def test_request_ids_are_32_hex_digits_and_unique() -> None:
    made = [ids.request_id() for _ in range(10_000)]
    assert all(len(r) == 32 and int(r, 16) >= 0 for r in made)
    assert len(set(made)) == len(made)


def test_seeding_random_does_not_repeat_ids() -> None:
    """Property-based tests (and any library) may seed the shared ``random`` generator."""
    random.seed(7)
    one = ids.request_id()
    random.seed(7)
    assert ids.request_id() != one


def _child(conn: Connection) -> None:
    conn.send([ids.request_id() for _ in range(5)])
    conn.close()


def test_forked_workers_do_not_share_a_sequence() -> None:
    """``serve --workers`` forks: each worker draws its own ids."""
    context = multiprocessing.get_context("fork")
    theirs, ours = context.Pipe()
    child = context.Process(target=_child, args=(ours,))
    child.start()
    in_child = theirs.recv()
    child.join(10)
    in_parent = [ids.request_id() for _ in range(5)]
    assert not set(in_child) & set(in_parent)
