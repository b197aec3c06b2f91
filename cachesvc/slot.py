"""One configured tier as the engine sees it.

A ``TierSlot`` wraps a ``tiers.Tier`` with what every backend needs the same way:

- **coalescing**: single-key gets and sets made in the same event-loop iteration are sent
  as one ``get_many``/``set_many`` call (one MGET, multi-get, ``= ANY($1)`` or multi-row
  upsert), and concurrent gets of one key share one lookup (``Batcher``,
  which the journal and the invalidator use for their Redis calls too);
- **a timeout per call** and **a circuit breaker**: after ``breaker_failures`` consecutive
  failures calls fail fast; ``breaker_reset`` seconds later the engine's tier monitor
  pings the tier (half-open) and a success closes the breaker;
- **missed keys**: a write or delete this tier could not take is remembered, the tier is
  not read for that key, and the key is deleted from it (a tombstone) once it answers
  again — so it never serves a value it missed the replacement of. When too many keys
  are missed to remember, the tier is not read at all for one tier ttl, after which
  everything it held from before has expired.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import msgpack

from cachesvc.metrics import Buckets, TierMetrics
from tiers.base import Payload, Tier, TierError, TierTimeout, TierUnavailable, TierWrite

log = logging.getLogger(__name__)
T = TypeVar("T")
In = TypeVar("In")
Out = TypeVar("Out")

TOMBSTONE_TTL = 60.0
"""How long a delete's tombstone blocks older writes: far longer than any in-flight fill
(bounded by the request deadline) or write-behind retry can take to land."""

MAX_MISSED_KEYS = 100_000

STILL_DOWN_LOG_INTERVAL = 60.0
"""While a tier stays down its breaker re-opens after every failed probe (each
``breaker_reset`` seconds): that is logged at debug level, with a warning this often."""


def failed_future(
    error: BaseException, loop: asyncio.AbstractEventLoop | None = None
) -> asyncio.Future[Any]:
    """A future that failed with ``error`` already."""
    failed: asyncio.Future[Any] = (loop or asyncio.get_running_loop()).create_future()
    failed.set_exception(error)
    return failed


def failure_cause(exc: BaseException) -> str:
    """What went wrong, for a log line that already names the tier: the driver's own
    message (tiers raise their errors ``from`` it), else the error's."""
    cause = exc.__cause__
    return str(cause) if cause is not None and str(cause) else str(exc) or type(exc).__name__


class PartlyFailed(TierUnavailable):
    """Some writes of a ``set_many`` were not taken (their node failed) and the others
    were: ``failed`` lists those to record as missed."""

    def __init__(self, message: str, failed: Sequence[TierWrite]) -> None:
        super().__init__(message)
        self.failed = list(failed)


def missed_writes(failure: BaseException, writes: Sequence[TierWrite]) -> Sequence[TierWrite]:
    """Which of ``writes`` a ``set_many`` that raised ``failure`` did not store."""
    return failure.failed if isinstance(failure, PartlyFailed) else writes


class Slot(Protocol):
    """One configured tier as the engine sees it: a ``TierSlot``, or a ``NodeSlots`` made
    of one ``TierSlot`` per node of a tier of independent nodes (cachesvc/nodes.py)."""

    tier: Tier
    name: str
    ttl: float
    metrics: TierMetrics

    @property
    def parts(self) -> Sequence[TierSlot]:
        """The ``TierSlot``\\s it is made of, each with its own breaker and missed keys."""

    @property
    def state(self) -> str: ...

    @property
    def missed(self) -> dict[str, int]: ...

    def readable(self, key: str) -> bool: ...

    def get(self, key: str) -> asyncio.Future[Payload | None]: ...

    def get_now(self, key: str) -> Payload | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]: ...

    def set(self, write: TierWrite) -> Awaitable[None]: ...

    async def set_many(self, writes: Sequence[TierWrite]) -> None: ...

    def miss(self, key: str, version: int) -> None: ...

    async def repair(self) -> None: ...

    async def probe(self) -> bool: ...

    async def close(self) -> None: ...


