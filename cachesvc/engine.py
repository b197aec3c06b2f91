"""The engine: ordered tiers, the read path with promotion, and the write strategies.

Reads go top-down; a hit in tier *i* is copied into every tier above it (TTL =
min(remaining lifetime, that tier's ttl)) as the read answers: the answer does not wait
for the copies, a read of the key through this sidecar does, so the next read is served
by the top tier. Concurrent misses of one key share one lookup of the lower tiers.

Writes follow SPEC §3:

============== ============================================================ =====
strategy       before the answer                                            code
============== ============================================================ =====
write-through  durable (bottom) tier, then every tier above it              204
cache-aside    durable tier; a tombstone in every tier above it             204
write-behind   top tier and the durable journal (cachesvc.journal)          202
============== ============================================================ =====

Every write gets a version from ``VersionClock``; tiers refuse to replace a newer version,
so the order in which tiers receive writes, promotions and tombstones never matters. A
cache tier that fails a write is skipped and remembers the key as missed (see
``cachesvc.slot``); the tier a strategy needs failing turns into 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, NoReturn, TypeVar, overload

from cachesvc.config import Strategy
from cachesvc.envelope import Entry, decode_live
from cachesvc.errors import Unavailable, Unsupported
from cachesvc.journal import REDIS_ERRORS, Journal, Record, drain
from cachesvc.markers import Markers
from cachesvc.slot import (
    TOMBSTONE_TTL,
    Batcher,
    Deadlines,
    Slot,
    failed_future,
    missed_writes,
    restore_missed,
    save_missed,
)
from cachesvc.versions import NodeLease, VersionClock
from tiers.base import Marker, Payload, TierError, TierTimeout, TierWrite

log = logging.getLogger(__name__)
T = TypeVar("T")
In = TypeVar("In")
Mid = TypeVar("Mid")
Result = TypeVar("Result")

MONITOR_INTERVAL = 0.5


def _itself(value: T) -> T:
    return value


def _raising(error: BaseException) -> Callable[[object], NoReturn]:
    """A ``make`` that fails with ``error`` whatever it is given."""

    def fail(_: object) -> NoReturn:
        raise error

    return fail


def _all_settled(
    calls: Sequence[asyncio.Future[Any]], timeout: float | None = None
) -> asyncio.Future[list[Any]]:
    """A future of what each of ``calls`` returned or raised, once all are done; or of
    TimeoutError after ``timeout`` seconds (if given), those still under way cancelled
    then. At most one timer and a callback per call: no task."""
    loop = asyncio.get_running_loop()
    settled: asyncio.Future[list[Any]] = loop.create_future()
    remaining = len(calls)
    if not calls:
        settled.set_result([])
        return settled

    def expire() -> None:
        if not settled.done():
            settled.set_exception(TimeoutError())
            for call in calls:
                call.cancel()

    timer = None if timeout is None else loop.call_later(timeout, expire)

    def one_done(_: asyncio.Future[Any]) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not settled.done():
            if timer is not None:
                timer.cancel()
            settled.set_result([_outcome(call) for call in calls])

    for call in calls:
        call.add_done_callback(one_done)
    return settled


def _outcome(call: asyncio.Future[Any]) -> Any:
    """What a done ``call`` returned, or raised (its exception as a value)."""
    if call.cancelled():
        return asyncio.CancelledError()
    return call.exception() or call.result()


async def _false() -> bool:
    return False


# Futures made from futures, completed from their callbacks: a read or write that needs no
# I/O of its own, or waits on one batch, runs no task.


def _complete(result: asyncio.Future[Result], make: Callable[[In], Result], value: In) -> None:
    """Complete ``result`` with ``make(value)``, or with what ``make`` raised."""
    if result.done():
        return
    try:
        result.set_result(make(value))
    except Exception as exc:
        result.set_exception(exc)


def _pass_on(
    result: asyncio.Future[Result], make: Callable[[In], Result], done: asyncio.Future[In]
) -> None:
    """Complete ``result`` with ``make`` of ``done``'s result, or with its failure or
    cancellation."""
    if result.done():
        return
    if done.cancelled():
        result.cancel()
    elif (failure := done.exception()) is not None:
        result.set_exception(failure)
    else:
        _complete(result, make, done.result())


def then(source: asyncio.Future[In], make: Callable[[In], Result]) -> asyncio.Future[Result]:
    """A future of ``make(source's result)``, its failure or cancellation passed on —
    completed from ``source``'s callback, without a task."""
    result: asyncio.Future[Result] = source.get_loop().create_future()
    source.add_done_callback(functools.partial(_pass_on, result, make))
    return result


def chain(
    source: asyncio.Future[In],
    step: Callable[[asyncio.Future[In]], Mid | asyncio.Future[Mid]],
    make: Callable[[Mid], Result],
) -> asyncio.Future[Result]:
    """A future of ``make`` of what ``step(source)`` — called with ``source`` once it is
    done, its failure included — comes to: a value, or a future's result; without a task.
    (``make`` in the same future: each future between costs a callback's turn.)"""
    result: asyncio.Future[Result] = source.get_loop().create_future()

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
        if not isinstance(following, asyncio.Future):
            _complete(result, make, following)
        elif following.done():
            _pass_on(result, make, following)
        else:
            following.add_done_callback(functools.partial(_pass_on, result, make))

    source.add_done_callback(settle)
    return result


class _StoreJob(NamedTuple):
    """One caller's writes for ``Engine._store``."""

    durable_writes: Sequence[TierWrite]
    cache_writes: Sequence[tuple[Slot, TierWrite]]
    deadline: float  # event-loop time


class Hit(NamedTuple):
    entry: Entry
    tier: str


class Unflushed(NamedTuple):
    """A write-behind write of this process not yet applied below the top tier."""

    entry: Entry
    payload: bytes
    until: float  # wall-clock time when the top tier would have dropped it anyway
    journal_id: bytes | None  # its journal entry, once the journal recorded it


class NewValue(NamedTuple):
    key: str
    value: bytes
    content_type: str
    ttl: float | None = None
    tags: tuple[str, ...] = ()
    # ``value`` is ciphertext: an encrypted namespace seals it before the engine sees it
    # (cachesvc.namespaces), so that every tier and the journal hold it sealed, and its
    # reads give it back sealed for the namespace to open.
    sealed: bool = False


class Engine:
    def __init__(
        self,
        slots: Sequence[Slot],
        request_timeout: float,
        journal: Journal | None = None,
        drain_timeout: float = 10.0,
        identity: str = "cachesvc",
    ) -> None:
        if not slots:
            raise ValueError("the engine needs at least one tier")
        self.slots = list(slots)
        self.top = self.slots[0]
        self.durable = self.slots[-1]
        self.clock = VersionClock()
        # A node number unique among the sidecars sharing the durable tier (an in-process
        # durable tier is this process's alone).
        self.lease = None if self.durable.tier.in_process else NodeLease(self.clock, identity)
        self.request_timeout = request_timeout
        self.journal = journal
        self.drain_timeout = drain_timeout
        # Names this sidecar's record of missed keys: stable across restarts in one pod.
        self.identity = identity
        self._missed_loaded = False
        # Writes that a cache tier missed are answered only after an attempt to record the
        # miss in the durable tier (if that fails, the monitor retries every round);
        # concurrent ones share one record write.
        self._missed_records: Batcher[None, None] = Batcher(self._record_missed_batch)
        self._stores: Batcher[_StoreJob, None] = Batcher(self._store_group)
        # An entry lives at most the sum of the tier ttls after its version (every
        # promotion may restart a tier's ttl): markers older than that hide nothing.
        self.markers = Markers(max_age=sum(slot.ttl for slot in self.slots))
        self._flights: dict[str, asyncio.Future[Hit | None]] = {}
        # Promotions under way, by key: the copies a read answered without waiting for.
        self._promoting: dict[str, asyncio.Future[list[Any]]] = {}
        self._searches = Deadlines(request_timeout, self._search_expired)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Write-behind writes of this process not yet applied below the top tier (by this
        # sidecar or a peer): reads that miss the top tier (evicted, or it failed) still see
        # them, unless a newer write or an invalidation covers the key.
        self._unflushed: dict[str, Unflushed] = {}
        # Set by the invalidator while an invalidation source is lost: events may be
        # missed, so only the durable tier is read.
        self.blind = False
        # Tells the peers' in-process tiers that keys have newer versions (set by the
        # invalidator when this sidecar's fleet has in-process tiers); the write is
        # answered once they were told.
        self.announce: Callable[[Sequence[tuple[str, int]]], asyncio.Future[None]] | None = None
        # Keeps markers for every sidecar (set by the invalidator: its marker store).
        self.keep_markers: Callable[[Sequence[Marker]], Awaitable[None]] | None = None
        self._missed_markers: dict[str, int] = {}  # key -> the newest version it hides
        self._monitor: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._stop_flushing = asyncio.Event()
        # Views of this engine over fewer tiers (``view``), each with the start of its keys.
        self._views: list[tuple[str, Engine]] = []

    def view(self, slots: Sequence[Slot], keys_from: str) -> Engine:
        """This engine over ``slots`` (some of its tiers, in their order) for the keys that
        start with ``keys_from``: its reads, writes and deletes reach those tiers only. The
        rest is shared: markers, version clock, journal, lookups, overlay, ``blind``.
        Write-behind records of its keys are applied to its tiers (``apply_write_behind``).
        """
        view = _View(self, slots)
        self._views.append((keys_from, view))
        return view

    async def start(self) -> None:
        for slot in self.slots:
            await slot.tier.start()
        await self._sync_missed()  # before serving: what was missed before a restart
        await self._keep_lease()
        if self.journal is not None:
            try:
                await self.journal.check_durability()
            except REDIS_ERRORS as exc:  # the flusher checks again once it can
                log.warning("write-behind journal unreachable at start: %s", exc)
        self._monitor = asyncio.create_task(self._watch_tiers(), name="cachesvc-tier-monitor")
        if self.journal is not None and len(self.slots) > 1:
            self._flusher = asyncio.create_task(
                self.journal.run(self.apply_write_behind, self._stop_flushing),
                name="cachesvc-write-behind",
            )

    async def close(self) -> None:
        if self._flusher is not None:
            drained = await drain(self._flusher, self._stop_flushing, self.drain_timeout)
            if not drained:
                log.warning(
                    "write-behind journal not drained within %.1f s; the pending writes "
                    "stay in the journal for the next start or a peer",
                    self.drain_timeout,
                )
        if self.journal is not None:
            await self.journal.close()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        for _, view in self._views:
            await view._stores.close()
        await self._stores.close()
        await self._sync_missed()  # the last repairs, for the next start
        await self._missed_records.close()
        if self.lease is not None:
            await self.lease.release(self.durable)
        for slot in self.slots:
            await slot.close()
        self._searches.cancel()

    # -- reads ---------------------------------------------------------------------------

    def read(
        self, key: str, make: Callable[[Hit | None], Result]
    ) -> Result | asyncio.Future[Result]:
        """``make`` of the live entry of ``key`` from the highest tier holding one
        (promoted into the tiers above it), or of None. An in-process top tier's hit
        comes back as it is (``make`` called at once), a remote top tier's as a future
        completed from its batch's callback; only a read that goes below the top tier runs
        a task. Fails with Unavailable when no tier could answer for certain.

        While ``blind`` (an invalidation source is lost, so events may be missed), only
        the durable tier is read: no cache tier can be trusted for what it might have been
        told to drop."""
        if self._promoting:
            promoting = self._promoting.get(key)
            if promoting is not None:
                return chain(promoting, lambda _: self.read(key, _itself), make)
        top = self.top
        if self.blind and len(self.slots) > 1:
            return then(self._read_below(key, floor=0, top_failed=False), make)
        if not top.readable(key):
            return then(self._read_below(key, floor=0, top_failed=False), make)
        if top.tier.in_process:
            try:
                payload = top.get_now(key)
            except TierError:
                return then(self._read_below(key, floor=0, top_failed=True), make)
            found = self._top_answered(key, payload)
            return then(found, make) if isinstance(found, asyncio.Future) else make(found)
        return chain(top.get(key), lambda answer: self._after_top(key, answer), make)

    async def read_many(self, keys: Sequence[str]) -> list[Hit | None]:
        reads = [self.read(key, _itself) for key in keys]
        pending = [read for read in reads if isinstance(read, asyncio.Future)]
        if pending:
            await asyncio.gather(*pending)
        return [read.result() if isinstance(read, asyncio.Future) else read for read in reads]

    def _after_top(
        self, key: str, answer: asyncio.Future[Payload | None]
    ) -> Hit | asyncio.Future[Hit | None] | None:
        failure = answer.exception()
        if failure is not None:
            if isinstance(failure, TierError):
                return self._read_below(key, floor=0, top_failed=True)
            raise failure
        return self._top_answered(key, answer.result())

    def _top_answered(self, key: str, payload: Payload | None) -> Hit | asyncio.Future[Hit | None]:
        """A hit in what the top tier answered for ``key``, or the read goes below."""
        top = self.top
        entry = decode_live(payload, time.time())
        floor = 0
        if entry is not None:
            if not (self.markers.active and self.markers.hiding(key, entry)):
                top.metrics.hits += 1
                return Hit(entry, top.name)
            floor = entry.version
        top.metrics.misses += 1
        return self._read_below(key, floor, top_failed=False)

    def _read_below(self, key: str, floor: int, top_failed: bool) -> asyncio.Future[Hit | None]:
        """The rest of a read the top tier did not answer (or failed, ``top_failed``): a
        future of the lookup below, joined by every concurrent read of the key (one task
        for all of them, none of its own).

        ``floor``: the version of an entry a tier above held that an invalidation hid; an
        entry found below that is not newer is an older version of it, so invalidated too,
        whether or not the invalidation names it (a tag the older value did not carry). A
        newer one is not: the tier above missed it (a write that could not reach it)."""
        top = self.top
        if len(self.slots) == 1 or self.blind:
            return asyncio.ensure_future(self._get_below(key, floor, top_failed))
        overlay = self._overlay(key)
        if overlay is not None and overlay.entry.version > floor:
            return asyncio.ensure_future(self._get_below(key, floor, top_failed))
        flight = self._flights.get(key)
        if flight is None:
            flight = self._read_lower(key, self.slots[1:], floor, {top} if top_failed else set())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._land(key, done))
        # Derived, not awaited: one reader giving up cancels its own future, never the
        # lookup others wait for.
        return chain(flight, lambda done: self._joined(key, done, floor, top_failed), _itself)

    def _joined(
        self, key: str, flight: asyncio.Future[Hit | None], floor: int, top_failed: bool
    ) -> Hit | asyncio.Future[Hit | None] | None:
        """What a read that joined ``flight`` makes of its hit."""
        hit = flight.result()  # its failure is the read's
        if hit is None or hit.entry.version <= floor:
            return None
        if self.markers.active and self.markers.hiding(key, hit.entry):
            # Hidden while the lookup this read joined was under way: invalidated, or
            # replaced by a write that a tier above missed (a key marker). Only a second
            # look, past the hidden version, tells which.
            failed = {self.top} if top_failed else set()
            return self._read_lower(key, self.slots[1:], hit.entry.version, failed)
        return hit

    async def _get_below(self, key: str, floor: int, top_failed: bool) -> Hit | None:
        """``_read_below`` where the lookup is not shared: with a single tier, while
        ``blind``, or from the overlay of this process's unflushed writes."""
        top = self.top
        if len(self.slots) == 1:
            if top_failed:  # the only tier is the durable one: "not found" would be a guess
                raise Unavailable(f"the tier {top.name!r} did not answer", top.name)
            return None
        if self.blind:
            return await self._read_lower(key, self.slots[-1:], floor)
        overlay = self._overlay(key)
        if overlay is not None and overlay.entry.version > floor:
            if not (self.markers.active and self.markers.hiding(key, overlay.entry)):
                if not top_failed and top.readable(key):
                    self._promote(key, overlay.payload, overlay.entry, [top], time.time())
                return Hit(overlay.entry, top.name)
            floor = overlay.entry.version
        return await self._read_below(key, floor, top_failed)

    def _land(self, key: str, flight: asyncio.Future[Hit | None]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def _read_lower(
        self,
        key: str,
        slots: Sequence[Slot],
        floor: int,
        failed: set[Slot] | None = None,
    ) -> asyncio.Future[Hit | None]:
        """A future of ``_search``'s hit, or of Unavailable once ``request_timeout`` is up
        (the search then cancelled). The searches share one timer (``Deadlines``): a timer
        each, set and cancelled, cost more than the rest of an L2 hit's bookkeeping."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()  # kept: that call costs a getpid()
        search = asyncio.ensure_future(self._search(key, slots, floor, failed or set()))
        self._searches.watch(loop, search)
        found: asyncio.Future[Hit | None] = loop.create_future()
        search.add_done_callback(functools.partial(self._searched, found))
        return found

    def _searched(
        self, found: asyncio.Future[Hit | None], search: asyncio.Future[Hit | None]
    ) -> None:
        try:
            self._searches.done(search)  # raises the Unavailable of a search out of time
        except Unavailable as exc:
            if not found.done():
                found.set_exception(exc)
            return
        if found.done():  # its reader gave up: what the search came to is no one's
            if not search.cancelled():
                search.exception()
            return
        _pass_on(found, _itself, search)

    def _search_expired(self) -> Unavailable:
        return Unavailable(
            f"the lower tiers did not answer within request_timeout ({self.request_timeout} s)"
        )

    async def _search(
        self, key: str, slots: Sequence[Slot], floor: int, failed: set[Slot]
    ) -> Hit | None:
        """The first live entry in ``slots`` newer than ``floor``, promoted into the tiers
        above it — except those that just failed (the read must not wait on a hung tier
        twice), and none while ``blind``."""
        for slot in slots:
            if not slot.readable(key):
                continue
            markers_before = self.markers.changes
            try:
                payload = await slot.get(key)
                now = time.time()
                entry = decode_live(payload, now)
                if (
                    slot is self.durable
                    and entry is not None
                    and self.markers.changes != markers_before
                    and self.markers.hiding(key, entry)
                ):
                    # Hidden by a marker that came while the read was under way: the key
                    # marker of a write a tier above missed, acknowledged meanwhile, whose
                    # value the durable tier holds now. Only another read sees it.
                    payload = await slot.get(key)
                    now = time.time()
                    entry = decode_live(payload, now)
            except TierError:
                failed.add(slot)
                continue
            if entry is not None and entry.version > floor:
                if not (self.markers.active and self.markers.hiding(key, entry)):
                    slot.metrics.hits += 1
                    assert payload is not None
                    if not self.blind:
                        position = self.slots.index(slot)
                        above = [upper for upper in self.slots[:position] if upper not in failed]
                        self._promote(key, payload, entry, above, now)
                    return Hit(entry, slot.name)
                floor = entry.version
            slot.metrics.misses += 1
        if self.durable in failed:
            # The one tier that holds every entry could not be asked: "not found" would
            # be a guess. (A cache tier that failed does not matter: the durable tier
            # holds all it could have held.)
            raise Unavailable(
                f"the durable tier {self.durable.name!r} did not answer", self.durable.name
            )
        return None

    def _promote(
        self, key: str, payload: Payload, entry: Entry, slots: Sequence[Slot], now: float
    ) -> None:
        """Copy a hit into ``slots`` without holding the read's answer for it (a round trip
        to the tiers above). Until the copies land, reads of the key through this sidecar
        wait for them (``_promoting``), so the next read is still the top tier's."""
        if not slots:
            return
        # The fills as they are (a remote tier's is its batch's future: no task each).
        fills = [
            asyncio.ensure_future(
                slot.set(TierWrite(key, payload, entry.version, entry.ttl_in(slot.ttl, now)))
            )
            for slot in slots
        ]
        promoted = _all_settled(fills)
        self._promoting[key] = promoted
        promoted.add_done_callback(functools.partial(self._promoted, key, slots))

    def _promoted(
        self, key: str, slots: Sequence[Slot], promoted: asyncio.Future[list[Any]]
    ) -> None:
        if self._promoting.get(key) is promoted:
            del self._promoting[key]
        for slot, filled in zip(slots, promoted.result(), strict=True):
            # A failed fill leaves the tier without the key (or with the same-or-older
            # version a newer write will replace): nothing stale to remember.
            if not isinstance(filled, BaseException):
                slot.metrics.promotions.inc()
            elif not isinstance(filled, TierError):
                log.error("promoting %r into %s failed", key, slot.name, exc_info=filled)

    # -- writes --------------------------------------------------------------------------

    @overload
    def write(
        self, values: Sequence[NewValue], strategy: Strategy
    ) -> asyncio.Future[list[int]]: ...

    @overload
    def write(
        self, values: Sequence[NewValue], strategy: Strategy, make: Callable[[list[int]], Result]
    ) -> asyncio.Future[Result]: ...

    def write(
        self,
        values: Sequence[NewValue],
        strategy: Strategy,
        make: Callable[[list[int]], Any] = _itself,
    ) -> asyncio.Future[Any]:
        """Store ``values``: a future of their versions (or of ``make`` of them: the
        caller's answer in the same future), done once the strategy's promise holds
        (without a task: the caller answers from the future's callback)."""
        now = time.time()
        entries = self._new_entries(values, now)
        versions = [entry.version for entry in entries]
        if self.announce is None:
            return then(self._write(values, entries, strategy, now), lambda _: make(versions))
        # The peers' in-process tiers drop their older copies first, and the write happens
        # only once they were told: a write the peers cannot learn of (the channel cut off)
        # is refused, not made behind their backs. A peer that reads the shared tiers
        # meanwhile cannot promote the older value: the announcement's tombstone is newer.
        announced = self.announce(
            [(new.key, version) for new, version in zip(values, versions, strict=True)]
        )

        def write_once_told(told: asyncio.Future[None]) -> asyncio.Future[Any]:
            told.result()  # raises Unavailable: not announced, so not written
            return self._write(values, entries, strategy, now)

        return chain(announced, write_once_told, lambda _: make(versions))

    def _write(
        self, values: Sequence[NewValue], entries: Sequence[Entry], strategy: Strategy, now: float
    ) -> asyncio.Future[Any]:
        if strategy == "write-behind" and len(self.slots) > 1:
            return self._write_behind(values, entries, now)
        durable_writes = []
        cache_writes = []
        for new, entry in zip(values, entries, strict=True):
            payload = entry.encode()
            durable_writes.append(
                TierWrite(
                    new.key,
                    payload,
                    entry.version,
                    entry.ttl_in(self.durable.ttl, now),
                    entry.tags,  # in clear beside the payload: erasure finds them by tag
                )
            )
            for slot in self.slots[:-1]:
                if strategy == "cache-aside":
                    write = TierWrite(new.key, None, entry.version, TOMBSTONE_TTL)
                else:
                    write = TierWrite(new.key, payload, entry.version, entry.ttl_in(slot.ttl, now))
                cache_writes.append((slot, write))
        return self._store(durable_writes, cache_writes)

    def _new_entries(self, values: Sequence[NewValue], now: float) -> list[Entry]:
        entries = []
        for new in values:
            self._forget(new.key)
            expires_at = None if new.ttl is None else now + new.ttl
            entries.append(
                Entry(
                    new.value,
                    new.content_type,
                    self.clock.next(),
                    expires_at,
                    new.tags,
                    new.sealed,
                )
            )
        return entries

    def _write_behind(
        self, values: Sequence[NewValue], entries: Sequence[Entry], now: float
    ) -> asyncio.Future[list[int]]:
        """Top tier and journal, concurrently; lower tiers later (``apply_write_behind``).
        Followed with callbacks: a write-behind write runs no task of its own."""
        journal, top = self.journal, self.top
        refusal: str | None = None
        if journal is None:
            refusal = (
                "write-behind needs a journal: configure a redis:// tier or [write].journal_url"
            )
        elif not journal.has_room(len(values)):
            refusal = "write-behind journal is full; retry later or write through"
        else:
            refusal = journal.refusal()
        if refusal is not None:
            return failed_future(Unavailable(refusal, "journal"))
        assert journal is not None
        payloads = [entry.encode() for entry in entries]
        top_writes = [
            TierWrite(new.key, payload, entry.version, entry.ttl_in(top.ttl, now))
            for new, entry, payload in zip(values, entries, payloads, strict=True)
        ]
        # Visible to reads of this process at once, in version order: set before any await.
        for write, entry, payload in zip(top_writes, entries, payloads, strict=True):
            self._unflushed[write.key] = Unflushed(entry, payload, now + top.ttl, None)
        calls: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(top.set(write)) for write in top_writes
        ]
        calls += [
            journal.append(write.key, payload)
            for write, payload in zip(top_writes, payloads, strict=True)
        ]
        return chain(
            _all_settled(calls, self.request_timeout),
            lambda settled: self._written_behind(top_writes, entries, settled),
            _itself,
        )

    def _written_behind(
        self,
        top_writes: Sequence[TierWrite],
        entries: Sequence[Entry],
        settled: asyncio.Future[list[Any]],
    ) -> list[int] | asyncio.Future[list[int]]:
        """The versions of a write-behind write once the top tier and the journal both took
        it; else what each missed is remembered (recorded before the 503)."""
        top = self.top
        failure = settled.exception()
        if isinstance(failure, TimeoutError):
            for write in top_writes:
                self._forget_unflushed(write.key, write.version)
                self._miss(top, write.key, write.version)
            return then(
                self._missed_records.submit(None),
                _raising(
                    Unavailable(
                        f"the write did not complete within {self.request_timeout} s", top.name
                    )
                ),
            )
        outcomes = settled.result()  # another failure is the write's
        stored, recorded = outcomes[: len(top_writes)], outcomes[len(top_writes) :]
        journal_failure: BaseException | None = None
        for write, recorded_result in zip(top_writes, recorded, strict=True):
            if isinstance(recorded_result, BaseException):
                # Not journaled: the lower tiers will never get it, so neither the
                # overlay nor the top tier may keep serving it.
                journal_failure = journal_failure or recorded_result
                self._forget_unflushed(write.key, write.version)
                self._miss(top, write.key, write.version)
                continue
            overlay = self._unflushed.get(write.key)  # known flushed once its entry is
            if overlay is not None and overlay.entry.version == write.version:
                self._unflushed[write.key] = overlay._replace(journal_id=recorded_result)
        missed = [r for r in stored if isinstance(r, BaseException)]
        for write, stored_result in zip(top_writes, stored, strict=True):
            if isinstance(stored_result, BaseException):
                self._miss(top, write.key, write.version)  # it may hold an older value
        if journal_failure is not None:
            error = Unavailable(f"write-behind journal: {journal_failure}", "journal")
            error.__cause__ = journal_failure
        elif missed:
            error = Unavailable(f"the top tier did not take the write: {missed[0]}", top.name)
        else:
            return [entry.version for entry in entries]
        return then(self._missed_records.submit(None), _raising(error))

    async def apply_write_behind(self, records: Sequence[Record]) -> None:
        """Apply journal records to the tiers below the top, newest version per key (a
        view's keys to the view's tiers).

        Raises TierError when the durable tier did not commit (the journal retries); a
        cache tier in between that fails is skipped and remembers the keys as missed.
        """
        newest: dict[str, Record] = {}
        for rec in records:
            held = newest.get(rec.key)
            if held is None or held.entry.version < rec.entry.version:
                newest[rec.key] = rec
        by_engine: dict[Engine, dict[str, Record]] = {}
        for key, rec in newest.items():
            engine = next((view for start, view in self._views if key.startswith(start)), self)
            by_engine.setdefault(engine, {})[key] = rec
        for engine, placed in by_engine.items():
            await engine._apply_below_top(placed)

    async def _apply_below_top(self, newest: dict[str, Record]) -> None:
        now = time.time()
        for slot in reversed(self.slots[1:]):  # durable first, as write-through does
            writes = [
                TierWrite(rec.key, rec.payload, rec.entry.version, ttl, rec.entry.tags)
                for rec in newest.values()
                if (ttl := rec.entry.ttl_in(slot.ttl, now)) > 0
            ]
            if not writes:
                continue
            try:
                await slot.set_many(writes)
            except TierError as exc:
                if slot is self.durable:
                    raise
                for write in missed_writes(exc, writes):
                    self._miss(slot, write.key, write.version, written=True)
                await self._missed_records.submit(None)
        for key, rec in newest.items():
            self._forget_unflushed(key, rec.entry.version)

    def _forget_unflushed(self, key: str, version: int) -> None:
        """Drop the overlay's value of ``key`` if ``version`` covers it."""
        unflushed = self._unflushed.get(key)
        if unflushed is not None and unflushed.entry.version <= version:
            del self._unflushed[key]

    def _overlay(self, key: str) -> Unflushed | None:
        """The overlay's value of ``key``, unless it has been applied below (by anyone:
        the journal's oldest entry is past it) or the top tier would have dropped it."""
        unflushed = self._unflushed.get(key)
        if unflushed is None:
            return None
        applied = (
            unflushed.journal_id is not None
            and self.journal is not None
            and self.journal.applied(unflushed.journal_id)
        )
        if applied or unflushed.until < time.time():
            del self._unflushed[key]
            return None
        return unflushed

    async def _sweep_overlay(self) -> None:
        """Drop the overlay's values the top tier would have dropped, and those whose
        journal entry is gone from the stream (applied, by anyone)."""
        for key in list(self._unflushed):
            self._overlay(key)
        journal = self.journal
        recorded = {u.journal_id: key for key, u in self._unflushed.items() if u.journal_id}
        if journal is None or not recorded:
            return
        try:
            pending = await journal.still_pending(list(recorded))
        except REDIS_ERRORS as exc:
            log.debug("write-behind overlay not checked against the journal: %s", exc)
            return
        for entry_id, key in recorded.items():
            unflushed = self._unflushed.get(key)
            if (
                entry_id not in pending
                and unflushed is not None
                and unflushed.journal_id == entry_id
            ):
                del self._unflushed[key]

    def _forget(self, key: str) -> None:
        """A newer write or delete of ``key`` is under way: later readers must neither join
        an older lookup nor see an older unflushed write-behind value."""
        self._flights.pop(key, None)
        self._unflushed.pop(key, None)

    async def superseded(self, versions: Sequence[tuple[str, int]]) -> None:
        """Peers wrote or deleted these keys at these versions (their shared tiers are done):
        older copies in this process — the in-process tiers, a lookup under way, the
        overlay — are dropped. A tombstone at the version keeps an older value from being
        promoted back; the newer value itself (equal version) may still be."""
        for key, version in versions:
            self.clock.witness(version)
            self._flights.pop(key, None)
            self._forget_unflushed(key, version - 1)
        tombstones = [TierWrite(key, None, version, TOMBSTONE_TTL) for key, version in versions]
        for slot in self.slots:
            if slot.tier.in_process:
                await slot.tier.set_many(tombstones)

    async def delete_many(self, keys: Sequence[str], version: int | None = None) -> None:
        """Tombstone ``keys`` in every tier, durable first, at ``version`` (default: a new
        one per key)."""
        versions = []
        for key in keys:
            self._forget(key)
            versions.append(version or self.clock.next())
        # In the durable tier a tombstone lives as long as anything may still be applied
        # there: a write-behind record replayed late must not bring a deleted value back.
        durable_tombstones = [
            TierWrite(key, None, version, max(TOMBSTONE_TTL, self.durable.ttl))
            for key, version in zip(keys, versions, strict=True)
        ]
        cache_tombstones = [
            (slot, TierWrite(key, None, version, TOMBSTONE_TTL))
            for slot in self.slots[:-1]
            for key, version in zip(keys, versions, strict=True)
        ]
        await self._store(durable_tombstones, cache_tombstones)

    async def erase(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Remove every entry of ``keys`` or carrying one of ``tags`` from every tier and
        the journal; the number of values the durable tier removed.

        The journal first (its entries would otherwise be applied again below); the keys
        of the tags come from it and from the durable tier, which between them hold every
        entry written (the tiers above hold copies). Then the peers are told, as of a
        write: their in-process tiers drop the keys (an erasure they cannot learn of is
        not made). Then the durable tier's rows are deleted physically (tombstones of
        those keys included), then a tombstone goes to every tier above it, which have no
        erasure of their own. A durable tier that cannot erase gets tombstones (and 0 is
        answered: nothing was removed physically).

        Not covered: a write-behind flush that read an entry before the journal was
        erased and commits it after the durable tier was (erase again a moment later)."""
        durable = self.durable.tier
        found = set(keys)
        try:
            async with asyncio.timeout(self.request_timeout):
                if self.journal is not None:
                    found |= (await self.journal.erase(keys, tags)).keys
                if durable.erases:
                    for tag in tags:
                        found.update(await self._keys_with_tag(tag))
        except (TimeoutError, TierError, *REDIS_ERRORS) as exc:
            raise Unavailable(f"erasure could not find every entry: {exc}") from exc
        ordered = sorted(found)
        if not durable.erases:
            await self.delete_many(ordered)
            return 0
        versions = []
        for key in ordered:
            self._forget(key)
            versions.append(self.clock.next())
        if self.announce is not None and ordered:
            await self.announce(list(zip(ordered, versions, strict=True)))
        try:
            async with asyncio.timeout(self.request_timeout):
                erased = await durable.erase(ordered, tags)
        except (TimeoutError, TierError) as exc:
            raise Unavailable(
                f"the durable tier {self.durable.name!r} did not erase: {exc}", self.durable.name
            ) from exc
        tombstones = [
            (slot, TierWrite(key, None, version, TOMBSTONE_TTL))
            for key, version in zip(ordered, versions, strict=True)
            for slot in self.slots[:-1]
        ]
        if tombstones:
            await self._store([], tombstones)
        return erased

    async def keys_with_tag(self, tag: str) -> list[str]:
        """The keys of the live entries the durable tier holds with ``tag``, in key order;
        Unsupported when it cannot list them."""
        if not self.durable.tier.erases:
            raise Unsupported(
                f"the durable tier {self.durable.name!r} cannot list keys by tag "
                "(a postgresql:// durable tier can)"
            )
        try:
            async with asyncio.timeout(self.request_timeout):
                return await self._keys_with_tag(tag)
        except (TimeoutError, TierError) as exc:
            raise Unavailable(
                f"the durable tier {self.durable.name!r} did not list the keys: {exc}",
                self.durable.name,
            ) from exc

    async def _keys_with_tag(self, tag: str) -> list[str]:
        keys: list[str] = []
        after: str | None = None
        while page := await self.durable.tier.keys_with_tag(tag, 1000, after):
            keys += page
            after = page[-1]
        return keys

    def _store(
        self,
        durable_writes: Sequence[TierWrite],
        cache_writes: Sequence[tuple[Slot, TierWrite]],
    ) -> asyncio.Future[None]:
        """The durable tier first — its failure is the caller's 503 — then the cache tiers,
        whose failures are remembered as missed keys; all within the request deadline.

        Concurrent calls are stored together (``_store_group``): one ``set_many`` per
        tier for all of them, and one wake-up per caller.
        """
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        return self._stores.submit(_StoreJob(durable_writes, cache_writes, deadline))

    async def _store_group(self, jobs: list[_StoreJob]) -> list[None]:
        durable = self.durable
        durable_writes = [write for job in jobs for write in job.durable_writes]
        by_slot: dict[Slot, list[TierWrite]] = {}
        for job in jobs:
            for slot, write in job.cache_writes:
                by_slot.setdefault(slot, []).append(write)
        # The latest caller's deadline: a write queued behind busy groups must not cut the
        # shared call short for the others (an earlier caller waits at most its queueing
        # time longer).
        deadline = max(job.deadline for job in jobs)
        try:
            async with asyncio.timeout_at(deadline):
                await durable.set_many(durable_writes)
        except (TimeoutError, TierTimeout) as exc:
            # It may have committed: the cache tiers above may now hold an older value.
            for slot, writes in by_slot.items():
                for write in writes:
                    self._miss(slot, write.key, write.version)
            await self._missed_records.submit(None)
            raise Unavailable(
                f"the durable tier {durable.name!r} did not answer within "
                f"request_timeout ({self.request_timeout} s)",
                durable.name,
                outcome_unknown=True,
            ) from exc
        except TierError as exc:
            raise Unavailable(
                f"the durable tier {durable.name!r} did not take the write: {exc}", durable.name
            ) from exc
        # Stored durably. A cache tier that fails or does not answer in time missed it.
        calls = {
            slot: asyncio.ensure_future(slot.set_many(writes)) for slot, writes in by_slot.items()
        }
        unexpected: BaseException | None = None
        try:
            if calls:
                loop = asyncio.get_running_loop()
                await asyncio.wait(calls.values(), timeout=max(0.0, deadline - loop.time()))
        finally:  # also when this group is cancelled: no call outlives it unaccounted
            missed: dict[Slot, Sequence[TierWrite]] = {}
            for slot, call in calls.items():
                if not call.done():
                    call.cancel()
                    missed[slot] = by_slot[slot]
                elif call.cancelled():
                    missed[slot] = by_slot[slot]
                elif (failure := call.exception()) is not None:
                    if not isinstance(failure, TierError):
                        unexpected = unexpected or failure
                    missed[slot] = missed_writes(failure, by_slot[slot])
            for slot, lost in missed.items():
                for write in lost:
                    self._miss(slot, write.key, write.version, written=True)
        if missed:
            await self._missed_records.submit(None)
        if unexpected is not None:
            raise unexpected
        return [None] * len(jobs)

    # -- health --------------------------------------------------------------------------

    async def tier_states(self) -> list[dict[str, object]]:
        """Each tier's state for /readyz. Tiers believed up are probed, so a dead one is
        reported "down" at once instead of after its breaker opens."""
        answered = await asyncio.gather(
            *(slot.probe() if slot.state == "closed" else _false() for slot in self.slots)
        )
        states: list[dict[str, object]] = []
        for slot, ok in zip(self.slots, answered, strict=True):
            state = {
                "name": slot.name,
                "state": slot.state if slot.state != "closed" else "up" if ok else "down",
                "missed_keys": len(slot.missed),
            }
            if len(slot.parts) > 1:  # a tier of nodes, each its own failure domain
                state["nodes"] = {part.name: part.state for part in slot.parts}
            states.append(state)
        return states

    async def _keep_lease(self) -> None:
        if self.lease is None or self.durable.state == "open":
            return
        try:
            await self.lease.keep(self.durable)
        except TierError as exc:
            log.debug("node number not leased yet: %s", exc)

    async def check_tiers(self) -> None:
        """Probe tiers that are not known good, repair those that came back, keep the
        record of missed keys in the durable tier and the node number's lease, and drop
        overlay values applied below since."""
        await self._sync_missed()
        await self._keep_lease()
        await self._sweep_overlay()
        for slot in self.slots:
            if slot.state != "closed" or slot.missed:
                if slot.state != "closed" and not await slot.probe():
                    continue
                if slot.missed:
                    try:
                        await slot.repair()
                    except TierError as exc:
                        log.warning("tier %s: repair failed: %s", slot.name, exc)

    def _miss(self, slot: Slot, key: str, version: int, written: bool = False) -> None:
        """``slot`` missed the write of ``key`` at ``version``. It will not serve the older
        value to this sidecar, which repairs it. When the write is ``written`` (in the
        durable tier: acknowledged), a shared tier's peers learn of it through a key marker
        hiding every older version (kept in the marker store with the record below), so
        that none of them reads the older value from it meanwhile. (A write whose outcome
        is unknown hides nothing: the older value may still be the current one.)"""
        slot.miss(key, version)
        if written and not slot.tier.in_process:
            self._missed_markers[key] = max(version - 1, self._missed_markers.get(key, 0))

    async def _record_missed_batch(self, requests: list[None]) -> list[None]:
        markers, self._missed_markers = self._missed_markers, {}
        if markers and self.keep_markers is not None:
            await self.keep_markers([Marker(f"k:{key}", v) for key, v in markers.items()])
        await self._sync_missed()
        return requests

    async def _sync_missed(self) -> None:
        """Keep this sidecar's missed keys in the durable tier, under a name that
        survives a restart (host, port, worker), and load them back after one.

        What a cache tier missed lives in memory (``Slot.missed``); a sidecar
        restarted while a tier was down would forget it and, once the tier is back, read
        what it missed. The record is written whenever the missed keys change, read once
        at start, and deleted when every missed key has been repaired.
        """
        caches = [part for slot in self.slots[:-1] for part in slot.parts]
        if not caches or self.durable.state == "open":
            return
        key = f"\x1fcachesvc-missed:{self.identity}"  # a control character: no client key
        try:
            if not self._missed_loaded:
                stored = await self.durable.get_many([key])
                restore_missed(caches, stored[0])
                self._missed_loaded = True
            if any(slot.missed_changed for slot in caches):
                for slot in caches:
                    slot.missed_changed = False
                record = save_missed(caches)
                lifetime = max(slot.ttl for slot in caches)
                await self.durable.set_many([TierWrite(key, record, self.clock.next(), lifetime)])
        except TierError as exc:
            for slot in caches:
                slot.missed_changed = True  # try again on the next round
            log.debug("missed keys not synced with the durable tier: %s", exc)

    async def _watch_tiers(self) -> None:
        while True:
            await asyncio.sleep(MONITOR_INTERVAL)
            try:
                await self.check_tiers()
            except Exception:  # the monitor must outlive any surprise
                log.exception("tier monitor failed")


class _View(Engine):
    """``Engine.view``: its own tiers (and the batcher that stores to them); every other
    attribute is the engine's, read through, so that state the engine changes later
    (``blind``, ``announce``) is the view's at once. Never started or closed itself."""

    def __init__(self, engine: Engine, slots: Sequence[Slot]) -> None:
        # Not Engine.__init__: the state is the engine's.
        self._engine = engine
        self.slots = list(slots)
        self.top = self.slots[0]
        self.durable = self.slots[-1]
        self._stores = Batcher(self._store_group)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)
