"""A write-behind journal for tests: on a stream of its own, accepting any Redis
(``volatile``: the tests' servers do not all persist every write)."""

from __future__ import annotations

import uuid

from cachesvc.journal import Journal
from cachesvc.metrics import Metrics


def make_journal(
    url: str, prefix: str, max_pending: int = 100_000, replicas: int | None = None
) -> Journal:
    return Journal(
        url,
        f"{prefix}:{uuid.uuid4().hex}",
        max_pending=max_pending,
        batch=100,
        reclaim_after=30,
        max_attempts=3,
        metrics=Metrics(),
        consumer="test",
        volatile=True,
        replicas=replicas,
    )
