"""Coalescing: one batch per loop iteration while idle, group commit while busy."""

from __future__ import annotations

import asyncio

import pytest

from cachesvc.slot import Batcher


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
