"""The race between a fill (a lower-tier hit being promoted) and an invalidation: the
invalidation wins, whichever lands first (issue 4)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

import pytest

from cachesvc.engine import Engine, NewValue
from cachesvc.invalidator import Invalidator
from cachesvc.metrics import Metrics
from cachesvc.slot import TierSlot
from invalidation.events import InvalidationEvent
from tiers.base import TierWrite
from tiers.memory import MemoryTier


class SlowFillTier(MemoryTier):
    """A lower tier whose reads answer only when the test lets them: the value is read,
    then held, like a slow network reply while an invalidation arrives."""

    in_process = False

    def __init__(self) -> None:
        super().__init__("l2", urlsplit("memory://"), 3600)
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        found = await super().get_many(keys)
        self.read_done.set()
        await self.release.wait()
        return found


@pytest.fixture
async def engine() -> Engine:
    metrics = Metrics()
    top, lower = MemoryTier("l1", urlsplit("memory://"), 300), SlowFillTier()
    slots = [
        TierSlot(
            t, timeout=5, breaker_failures=3, breaker_reset=1, metrics=metrics.for_tier(t.name)
        )
        for t in (top, lower)
    ]
    engine = Engine(slots, request_timeout=10)
    # The start-up read (the record of missed keys) goes through; only later reads,
    # the fills under test, are held, and read_done marks the first of those.
    lower.release.set()
    await engine.start()
    lower.release.clear()
    lower.read_done.clear()
    yield engine
    await engine.close()


@pytest.mark.parametrize(
    "event",
    [
        InvalidationEvent(keys=("k",)),
        InvalidationEvent(tags=("t",)),
        InvalidationEvent(prefixes=("k",)),
    ],
    ids=["key", "tag", "prefix"],
)
async def test_invalidation_during_a_fill_wins(engine: Engine, event: InvalidationEvent) -> None:
    invalidator = Invalidator(engine, Metrics(), listeners=[])
    await engine.write([NewValue("k", b"old", "text/plain", tags=("t",))], "write-through")
    await engine.top.tier.clear()  # only l2 holds it: the next read fills l1
    lower = engine.slots[1].tier
    assert isinstance(lower, SlowFillTier)

    reading = engine.read("k", lambda hit: hit)  # l1 misses: a future of the fill
    assert isinstance(reading, asyncio.Future)
    await lower.read_done.wait()  # the old value is on its way up
    await invalidator.invalidate(event)
    lower.release.set()
    await reading  # began before the invalidation: either answer is linearizable

    assert await engine.read_many(["k"]) == [None]
    assert await engine.read_many(["k"]) == [None]  # and it did not come back by promotion


async def test_readers_joining_a_fill_after_an_invalidation_see_it(engine: Engine) -> None:
    invalidator = Invalidator(engine, Metrics(), listeners=[])
    await engine.write([NewValue("k", b"old", "text/plain", tags=("t",))], "write-through")
    await engine.top.tier.clear()
    lower = engine.slots[1].tier
    assert isinstance(lower, SlowFillTier)

    first = engine.read("k", lambda hit: hit)
    assert isinstance(first, asyncio.Future)
    await lower.read_done.wait()
    await invalidator.invalidate(InvalidationEvent(tags=("t",)))
    joined = engine.read("k", lambda hit: hit)  # joins the lookup already under way
    assert isinstance(joined, asyncio.Future)
    await asyncio.sleep(0)
    lower.release.set()
    await first
    assert await joined is None


class HeldStoreTier(MemoryTier):
    """A top tier whose stores land only when the test lets them: a promotion under way."""

    in_process = False

    def __init__(self) -> None:
        super().__init__("l1", urlsplit("memory://"), 300)
        self.release = asyncio.Event()
        self.release.set()

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        await self.release.wait()
        await super().set_many(writes)


async def test_a_read_answers_before_its_promotion_and_the_next_waits_for_it() -> None:
    metrics = Metrics()
    top, lower = HeldStoreTier(), MemoryTier("l2", urlsplit("memory://"), 3600)
    engine = Engine(
        [
            TierSlot(
                t, timeout=5, breaker_failures=3, breaker_reset=1, metrics=metrics.for_tier(t.name)
            )
            for t in (top, lower)
        ],
        request_timeout=10,
    )
    await engine.start()
    try:
        await engine.write([NewValue("k", b"v", "text/plain")], "write-through")
        await top.clear()
        top.release.clear()  # the promotion into l1 cannot land

        first = await engine.read("k", lambda hit: hit)
        assert first is not None and first.tier == "l2"  # answered with the copy under way
        assert await top.get("k") is None

        second = engine.read("k", lambda hit: hit)
        assert isinstance(second, asyncio.Future)
        await asyncio.sleep(0.05)  # time for a read that did not wait to be answered by l2
        assert not second.done()
        top.release.set()
        hit = await second
        assert hit is not None and hit.tier == "l1" and hit.entry.value == b"v"
    finally:
        top.release.set()
        await engine.close()
