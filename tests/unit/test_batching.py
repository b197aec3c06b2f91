"""Coalescing: one batch per loop iteration while idle, group commit while busy; a slot's
reads under their deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

import pytest

from cachesvc.metrics import Metrics
from cachesvc.slot import Batcher, TierSlot
from tests.polling import until
from tiers.base import Tier, TierTimeout, TierUnavailable, TierWrite


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await self.release.wait()
        return [item * 10 for item in items]


async def test_calls_of_one_iteration_share_a_batch() -> None:
    recorder = Recorder()
    recorder.release.set()
    batcher = Batcher(recorder.run)
    results = await asyncio.gather(*(batcher.submit(n) for n in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert recorder.batches == [[0, 1, 2, 3, 4]]


async def test_calls_made_while_busy_leave_together() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run, max_in_flight=1)
    first = batcher.submit(1)
    await asyncio.sleep(0)  # the first batch starts and blocks
    waiting = [batcher.submit(n) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    assert recorder.batches == [[1]]  # the others wait for the one in flight
    recorder.release.set()
    assert await first == 10
    assert await asyncio.gather(*waiting) == [20, 30, 40]
    assert recorder.batches == [[1], [2, 3, 4]]


async def test_a_failed_batch_fails_each_caller_and_the_next_batch_runs() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("tier down")
        return items

    batcher = Batcher(run, max_in_flight=1)
    failing = [batcher.submit(n) for n in (1, 2)]
    for waiter in failing:
        with pytest.raises(RuntimeError):
            await waiter
    assert await batcher.submit(3) == 3


async def test_a_cancelled_caller_does_not_cancel_the_others() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.run)
    gone, kept = batcher.submit(1), batcher.submit(2)
    gone.cancel()
    recorder.release.set()
    assert await kept == 20


# -- a slot's reads: followed with callbacks, under one deadline timer ---------------------


class SilentTier(Tier):
    """A remote tier whose reads never come back, as a hung server's."""

    schemes = ()

    def __init__(self) -> None:
        super().__init__("silent", urlsplit("silent://"), 60)
        self.reads: list[asyncio.Future[list[bytes | None]]] = []

    def get_many_soon(self, keys: Sequence[str]) -> asyncio.Future[list[bytes | None]]:
        self.reads.append(asyncio.get_running_loop().create_future())
        return self.reads[-1]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self.get_many_soon(keys)

    async def reading(self) -> bool:
        return bool(self.reads)

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        raise AssertionError("not written")

    async def ping(self) -> None:
        raise TierUnavailable("silent")


def silent_slot(tier: SilentTier) -> TierSlot:
    return TierSlot(
        tier, timeout=0.05, breaker_failures=2, breaker_reset=60, metrics=Metrics().for_tier("s")
    )


async def test_reads_past_the_deadline_time_out_and_give_up_their_call() -> None:
    tier = SilentTier()
    slot = silent_slot(tier)
    with pytest.raises(TierTimeout, match=r"no answer within 0\.05 s"):
        await slot.get("a")
    with pytest.raises(TierTimeout):
        await slot.get_many(["b", "c"])
    assert [read.cancelled() for read in tier.reads] == [True, True]
    assert slot.state == "open"  # two timeouts: the breaker's threshold
    with pytest.raises(TierUnavailable, match="circuit breaker open"):
        await slot.get("d")
    assert len(tier.reads) == 2  # refused without a call
    await slot.close()


async def test_a_bulk_read_given_up_gives_up_its_call() -> None:
    tier = SilentTier()
    slot = silent_slot(tier)
    reading = asyncio.ensure_future(slot.get_many(["a"]))
    await until(tier.reading, 5, "the read is sent")
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert tier.reads[0].cancelled()
    assert slot.state == "closed"  # the caller gave up: not the tier's failure
    await slot.close()
