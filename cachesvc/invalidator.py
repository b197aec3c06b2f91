"""Invalidation: applies events to the tiers, tells the peers, and keeps the sidecar from
serving what it may have missed.

What reaches the tiers:

- keys: tombstones in every tier (durable first), as DELETE does;
- prefixes and tags: markers (``cachesvc.markers``), checked on every read and kept in the
  ``MarkerStore`` (the durable tier, else the channel's Redis), so that no server restart
  un-invalidates anything;
- writes: peers drop their in-process copies of what another sidecar wrote (``announce``,
  an event with ``written`` pairs), so no sidecar or worker serves an older value from its
  own memory once a write was answered.

This sidecar's own invalidations (DELETE, bulk delete, POST /v1/invalidate) are published
first, then applied; answered once published, applied and their markers kept. One that
cannot be published is not made (503). When the durable tier then refuses a key's
tombstone the invalidation leaves no trace but dropped copies (503): every sidecar reads
the old value from the durable tier, alike. When its answer is unknown (a timeout) the
copies are dropped everywhere too (what it holds decides, and the cache tiers are
repaired from it) and the client still gets 503.

Events from publishers outside the sidecars are applied in full; a key tombstone the
durable tier cannot take becomes a key marker instead, kept in the store, so it is carried
out everywhere all the same.

A lost source: from the moment a listener reports it (within ``liveness_interval``) until
it is subscribed again and the markers are reloaded, the engine is ``blind``: it reads the
durable tier only, checked against markers reloaded from the store every
``liveness_interval``. After a gap that may have lost events the in-process tiers are
cleared.

The race between a fill and an invalidation is closed by versions: a key's tombstone has a
newer version than any fill already under way, so a fill landing after it is refused by
the tier, and a fill landing before it is overwritten; a marker hides any entry not newer
than itself, wherever the fill put it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio.cluster import RedisCluster

from cachesvc import audit
from cachesvc.audit import AuditTrail
from cachesvc.engine import Engine
from cachesvc.errors import Unavailable
from cachesvc.journal import REDIS_ERRORS
from cachesvc.markers import MarkerStore
from cachesvc.metrics import Metrics
from cachesvc.namespaces import scoped
from cachesvc.slot import Batcher
from cachesvc.versions import version_at
from invalidation.base import Listener, raise_if_cancelled
from invalidation.events import InvalidationEvent, MalformedEvent
from invalidation.postgres_wal import PostgresWalListener
from invalidation.redis_stream import Trimming, append
from tiers.base import Marker, TierError
from tiers.redis import load_markers, save_markers
from tiers.redis_clients import RedisClient, create_client

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 60.0
# Seconds an external event's key markers are kept by a sidecar that leaves applying it to
# the shared tiers to another: enough for a dead applier's lease (3 s) to be taken over.
UNTIL_APPLIED = 10.0
CATCH_UP_MARGIN = 5.0  # seconds: see _reload_markers


class Invalidator:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        listeners: list[Listener],
        redis_url: str | None = None,
        channel: str = "cachesvc:invalidate",
        liveness_interval: float = 1.0,
        stream: tuple[str, Trimming] | None = None,
        identity: str = "cachesvc",
    ) -> None:
        self.engine = engine
        # The engine (a view over its tiers) of each namespace with tiers of its own; the
        # others are the engine's. Events are applied in their namespace's tiers.
        self.engines: dict[str, Engine] = {}
        self.listeners = listeners
        self.channel = channel
        self.markers = engine.markers
        self.liveness_interval = liveness_interval
        self.origin = uuid.uuid4().hex  # our own events come back to us: skip them
        self._redis = create_client(redis_url, socket_timeout=2) if redis_url else None
        # With a stream this sidecar's own events go there (every peer reads every entry,
        # resuming after a disconnect), else on the pub/sub channel.
        self.stream = stream
        self._pickers = {listener.source for listener in listeners if listener.picks_applier}
        self.store = self._marker_store(f"{channel}:markers")
        # One sidecar applies broadcast external events to the shared tiers (the others
        # to their own process); without a channel Redis to hold the lease, every one does.
        self.applier = (
            None
            if self._redis is None
            else ApplierLease(self._redis, f"{channel}:applier", identity)
        )
        # External broadcast events this sidecar only applied here, kept for a while: if
        # the applier dies, the sidecar taking its lease applies them to the shared tiers.
        self._recent: collections.deque[tuple[float, InvalidationEvent, int, str]] = (
            collections.deque()
        )
        # Key markers of external events another sidecar applies to the shared tiers:
        # (until, key, version), dropped by the upkeep once that is surely done.
        self._until_applied: collections.deque[tuple[float, str, int]] = collections.deque()
        self._announcements: Batcher[Sequence[tuple[str, int]], None] = Batcher(self._announce)
        metrics.registry.register(_Lag(listeners))
        self._events = metrics.invalidation_events
        self._latency = metrics.invalidation_latency
        self._tasks: list[asyncio.Task[None]] = []
        self._down: set[str] = set()
        self._closing = False
        self._markers_loaded = False
        self._newest_loaded = 0  # the newest marker version loaded from the store
        # Markers of writes a shared cache tier missed: kept for every sidecar.
        engine.keep_markers = self._keep_missed
        # Where the events this sidecar carries out for the fleet are recorded (the one
        # that applies an event to the shared tiers records it: once, not per sidecar).
        self.audit: AuditTrail | None = None

    def _marker_store(self, redis_key: str) -> MarkerStore | None:
        ttl = self.markers.max_age
        if self.engine.durable.tier.keeps_markers:
            (durable,) = self.engine.durable.parts  # a tier of nodes keeps no markers

            async def save_durable(markers: Sequence[Marker], lifetime: float) -> None:
                await durable.call(durable.tier.save_markers(markers, lifetime))

            async def load_durable(newer_than: int) -> list[Marker]:
                return await durable.call(durable.tier.load_markers(newer_than))

            return MarkerStore(save_durable, load_durable, ttl)
        client = self._redis
        if client is None:
            return None  # nothing shared: this sidecar's markers live in its memory only

        async def save_channel(markers: Sequence[Marker], lifetime: float) -> None:
            try:
                await save_markers(client, redis_key, markers, lifetime)
            except REDIS_ERRORS as exc:
                raise TierError(f"the invalidation channel's Redis: {exc}") from exc

        async def load_channel(newer_than: int) -> list[Marker]:
            try:
                markers = await load_markers(client, redis_key)
                return [marker for marker in markers if marker.version > newer_than]
            except REDIS_ERRORS as exc:
                raise TierError(f"the invalidation channel's Redis: {exc}") from exc

        return MarkerStore(save_channel, load_channel, ttl)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        for listener in self.listeners:
            self._down.add(listener.source)
            self._tasks.append(
                asyncio.create_task(listener.run(self), name=f"invalidation-{listener.source}")
            )
        if self._down:
            self.engine.blind = True  # until subscribed: events may be missed
        else:
            await self._reload_markers()  # no source: what the store holds is all there is
        self._tasks.append(asyncio.create_task(self._upkeep(), name="invalidation-upkeep"))
        if self.applier is not None:
            self._tasks.append(asyncio.create_task(self._keep_applier(), name="applier-lease"))

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._announcements.close()
        if self.applier is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.applier.release()
        if self._redis is not None:
            await self._redis.aclose()

    def states(self) -> dict[str, str]:
        """Each source's state: "up", "standby" (a slot another sidecar reads), "connecting"
        or "down"."""
        return {
            listener.source: "standby"
            if isinstance(listener, PostgresWalListener)
            and listener.state == "up"
            and not listener.reading
            else listener.state
            for listener in self.listeners
        }

    def problems(self) -> dict[str, str]:
        """Why a source cannot work as configured (a missing table, no logical decoding)."""
        return {
            listener.source: listener.error
            for listener in self.listeners
            if listener.error is not None
        }

    def journal_state(self) -> dict[str, object] | None:
        journal = self.engine.journal
        if journal is None:
            return None
        return {"durable": bool(journal.durable), "volatile_accepted": journal.volatile}

    # -- this sidecar's own invalidations and writes -------------------------------------

    async def invalidate(self, event: InvalidationEvent) -> None:
        """Tell the peers, then apply ``event`` to every tier and keep its markers; raises
        Unavailable when that did not all happen (see the module's docstring).

        The peers are told first: an invalidation they cannot learn of is not made at all
        (no sidecar is left serving what another removed). Told, they drop their copies
        at once; should the tiers then refuse it, they read what the durable tier holds.
        """
        version = self.engine.clock.next()
        engine, held = self._engine_of(event), scoped(event)
        await self._publish(self._own(event, version))
        if held.keys:
            try:
                await engine.delete_many(held.keys, version)
            except Unavailable:
                await engine.superseded([(key, version) for key in held.keys])
                raise
        markers = _markers_of(held, version)
        if markers:
            self.markers.add_all(markers)
            if self.store is not None and not await self.store.save(markers):
                # Kept for a retry; until then a sidecar that starts would not know it.
                raise Unavailable(
                    "applied here and told to the peers, but the invalidation markers are "
                    "not kept yet: sidecars that start meanwhile would not know them",
                    self.engine.durable.name,
                )

    def announce(self, written: Sequence[tuple[str, int]]) -> asyncio.Future[None]:
        """Tell the peers that these keys have these newer versions; done once published
        (the announcements of one event-loop turn go out as one message)."""
        return self._announcements.submit(written)

    async def _announce(self, batches: list[Sequence[tuple[str, int]]]) -> list[None]:
        written = tuple(pair for batch in batches for pair in batch)
        await self._publish(self._own(InvalidationEvent(written=written), None))
        return [None] * len(batches)

    def _own(self, event: InvalidationEvent, version: int | None) -> InvalidationEvent:
        return InvalidationEvent(
            event.keys,
            event.prefixes,
            event.tags,
            event.namespace,
            origin=self.origin,
            sent_at=time.time(),
            version=version,
            written=event.written,
        )

    async def _publish(self, event: InvalidationEvent) -> None:
        if self._redis is None:
            return
        try:
            if self.stream is not None:
                name, trimming = self.stream
                await append(self._redis, name, event, trimming)
            elif isinstance(self._redis, RedisCluster):
                await self._redis.spublish(self.channel, event.to_json())
            else:
                await self._redis.publish(self.channel, event.to_json())
        except REDIS_ERRORS as exc:
            raise Unavailable(
                f"applied here, but the peer sidecars were not told: {exc}", "invalidation"
            ) from exc

    # -- events from the listeners (EventSink) -------------------------------------------

    async def on_event(self, event: InvalidationEvent, source: str) -> None:
        if event.origin == self.origin:
            self._events.labels(source, "own").inc()
            return
        version = self._version_of(event)
        if event.origin is not None:
            # A peer's: it applied it to the shared tiers before publishing it.
            await self._apply_here(event, version)
        elif source in self._pickers:
            # The source picks the sidecar that applies it to the shared tiers (on_shared).
            await self._apply_here(event, version, shared_later=True)
        elif self.applier is None or self.applier.held:
            await self._apply_external(event, version, source)
        else:
            await self._apply_here(event, version, shared_later=True)
            self._recent.append((time.monotonic(), event, version, source))
        self._applied(event, source)

    async def on_shared(self, event: InvalidationEvent, source: str) -> None:
        """This sidecar, and no other, applies ``event`` to the shared tiers."""
        await self._apply_external(event, self._version_of(event), source)

    async def originate(self, event: InvalidationEvent, source: str) -> None:
        """Only this sidecar saw ``event`` (a change read from the write-ahead log): applied
        to every tier and handed to the peers, or Unavailable (delivered again)."""
        await self.invalidate(event)
        self._record(event, source)
        self._applied(event, source)

    def _applied(self, event: InvalidationEvent, source: str) -> None:
        self._events.labels(source, "applied").inc()
        if event.sent_at is not None:
            self._latency.labels(source).observe(max(0.0, time.time() - event.sent_at))

    def _version_of(self, event: InvalidationEvent) -> int:
        """The version an event is applied at: its publisher's, its ``sent_at``'s, or
        (neither given) now."""
        if event.version is not None:
            version = event.version
        elif event.sent_at is not None:
            version = version_at(event.sent_at)
        else:
            version = self.engine.clock.next()
        self.engine.clock.witness(version)
        return version

    async def _apply_here(
        self, event: InvalidationEvent, version: int, shared_later: bool = False
    ) -> None:
        """Drop this process's copies — in-process tiers, lookups, overlay — of what
        ``event`` covers, and learn its markers.

        ``shared_later``: another sidecar applies it to the shared tiers, a moment later
        (a second or more when it has to take over a dead applier's lease). Until then a
        read here would find the old value there and serve it, so its keys get key
        markers here, for ``UNTIL_APPLIED`` seconds."""
        held = scoped(event)
        pairs = [*held.written, *((key, version) for key in held.keys)]
        self.markers.add_all(_markers_of(held, version))
        if shared_later:
            until = time.monotonic() + UNTIL_APPLIED
            for key in held.keys:
                if self.markers.add("k", key, version):
                    self._until_applied.append((until, key, version))
        if pairs:
            await self.engine.superseded(pairs)

    async def _apply_external(self, event: InvalidationEvent, version: int, source: str) -> None:
        """Apply ``event`` to every tier (an external publisher's: nobody else does), and
        record it."""
        held = scoped(event)
        markers = _markers_of(held, version)
        if held.keys:
            try:
                await self._engine_of(event).delete_many(held.keys, version)
            except Unavailable as exc:
                # Not in the durable tier (yet): key markers hide the old value everywhere.
                log.warning("invalidation event: %s (hidden by key markers)", exc.detail)
                markers += [Marker(f"k:{key}", version) for key in held.keys]
        if markers:
            self.markers.add_all(markers)
            if self.store is not None:
                await self.store.save(markers)
        self._record(event, source)

    def _record(self, event: InvalidationEvent, source: str) -> None:
        """An event's invalidation in the audit trail, its source as the actor (writes
        announced by peers are not invalidations)."""
        if self.audit is not None and (event.keys or event.prefixes or event.tags):
            self.audit.record(
                audit.INVALIDATE,
                actor=source,
                namespace=event.namespace,
                target=audit.target_of(event.keys, event.prefixes, event.tags),
            )

    def _engine_of(self, event: InvalidationEvent) -> Engine:
        """The engine over the tiers of ``event``'s namespace (an unknown one's, as a
        peer with a newer configuration may send: every tier)."""
        return self.engines.get(event.namespace, self.engine)

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None:
        self._events.labels(source, "malformed").inc()
        log.warning("malformed invalidation event from %s (%s): %.200r", source, error, raw)

    def on_disconnect(self, source: str) -> None:
        if not self._down and not self._closing:  # a listener stopped by close() is not lost
            log.warning(
                "invalidation source %s lost: reading the durable tier only until it is back",
                source,
            )
        self._down.add(source)
        self.engine.blind = True
        self._markers_loaded = False

    async def on_gap(self, source: str, lost: bool = True) -> None:
        """Subscribed (again). ``lost``: events published meanwhile may have been missed,
        so the in-process tiers are cleared (their copies may be of keys invalidated
        meanwhile); either way the markers are reloaded before the tiers are read again."""
        if lost:
            for slot in self.engine.slots:
                if slot.tier.in_process and len(self.engine.slots) > 1:
                    await slot.tier.clear()
        self._down.discard(source)
        await self._reload_markers()
        self._see()
        log.info("invalidation source %s subscribed", source)

    def _see(self) -> None:
        """Leave the blind state once every source is up and the markers are current."""
        if not self._down and (self._markers_loaded or self.store is None):
            self.engine.blind = False

    async def _reload_markers(self, all_of_them: bool = True) -> None:
        """Learn the markers kept in the store: all of them, or (``all_of_them=False``)
        those newer than the newest known minus ``CATCH_UP_MARGIN`` (a marker is kept within
        moments of its version; one kept late, after the store's outage, comes with the
        next full reload)."""
        if self.store is None:
            return
        newer_than = 0
        if not all_of_them and self._newest_loaded:
            newer_than = self._newest_loaded - (version_at(CATCH_UP_MARGIN, 0) - version_at(0, 0))
        try:
            markers = await self.store.load(newer_than)
        except TierError as exc:
            log.warning("invalidation markers not loaded: %s", exc)
            self._markers_loaded = False
            return
        oldest = self.markers.oldest_allowed()
        self.markers.add_all([marker for marker in markers if marker.version >= oldest])
        self._newest_loaded = max([self._newest_loaded, *(m.version for m in markers)])
        self._markers_loaded = True

    async def _upkeep(self) -> None:
        """Every ``liveness_interval``: learn the markers peers kept meanwhile (those of
        writes a cache tier missed included: a peer's read of that tier must not serve what
        it missed), all of them while blind and every ``PRUNE_INTERVAL``; keep the store's
        pending saves going; prune markers that hide nothing any more."""
        pruned_at = time.monotonic()
        while True:
            raise_if_cancelled()  # a Redis command may have swallowed the cancellation
            await asyncio.sleep(self.liveness_interval)
            try:
                full = self.engine.blind or time.monotonic() - pruned_at > PRUNE_INTERVAL
                await self._reload_markers(all_of_them=full)
                if self.engine.blind:
                    self._see()
                if self.store is not None:
                    await self.store.flush()
                now = time.monotonic()
                while self._until_applied and self._until_applied[0][0] < now:
                    _, key, version = self._until_applied.popleft()
                    self.markers.drop_key(key, version)
                if time.monotonic() - pruned_at > PRUNE_INTERVAL:
                    pruned_at = time.monotonic()
                    self.markers.prune()
            except Exception:  # the upkeep must outlive any surprise
                log.exception("invalidation upkeep failed")

    async def _keep_applier(self) -> None:
        """The applier lease, on its own: a slow channel must not delay the markers."""
        while True:
            raise_if_cancelled()  # a Redis command may have swallowed the cancellation
            try:  # at once at start: a lone sidecar applies events itself from the first
                await self._keep_applier_lease()
            except Exception:
                log.exception("applier lease upkeep failed")
            await asyncio.sleep(self.liveness_interval)

    async def _keep_missed(self, markers: Sequence[Marker]) -> None:
        self.markers.add_all(markers)
        if self.store is not None:
            await self.store.save(markers)

    async def _keep_applier_lease(self) -> None:
        """Hold or renew the applier lease; on taking it over, apply to the shared tiers
        the events the previous applier may not have applied (those heard within a lease's
        lifetime before the takeover)."""
        applier = self.applier
        if applier is None:
            return
        held = applier.held
        try:
            await applier.keep()
        except REDIS_ERRORS as exc:
            log.debug("applier lease not kept: %s", exc)
        window = time.monotonic() - applier.ttl - self.liveness_interval
        recent = self._recent
        while recent and recent[0][0] < window:
            recent.popleft()
        if applier.held and not held:
            log.info("this sidecar applies external events to the shared tiers now")
            while recent:
                _, event, version, source = recent.popleft()
                await self._apply_external(event, version, source)


class ApplierLease:
    """Which one sidecar applies a broadcast event (pub/sub, NOTIFY) from an external
    publisher to the shared tiers: the holder of a lease in the channel's Redis, taken with
    ``SET NX PX`` and renewed every second (so one event costs the shared tiers one
    application, not one per sidecar). A holder that dies loses it after ``ttl``."""

    ttl = 3.0
    _RENEW = (
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
    )

    def __init__(self, client: RedisClient, key: str, identity: str) -> None:
        self.client = client
        self.key = key
        self.identity = identity
        self.held = False

    async def keep(self) -> None:
        milliseconds = int(self.ttl * 1000)
        try:
            if self.held:
                self.held = bool(
                    await self.client.eval(self._RENEW, 1, self.key, self.identity, milliseconds)
                )
            if not self.held:
                self.held = bool(
                    await self.client.set(self.key, self.identity, nx=True, px=milliseconds)
                )
        except BaseException:
            self.held = False  # unknown: assume another may hold it
            raise

    async def release(self) -> None:
        if self.held:
            self.held = False
            await self.client.eval(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                "return redis.call('DEL', KEYS[1]) else return 0 end",
                1,
                self.key,
                self.identity,
            )


class _Lag(Collector):
    """``cachesvc_invalidation_lag_seconds{source}``, read from the listeners at scrape."""

    def __init__(self, listeners: Sequence[Listener]) -> None:
        self.listeners = listeners

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "cachesvc_invalidation_lag_seconds",
            "How far behind each invalidation source is (0 when caught up).",
            labels=["source"],
        )
        for listener in self.listeners:
            lag.add_metric([listener.source], listener.lag)
        yield lag


def _markers_of(event: InvalidationEvent, version: int) -> list[Marker]:
    return [Marker(f"p:{prefix}", version) for prefix in event.prefixes] + [
        Marker(f"t:{tag}", version) for tag in event.tags
    ]
