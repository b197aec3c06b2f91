"""Coalescing: calls submitted in the same event-loop iteration run as one batch.

The hot path's answer to per-call client overhead (one MGET instead of N GETs, one
multi-row upsert instead of N commits): callers get a future each; the batch runs on the
next loop iteration, so it costs no added latency beyond the requests already queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    def __init__(self, run: Callable[[list[In]], Awaitable[Sequence[Out]]]) -> None:
        self._run = run
        self._items: list[In] = []
        self._waiters: list[asyncio.Future[Out]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, item: In) -> asyncio.Future[Out]:
        loop = asyncio.get_running_loop()
        if not self._items:
            loop.call_soon(self._flush)
        # One future per caller: a caller that gives up cancels only its own.
        waiter: asyncio.Future[Out] = loop.create_future()
        self._items.append(item)
        self._waiters.append(waiter)
        return waiter

    def _flush(self) -> None:
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        task = asyncio.ensure_future(self._settle(items, waiters))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, items: list[In], waiters: list[asyncio.Future[Out]]) -> None:
        try:
            results = await self._run(items)
        except Exception as exc:  # every caller gets the batch's failure
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter, result in zip(waiters, results, strict=True):
            if not waiter.done():
                waiter.set_result(result)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