class Batcher(Generic[In, Out]):
    """Coalescing: calls submitted while a tier is busy run as one batch.

    The hot path's answer to per-call client overhead (one MGET instead of N GETs, one
    multi-row upsert instead of N commits). Callers get a future each. A batch starts on
    the next event-loop iteration, so an idle tier adds no latency; while
    ``max_in_flight`` batches are already under way, new calls wait and leave together
    when one finishes (group commit), so under load batches grow instead of queueing for
    connections.

    ``run`` is a coroutine function, run as a task, or a function returning a future,
    followed with a callback: no task per batch (the read path of a tier whose client
    completes futures from its read callback). ``finish(items, batch)``, called in that
    callback once the batch is done, makes the callers' results of it (by default its
    result) or raises what they all get: a caller's result is one callback away from the
    server's reply, whatever the batch's own accounting.
    """

    def __init__(
        self,
        run: Callable[[list[In]], Awaitable[Any]],
        max_in_flight: int = 4,
        finish: Callable[[list[In], asyncio.Future[Any]], Sequence[Out]] | None = None,
    ) -> None:
        self._run = run
        self._finish = finish or _result
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._scheduled = False
        self._items: list[In] = []
        self._waiters: list[asyncio.Future[Out]] = []
        self._batches: set[asyncio.Future[Sequence[Out]]] = set()
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
        waiters = self._waiters
        items, self._items, self._waiters = self._items, [], []
        self._in_flight += 1
        batch = asyncio.ensure_future(self._run(items))  # a future stays itself
        self._batches.add(batch)
        batch.add_done_callback(lambda done: self._settle(done, items, waiters))

    def _settle(
        self, batch: asyncio.Future[Any], items: list[In], waiters: list[asyncio.Future[Out]]
    ) -> None:
        self._batches.discard(batch)
        self._in_flight -= 1
        if self._items and not self._scheduled:
            self._scheduled = True
            batch.get_loop().call_soon(self._flush)
        try:
            results = self._finish(items, batch)
        except asyncio.CancelledError:
            for waiter in waiters:
                waiter.cancel()
            return
        except Exception as failure:  # every caller gets the batch's failure
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(failure)
            return
        for waiter, result in zip(waiters, results, strict=True):
            if not waiter.done():
                waiter.set_result(result)

    async def close(self) -> None:
        """Cancel the batches under way and the calls still queued: no caller waits on."""
        for waiter in self._waiters:
            waiter.cancel()
        self._items, self._waiters = [], []
        for batch in list(self._batches):
            batch.cancel()
        await asyncio.gather(*self._batches, return_exceptions=True)


def _result(items: object, batch: asyncio.Future[Any]) -> Any:
    return batch.result()


