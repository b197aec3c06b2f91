"""Write-through writes of concurrent requests are stored as one group (Engine._store_group):
what each caller is told, and what the cache tiers are known to have missed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit

import pytest

from cachesvc.engine import Engine, NewValue
from cachesvc.errors import Unavailable
from cachesvc.metrics import Metrics
from cachesvc.slot import TierSlot
from tiers.base import TierWrite
from tiers.memory import MemoryTier


class HeldTier(MemoryTier):
    """A tier behind a network: its writes land only when the test lets them."""

    in_process = False

    def __init__(self, name: str) -> None:
        super().__init__(name, urlsplit("memory://"), 3600)
        self.release = asyncio.Event()
        self.release.set()

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        await self.release.wait()
        await super().set_many(writes)


def slot(tier: MemoryTier, metrics: Metrics, timeout: float) -> TierSlot:
    return TierSlot(
        tier,
        timeout=timeout,
        breaker_failures=100,
        breaker_reset=1,
        metrics=metrics.for_tier(tier.name),
    )


@pytest.fixture
async def tiers() -> AsyncIterator[tuple[Engine, HeldTier, HeldTier]]:
    metrics = Metrics()
    cache, durable = HeldTier("l1"), HeldTier("l2")
    engine = Engine([slot(cache, metrics, 0.1), slot(durable, metrics, 0.2)], request_timeout=1)
    await engine.start()
    yield engine, cache, durable
    cache.release.set()
    durable.release.set()
    await engine.close()


def value(key: str) -> NewValue:
    return NewValue(key, b"v", "text/plain")


async def test_concurrent_writes_are_stored_and_each_caller_gets_its_version(
    tiers: tuple[Engine, HeldTier, HeldTier],
) -> None:
    engine, cache, durable = tiers
    written = await asyncio.gather(
        *(engine.write([value(f"k{n}")], "write-through") for n in range(20))
    )
    assert len({version for [version] in written}) == 20
    assert all(await durable.get_many([f"k{n}" for n in range(20)]))
    assert all(await cache.get_many([f"k{n}" for n in range(20)]))
    assert not engine.top.missed


async def test_durable_timeout_answers_503_and_marks_the_keys_missed_above(
    tiers: tuple[Engine, HeldTier, HeldTier],
) -> None:
    engine, _, durable = tiers
    durable.release.clear()  # the commit may or may not land: the caches cannot be trusted
    results = await asyncio.gather(
        *(engine.write([value(f"k{n}")], "write-through") for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(result, Unavailable) for result in results)
    assert set(engine.top.missed) == {"k0", "k1", "k2"}


async def test_a_cache_tier_that_does_not_answer_in_time_missed_the_write(
    tiers: tuple[Engine, HeldTier, HeldTier],
) -> None:
    engine, cache, durable = tiers
    cache.release.clear()
    [version] = await engine.write([value("k")], "write-through")  # durable: the promise holds
    assert engine.top.missed == {"k": version}
    assert await durable.get("k") is not None
