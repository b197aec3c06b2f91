"""Coalescing: calls submitted while a tier is busy run as one batch.

The hot path's answer to per-call client overhead (one MGET instead of N GETs, one
multi-row upsert instead of N commits). Callers get a future each. A batch starts on the
next event-loop iteration, so an idle tier adds no latency; while ``max_in_flight``
batches are already under way, new calls wait and leave together when one finishes
(group commit), so under load batches grow instead of queueing for connections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    def __init__(
        self, run: Callable[[list[In]], Awaitable[Sequence[Out]]], max_in_flight: int = 4
    ) -> None:
        self._run = run
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._scheduled = False
        self._items: list[In] = []
        self._waiters: list[asyncio.Future[Out]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # The loop of the first call, kept: asyncio.get_running_loop() checks the process
        # id with a getpid() system call every time.
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, item: In) -> asyncio.Future[Out]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if not self._scheduled and self._in_flight < self._max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)
        # One future per caller: a caller that gives up cancels only its own.
        waiter: asyncio.Future[Out] = loop.create_future()
        self._items.append(item)
        self._waiters.append(waiter)
        return waiter

    def _flush(self) -> None:
        self._scheduled = False
        if not self._items:
            return
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        self._in_flight += 1
        task = asyncio.ensure_future(self._settle(items, waiters))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, items: list[In], waiters: list[asyncio.Future[Out]]) -> None:
        try:
            results = await self._run(items)
        except BaseException as exc:  # every caller gets the batch's failure
            for waiter in waiters:
                if not waiter.done():
                    if isinstance(exc, asyncio.CancelledError):
                        waiter.cancel()
                    else:
                        waiter.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._in_flight -= 1
            if self._items and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        for waiter, result in zip(waiters, results, strict=True):
            if not waiter.done():
                waiter.set_result(result)

    async def close(self) -> None:
        """Cancel the batches under way and the calls still queued: no caller waits on."""
        for waiter in self._waiters:
            waiter.cancel()
        self._items, self._waiters = [], []
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


Result = TypeVar("Result")


def then(source: asyncio.Future[In], make: Callable[[In], Result]) -> asyncio.Future[Result]:
    """A future of ``make(source's result)``, its failure or cancellation passed on —
    completed from ``source``'s callback, without a task."""
    result: asyncio.Future[Result] = source.get_loop().create_future()

    def settle(done: asyncio.Future[In]) -> None:
        if result.done():
            return
        if done.cancelled():
            result.cancel()
        elif (failure := done.exception()) is not None:
            result.set_exception(failure)
        else:
            try:
                result.set_result(make(done.result()))
            except Exception as exc:
                result.set_exception(exc)

    source.add_done_callback(settle)
    return result


def chain(
    source: asyncio.Future[In], step: Callable[[asyncio.Future[In]], asyncio.Future[Result]]
) -> asyncio.Future[Result]:
    """A future of what ``step(source)`` — called with ``source`` once it is done, its
    failure included — comes to; without a task."""
    result: asyncio.Future[Result] = source.get_loop().create_future()

    def adopt(done: asyncio.Future[Result]) -> None:
        if result.done():
            return
        if done.cancelled():
            result.cancel()
        elif (failure := done.exception()) is not None:
            result.set_exception(failure)
        else:
            result.set_result(done.result())

    def settle(done: asyncio.Future[In]) -> None:
        if done.cancelled():
            result.cancel()
            return
        try:
            following = step(done)
        except Exception as exc:
            if not result.done():
                result.set_exception(exc)
            return
        if following.done():
            adopt(following)
        else:
            following.add_done_callback(adopt)

    source.add_done_callback(settle)
    return result