class Deadlines:
    """Calls under way (a slot's batches, the engine's lookups below the top tier), with
    when each started, kept with one timer instead of one each: a call not done within
    ``timeout`` is cancelled (a pipelined client closes that call's connection) and
    ``expired()`` makes the error it fails with. Calls start in order and share one
    timeout, so their deadlines come in order too."""

    def __init__(self, timeout: float, expired: Callable[[], Exception]) -> None:
        self.timeout = timeout
        self._make_error = expired
        self._started: collections.OrderedDict[asyncio.Future[Any], float] = (
            collections.OrderedDict()
        )
        self._expired: dict[asyncio.Future[Any], Exception] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, loop: asyncio.AbstractEventLoop, call: asyncio.Future[Any]) -> None:
        started = self._started[call] = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(started + self.timeout, self._expire, loop)

    def done(self, call: asyncio.Future[Any]) -> float | None:
        """Forget ``call``, done: how long it took (None if it was never watched). Raises
        the error ``expired()`` made if it was cancelled for its deadline."""
        expired = self._expired.pop(call, None)
        if expired is not None:
            raise expired
        started = self._started.pop(call, None)
        return None if started is None else call.get_loop().time() - started

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        started = self._started
        expired = []
        # Oldest first, up to the first call still in time: not every call under way.
        for call, since in started.items():
            if call.done():  # answered, its callback not run yet: it did not time out
                continue
            if since + self.timeout > now:
                self._timer = loop.call_at(since + self.timeout, self._expire, loop)
                break
            expired.append(call)
        for call in expired:
            del started[call]
            self._expired[call] = self._make_error()
            call.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class CircuitBreaker:
    """Closed -> (``failures`` consecutive failures) -> open -> (``reset`` s) -> half-open,
    where one probe call decides: success closes, failure opens again.

    Its log lines name the tier (``name``) and the last failure's cause: opening is a
    warning, closing again an info line; the probes in between are debug lines, with a
    warning every ``STILL_DOWN_LOG_INTERVAL`` seconds while the tier stays down."""

    def __init__(
        self,
        failures: int,
        reset: float,
        on_change: Callable[[str], None] | None = None,
        name: str = "?",
    ) -> None:
        self.threshold = failures
        self.reset = reset
        self.name = name
        self.state = "closed"
        self._failures = 0
        self._retry_at = 0.0
        self._on_change = on_change
        self._last_cause = "unknown"
        self._opened_at = 0.0  # monotonic: when it last left "closed"
        self._said_down_at = 0.0

    def allow(self, probe: bool = False) -> bool:
        """Whether a call may go to the tier. Only a ``probe`` (the tier monitor's ping)
        half-opens an open breaker: no client request waits on a tier still down."""
        if self.state == "closed":
            return True
        if probe and self.state == "open" and time.monotonic() >= self._retry_at:
            self._set("half-open")
            return True
        return False  # open, or half-open with its probe in flight

    def success(self) -> None:
        self._failures = 0
        if self.state != "closed":
            self._set("closed")

    def failure(self, cause: str = "") -> None:
        self._failures += 1
        if cause:
            self._last_cause = cause
        if self.state == "half-open" or self._failures >= self.threshold:
            self._retry_at = time.monotonic() + self.reset
            if self.state != "open":
                self._set("open")

    def _set(self, state: str) -> None:
        previous, self.state = self.state, state
        self._log_change(previous, state)
        if self._on_change is not None:
            self._on_change(state)

    def _log_change(self, previous: str, state: str) -> None:
        now = time.monotonic()
        if state == "open" and previous == "closed":
            self._opened_at = self._said_down_at = now
            log.warning(
                "tier %s: circuit breaker open after %d failures (last: %s)",
                self.name,
                self._failures,
                self._last_cause,
            )
        elif state == "open":  # the half-open probe failed
            if now - self._said_down_at >= STILL_DOWN_LOG_INTERVAL:
                self._said_down_at = now
                log.warning(
                    "tier %s: still unreachable after %.0f s (last: %s)",
                    self.name,
                    now - self._opened_at,
                    self._last_cause,
                )
            else:
                log.debug("tier %s: probe failed (%s)", self.name, self._last_cause)
        elif state == "half-open":
            log.debug("tier %s: circuit breaker half-open, probing", self.name)
        else:
            log.info(
                "tier %s: circuit breaker closed, the tier answers again (after %.1f s)",
                self.name,
                now - self._opened_at,
            )


