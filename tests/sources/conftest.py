"""Durable invalidation sources against real servers, with a sink that records its calls."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest

from invalidation.base import Listener
from invalidation.events import InvalidationEvent, MalformedEvent
from tests.servers import PostgresServer, RedisServer

STOP_WITHIN = 5.0


@dataclass
class RecordingSink:
    """Records what a listener told it. A call counts once it returned (a listener records
    its progress only then); ``hold_shared`` makes ``on_shared`` wait until it is set."""

    events: list[InvalidationEvent] = field(default_factory=list)
    shared: list[InvalidationEvent] = field(default_factory=list)
    originated: list[InvalidationEvent] = field(default_factory=list)
    gaps: list[bool] = field(default_factory=list)
    disconnects: int = 0
    malformed: int = 0
    hold_shared: asyncio.Event | None = None
    shared_started: int = 0
    originate_failures: int = 0  # how many next originate() calls raise

    async def on_event(self, event: InvalidationEvent, source: str) -> None:
        self.events.append(event)

    async def on_shared(self, event: InvalidationEvent, source: str) -> None:
        self.shared_started += 1
        if self.hold_shared is not None:
            await self.hold_shared.wait()
        self.shared.append(event)

    async def originate(self, event: InvalidationEvent, source: str) -> None:
        if self.originate_failures:
            self.originate_failures -= 1
            raise RuntimeError("the tiers are down")
        self.originated.append(event)

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None:
        self.malformed += 1

    async def on_gap(self, source: str, lost: bool = True) -> None:
        self.gaps.append(lost)

    def on_disconnect(self, source: str) -> None:
        self.disconnects += 1

    def keys(self, kind: str = "events") -> Counter[str]:
        recorded: list[InvalidationEvent] = getattr(self, kind)
        return Counter(key for event in recorded for key in event.keys)


@contextlib.asynccontextmanager
async def running(listener: Listener, sink: RecordingSink) -> AsyncIterator[asyncio.Task[None]]:
    """The listener's task for the block's duration; cancelled (as a sidecar stops) after."""
    task = asyncio.create_task(listener.run(sink))
    try:
        yield task
    finally:
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=STOP_WITHIN)
        if not done:
            task.print_stack()
            raise AssertionError(f"{listener!r} did not stop within {STOP_WITHIN} s of its cancel")
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(scope="module")
def stream_redis() -> Iterator[RedisServer]:
    """A private Redis: the tests kill its clients, which a shared server must not suffer."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def logical_postgres_url() -> Iterator[str]:
    """A Postgres with wal_level=logical: ``CACHESVC_TEST_LOGICAL_POSTGRES_URL``, or a private
    throwaway cluster."""
    if url := os.environ.get("CACHESVC_TEST_LOGICAL_POSTGRES_URL"):
        yield url
        return
    with PostgresServer(logical_decoding=True) as server:
        yield server.url
