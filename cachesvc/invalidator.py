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

This sidecar's own invalidations (DELETE, bulk delete, POST /v1/invalidate) are answered
once applied and published. When the durable tier refuses a key's tombstone the
invalidation leaves no trace (503): every sidecar goes on serving the old value, alike.
When its answer is unknown (a timeout) the copies are dropped everywhere (what it holds
decides, and the cache tiers are repaired from it) and the client still gets 503.

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
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio.cluster import RedisCluster

from cachesvc.batching import Batcher
from cachesvc.engine import Engine
from cachesvc.errors import Unavailable
from cachesvc.journal import REDIS_ERRORS
from cachesvc.markers import MarkerStore
from cachesvc.metrics import Metrics
from cachesvc.namespaces import scoped
from cachesvc.versions import version_at
from invalidation.base import Listener
from invalidation.events import InvalidationEvent, MalformedEvent
from invalidation.postgres_wal import PostgresWalListener
from invalidation.redis_stream import Trimming, append
from tiers.base import Marker, TierError
from tiers.redis import load_markers, save_markers
from tiers.redis_clients import create_client

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 60.0


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
        self._announcements: Batcher[Sequence[tuple[str, int]], None] = Batcher(self._announce)
        metrics.registry.register(_Lag(listeners))
        self._events = metrics.invalidation_events
        self._latency = metrics.invalidation_latency
        self._tasks: list[asyncio.Task[None]] = []
        self._down: set[str] = set()
        self._markers_loaded = False

    def _marker_store(self, redis_key: str) -> MarkerStore | None:
        durable = self.engine.durable
        ttl = self.markers.max_age
        if durable.tier.keeps_markers:

            async def save_durable(markers: Sequence[Marker], lifetime: float) -> None:
                await durable.call(durable.tier.save_markers(markers, lifetime))

            async def load_durable() -> list[Marker]:
                return await durable.call(durable.tier.load_markers())

            return MarkerStore(save_durable, load_durable, ttl)
        client = self._redis
        if client is None:
            return None  # nothing shared: this sidecar's markers live in its memory only

        async def save_channel(markers: Sequence[Marker], lifetime: float) -> None:
            try:
                await save_markers(client, redis_key, markers, lifetime)
            except REDIS_ERRORS as exc:
                raise TierError(f"the invalidation channel's Redis: {exc}") from exc

        async def load_channel() -> list[Marker]:
            try:
                return await load_markers(client, redis_key)
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

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._announcements.close()
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
        """Apply ``event`` to every tier, keep its markers and tell the peers; raises
        Unavailable when that did not happen (see the module's docstring)."""
        version = self.engine.clock.next()
        engine, held = self._engine_of(event), scoped(event)
        if held.keys:
            try:
                await engine.delete_many(held.keys, version)
            except Unavailable as exc:
                if exc.outcome_unknown:
                    dropped = [(key, version) for key in held.keys]
                    await engine.superseded(dropped)
                    keys_only = InvalidationEvent(event.keys, namespace=event.namespace)
                    await self._publish(self._own(keys_only, version))
                raise
        markers = _markers_of(held, version)
        if markers:
            self.markers.add_all(markers)
            if self.store is not None:
                await self.store.save(markers)  # kept for a retry if the store is down
        await self._publish(self._own(event, version))

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
        if event.origin is not None or source in self._pickers:
            # A peer applied it to the shared tiers already; or the source picks one
            # sidecar to do that (on_shared): here, this process's copies only.
            await self._apply_here(event, self._version_of(event))
        else:
            await self._apply_external(event, self._version_of(event))
        self._applied(event, source)

    async def on_shared(self, event: InvalidationEvent, source: str) -> None:
        """This sidecar, and no other, applies ``event`` to the shared tiers."""
        await self._apply_external(event, self._version_of(event))

    async def originate(self, event: InvalidationEvent, source: str) -> None:
        """Only this sidecar saw ``event`` (a change read from the write-ahead log): applied
        to every tier and handed to the peers, or Unavailable (delivered again)."""
        await self.invalidate(event)
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

    async def _apply_here(self, event: InvalidationEvent, version: int) -> None:
        """Drop this process's copies — in-process tiers, lookups, overlay — of what
        ``event`` covers, and learn its markers."""
        held = scoped(event)
        pairs = [*held.written, *((key, version) for key in held.keys)]
        self.markers.add_all(_markers_of(held, version))
        if pairs:
            await self.engine.superseded(pairs)

    async def _apply_external(self, event: InvalidationEvent, version: int) -> None:
        """Apply ``event`` to every tier (an external publisher's: nobody else does)."""
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

    def _engine_of(self, event: InvalidationEvent) -> Engine:
        """The engine over the tiers of ``event``'s namespace (an unknown one's, as a
        peer with a newer configuration may send: every tier)."""
        return self.engines.get(event.namespace, self.engine)

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None:
        self._events.labels(source, "malformed").inc()
        log.warning("malformed invalidation event from %s (%s): %.200r", source, error, raw)

    def on_disconnect(self, source: str) -> None:
        if not self._down:
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

    async def _reload_markers(self) -> None:
        if self.store is None:
            return
        try:
            markers = await self.store.load()
        except TierError as exc:
            log.warning("invalidation markers not loaded: %s", exc)
            self._markers_loaded = False
            return
        oldest = self.markers.oldest_allowed()
        self.markers.add_all([marker for marker in markers if marker.version >= oldest])
        self._markers_loaded = True

    async def _upkeep(self) -> None:
        """While blind, reload the markers (the durable-only reads check them); keep the
        store's pending saves going; prune markers that hide nothing any more."""
        pruned_at = time.monotonic()
        while True:
            await asyncio.sleep(self.liveness_interval)
            try:
                if self.engine.blind:
                    await self._reload_markers()
                    self._see()
                if self.store is not None:
                    await self.store.flush()
                if time.monotonic() - pruned_at > PRUNE_INTERVAL:
                    pruned_at = time.monotonic()
                    self.markers.prune()
            except Exception:  # the upkeep must outlive any surprise
                log.exception("invalidation upkeep failed")


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