class TierSlot:
    def __init__(
        self,
        tier: Tier,
        *,
        timeout: float,
        breaker_failures: int,
        breaker_reset: float,
        metrics: TierMetrics,
    ) -> None:
        self.tier = tier
        self.name = tier.name
        self.ttl = tier.ttl
        self.timeout = timeout
        self.metrics = metrics
        self.breaker = CircuitBreaker(
            breaker_failures, breaker_reset, metrics.breaker, name=tier.name
        )
        # key -> version of the newest write this tier missed for it
        self.missed: dict[str, int] = {}
        self.missed_changed = False  # not yet recorded in the durable tier
        self._blind_until = 0.0  # monotonic; while in the future, the tier is not read
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines = Deadlines(timeout, self._timed_out)
        self._gets = Batcher(self._get_batch, finish=self._got_batch)
        self._sets = Batcher(self._set_batch, finish=self._set_done)

    @property
    def parts(self) -> Sequence[TierSlot]:
        return (self,)

    # -- reads ---------------------------------------------------------------------------

    def readable(self, key: str) -> bool:
        """Whether this tier may answer for ``key``: it did not miss a write of it."""
        if self._blind_until and time.monotonic() < self._blind_until:
            return False
        return key not in self.missed

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop, kept from the first call: asyncio.get_running_loop() costs a
        getpid() each time."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def get(self, key: str) -> asyncio.Future[Payload | None]:
        """The payload of ``key``, as a future: already done for an in-process tier, so a
        caller can check ``done()`` and go on without waiting (the front door does)."""
        if not self.tier.in_process:
            return self._gets.submit(key)
        answer: asyncio.Future[Payload | None] = self._running_loop().create_future()
        try:
            answer.set_result(self.tier.get_now(key))
        except TierError as exc:
            answer.set_exception(exc)
        return answer

    def get_now(self, key: str) -> Payload | None:
        """The payload of ``key`` in an in-process tier, which answers without waiting."""
        return self.tier.get_now(key)

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]:
        """One call for ``keys`` (already a batch), under the timeout and breaker."""
        batch = list(keys)
        found = self._get_batch(batch)
        await self._finished(found)
        return self._got_batch(batch, found)

    async def _finished(self, call: asyncio.Future[Any]) -> None:
        """Wait for a batch this slot started; its failure comes out of its ``_done``."""
        try:
            await asyncio.wait((call,))
        except asyncio.CancelledError:  # the caller gave up: so does the call
            call.cancel()
            with contextlib.suppress(TierError):
                self._deadlines.done(call)
            if call.done() and not call.cancelled():
                call.exception()  # done meanwhile, a failure no one will ask for
            raise

    def _get_batch(self, keys: list[str]) -> asyncio.Future[list[Payload | None]]:
        """One ``get_many_soon`` of the tier (``_send``); ``_got_batch`` makes the result."""
        unique = list(dict.fromkeys(keys)) if len(keys) > 1 else keys  # one lookup per key
        return self._send(self.tier.get_many_soon, unique, self.metrics.get_batch)

    def _got_batch(
        self, keys: list[str], found: asyncio.Future[list[Payload | None]]
    ) -> list[Payload | None]:
        """The payloads of ``keys`` from the tier's answer ``found`` (done), its failure
        counted by the breaker."""
        values = self._outcome(found, self.metrics.get_duration)
        if len(values) < len(keys):  # concurrent gets of one key were asked once
            by_key = dict(zip(dict.fromkeys(keys), values, strict=True))
            values = [by_key[key] for key in keys]
        return values

    def _outcome(self, call: asyncio.Future[T], duration: Buckets) -> T:
        """The result of a batch this slot started (done), its time observed and its
        failure counted by the breaker; the TierTimeout of one cancelled for its deadline."""
        took = self._deadlines.done(call)
        if took is not None:
            duration.observe(took)
        try:
            result = call.result()
        except TierError as exc:
            if took is not None:  # (one refused or failed before any I/O is counted already)
                self._failed(exc)
            raise
        self.breaker.success()
        return result

    def _failed(self, failure: TierError) -> None:
        self.breaker.failure(failure_cause(failure))
        self.metrics.error("unavailable")

    def _refused(self) -> TierUnavailable:
        self.metrics.error("open")
        return TierUnavailable(f"tier {self.name}: circuit breaker open")

    def _timed_out(self) -> TierTimeout:
        self.breaker.failure(f"no answer within {self.timeout:g} s")
        self.metrics.error("timeout")
        return TierTimeout(f"tier {self.name}: no answer within {self.timeout} s")

    # -- writes --------------------------------------------------------------------------

    def set(self, write: TierWrite) -> Awaitable[None]:
        if self.tier.in_process:
            return self.tier.set(write)
        return self._sets.submit(write)

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        """One call for ``writes`` (already a batch), under the timeout and breaker."""
        batch = list(writes)
        stored = self._set_batch(batch)
        await self._finished(stored)
        self._set_done(batch, stored)

    def _set_batch(self, writes: list[TierWrite]) -> asyncio.Future[None]:
        """One ``set_many_soon`` of the tier (``_send``); ``_set_done`` makes the result."""
        return self._send(self.tier.set_many_soon, writes, self.metrics.set_batch)

    def _send(
        self, call: Callable[[list[In]], asyncio.Future[T]], batch: list[In], sizes: Buckets
    ) -> asyncio.Future[T]:
        """``call(batch)``, a batch of the tier, under the breaker and the deadline
        (``Deadlines``): no task, no timer of its own."""
        loop = self._running_loop()
        if not self.breaker.allow():
            return failed_future(self._refused(), loop)
        sizes.observe(len(batch))
        try:
            sent = call(batch)
        except TierError as exc:  # raised before any I/O (a tier not started)
            self._failed(exc)
            return failed_future(exc, loop)
        self._deadlines.watch(loop, sent)
        return sent

    def _set_done(self, writes: list[TierWrite], stored: asyncio.Future[None]) -> list[None]:
        self._outcome(stored, self.metrics.set_duration)
        return [None] * len(writes)

    def miss(self, key: str, version: int) -> None:
        """Remember that this tier missed the write of ``key`` at ``version``."""
        if len(self.missed) >= MAX_MISSED_KEYS:
            log.warning(
                "tier %s missed more than %d keys: not read for %.0f s",
                self.name,
                MAX_MISSED_KEYS,
                self.ttl,
            )
            self._blind_until = time.monotonic() + self.ttl
            self.missed.clear()
        else:
            self.missed[key] = max(version, self.missed.get(key, 0))
        self.missed_changed = True
        self.metrics.missed_keys.set(len(self.missed))

    async def repair(self) -> None:
        """Delete every missed key from the tier.

        The tombstone carries the missed write's own version: it replaces anything older
        the tier may hold, and a promotion of that very write (equal version) may still
        refill the tier right after.
        """
        missed = list(self.missed.items())
        for start in range(0, len(missed), 1000):
            batch = missed[start : start + 1000]
            await self.set_many([TierWrite(k, None, v, TOMBSTONE_TTL) for k, v in batch])
            for key, version in batch:
                if self.missed.get(key) == version:  # not missed again meanwhile
                    del self.missed[key]
            self.missed_changed = True
            self.metrics.repaired_keys.inc(len(batch))
            self.metrics.missed_keys.set(len(self.missed))
        if missed:
            log.info("tier %s repaired: %d missed keys deleted", self.name, len(missed))

    # -- guarded calls -------------------------------------------------------------------

    async def call(self, operation: Awaitable[T], probe: bool = False) -> T:
        """Run one tier operation under this tier's timeout and circuit breaker."""
        if not self.breaker.allow(probe):
            if asyncio.iscoroutine(operation):
                operation.close()
            raise self._refused()
        try:
            async with asyncio.timeout(self.timeout):
                result = await operation
        except TimeoutError:
            raise self._timed_out() from None
        except TierError as exc:
            self._failed(exc)
            raise
        self.breaker.success()
        return result

    async def probe(self) -> bool:
        """Ping the tier (through the breaker); True when it answered."""
        try:
            await self.call(self.tier.ping(), probe=True)
        except TierError:
            return False
        return True

    @property
    def state(self) -> str:
        return self.breaker.state

    async def close(self) -> None:
        await self._gets.close()
        await self._sets.close()
        self._deadlines.cancel()
        await self.tier.close()


