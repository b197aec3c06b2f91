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
from collections.abc import Sequence

import redis.asyncio as redis
from redis.exceptions import RedisError

from cachesvc.batching import Batcher
from cachesvc.engine import Engine
from cachesvc.errors import Unavailable
from cachesvc.journal import RETRY_ONCE
from cachesvc.markers import MarkerStore
from cachesvc.metrics import Metrics
from cachesvc.versions import version_at
from invalidation.base import Listener
from invalidation.events import InvalidationEvent, MalformedEvent
from tiers.base import Marker, TierError
from tiers.redis import load_markers, save_markers

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
    ) -> None:
        self.engine = engine
        self.listeners = listeners
        self.channel = channel
        self.markers = engine.markers
        self.liveness_interval = liveness_interval
        self.origin = uuid.uuid4().hex  # our own events come back to us: skip them
        self._redis = (
            redis.Redis.from_url(
                redis_url, socket_connect_timeout=1, socket_timeout=2, retry=RETRY_ONCE
            )
            if redis_url
            else None
        )
        self.store = self._marker_store(f"{channel}:markers")
        self._announcements: Batcher[Sequence[tuple[str, int]], None] = Batcher(self._announce)
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
            except RedisError as exc:
                raise TierError(f"the invalidation channel's Redis: {exc}") from exc

        async def load_channel() -> list[Marker]:
            try:
                return await load_markers(client, redis_key)
            except RedisError as exc:
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
        return {listener.source: listener.state for listener in self.listeners}

    # -- this sidecar's own invalidations and writes -------------------------------------

    async def invalidate(self, event: InvalidationEvent) -> None:
        """Apply ``event`` to every tier, keep its markers and tell the peers; raises
        Unavailable when that did not happen (see the module's docstring)."""
        version = self.engine.clock.next()
        if event.keys:
            try:
                await self.engine.delete_many(event.keys, version)
            except Unavailable as exc:
                if exc.outcome_unknown:
                    dropped = [(key, version) for key in event.keys]
                    await self.engine.superseded(dropped)
                    await self._publish(self._own(InvalidationEvent(event.keys), version))
                raise
        markers = _markers_of(event, version)
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
            origin=self.origin,
            sent_at=time.time(),
            version=version,
            written=event.written,
        )

    async def _publish(self, event: InvalidationEvent) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.publish(self.channel, event.to_json())
        except RedisError as exc:
            raise Unavailable(
                f"applied here, but the peer sidecars were not told: {exc}", "invalidation"
            ) from exc

    # -- events from the listeners (EventSink) -------------------------------------------

    async def on_event(self, event: InvalidationEvent, source: str) -> None:
        if event.origin == self.origin:
            self._events.labels(source, "own").inc()
            return
        if event.origin is not None:
            await self._apply_peers(event)
        else:
            await self._apply_external(event)
        self._events.labels(source, "applied").inc()
        if event.sent_at is not None:
            self._latency.labels(source).observe(max(0.0, time.time() - event.sent_at))

    async def _apply_peers(self, event: InvalidationEvent) -> None:
        """A peer applied this to the shared tiers and kept its markers: here, drop the
        in-process copies and learn the markers."""
        version = event.version
        pairs = list(event.written)
        if version is not None:
            self.engine.clock.witness(version)
            pairs += [(key, version) for key in event.keys]
            self.markers.add_all(_markers_of(event, version))
        if pairs:
            await self.engine.superseded(pairs)

    async def _apply_external(self, event: InvalidationEvent) -> None:
        if event.version is not None:
            version = event.version
        elif event.sent_at is not None:
            version = version_at(event.sent_at)
        else:
            version = self.engine.clock.next()
        self.engine.clock.witness(version)
        markers = _markers_of(event, version)
        if event.keys:
            try:
                await self.engine.delete_many(event.keys, version)
            except Unavailable as exc:
                # Not in the durable tier (yet): key markers hide the old value everywhere.
                log.warning("invalidation event: %s (hidden by key markers)", exc.detail)
                markers += [Marker(f"k:{key}", version) for key in event.keys]
        if markers:
            self.markers.add_all(markers)
            if self.store is not None:
                await self.store.save(markers)

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

    async def on_gap(self, source: str) -> None:
        """Subscribed (again): events published while not subscribed were missed. The
        in-process tiers are cleared (their copies may be of keys invalidated meanwhile);
        the shared ones are checked against the markers, reloaded."""
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


def _markers_of(event: InvalidationEvent, version: int) -> list[Marker]:
    return [Marker(f"p:{prefix}", version) for prefix in event.prefixes] + [
        Marker(f"t:{tag}", version) for tag in event.tags
    ]