MAX_RECORDED_KEYS = 10_000  # per tier; past it the record says "do not read the tier"


def save_missed(slots: Sequence[TierSlot]) -> bytes:
    """The missed keys of ``slots`` as one record (see Engine._sync_missed)."""
    record: dict[str, Any] = {}
    now, wall = time.monotonic(), time.time()
    for slot in slots:
        blind_until = slot._blind_until
        if len(slot.missed) > MAX_RECORDED_KEYS:
            blind_until = max(blind_until, now + slot.ttl)
        record[slot.name] = {
            "keys": {} if len(slot.missed) > MAX_RECORDED_KEYS else slot.missed,
            "blind_until": wall + (blind_until - now) if blind_until > now else 0,
        }
    payload: bytes = msgpack.packb(record)
    return payload


def restore_missed(slots: Sequence[TierSlot], payload: Payload | None) -> None:
    """Merge a record written by this sidecar before it restarted."""
    if payload is None:
        return
    try:
        record = msgpack.unpackb(payload)
    except (ValueError, msgpack.UnpackException):
        log.warning("unreadable record of missed keys: ignored")
        return
    now, wall = time.monotonic(), time.time()
    for slot in slots:
        saved = record.get(slot.name) if isinstance(record, dict) else None
        if not saved:
            continue
        for key, version in saved.get("keys", {}).items():
            slot.miss(key, version)
        if saved.get("blind_until", 0) > wall:
            slot._blind_until = max(slot._blind_until, now + saved["blind_until"] - wall)
        log.info(
            "tier %s: %d missed keys restored from before a restart", slot.name, len(slot.missed)
        )
