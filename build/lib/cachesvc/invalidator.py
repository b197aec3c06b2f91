"""Applies invalidation events to every tier and publishes this sidecar's own (SPEC §4).

- keys: tombstones in every tier (durable first), as DELETE does; when the durable tier
  cannot take them, a key marker hides the old value instead;
- prefixes and tags: markers (``cachesvc.markers``), checked on every read;
- a lost subscription: while it is down, in-process tiers are not read (they would miss
  events); when it is back they are cleared and the shared markers reloaded, so nothing
  invalidated during the gap is served.

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
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from cachesvc.engine import Engine
from cachesvc.errors import Unavailable
from cachesvc.markers import Markers
from cachesvc.metrics import Metrics
from invalidation.base import Listener
from invalidation.events import InvalidationEvent, MalformedEvent

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 60.0

# ZADD ... GT keeps the newest version of a marker whichever sidecar records it first.
_RECORD_MARKERS = """
for i = 1, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], 'GT', ARGV[i + 1], ARGV[i])
end
return 1
"""


class Invalidator:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        listeners: list[Listener],
        redis_url: str | None = None,
        channel: str = "cachesvc:invalidate",
    ) -> None:
        self.engine = engine
        self.listeners = listeners
        self.channel = channel
        self.markers: Markers = engine.markers
        self.origin = uuid.uuid4().hex  # our own events come back to us: skip them
        self._redis = (
            redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
            if redis_url
            else None
        )
        self._markers_key = f"{channel}:markers"
        self._events = metrics.invalidation_events
        self._latency = metrics.invalidation_latency
        self._tasks: list[asyncio.Task[None]] = []
        self._down: set[str] = set()

    async def start(self) -> None:
        for listener in self.listeners:
            self._down.add(listener.source)
            self._tasks.append(
                asyncio.create_task(listener.run(self), name=f"invalidation-{listener.source}")
            )
        if self._down:
            self._suspend_in_process_tiers()
        self._tasks.append(asyncio.create_task(self._prune_markers(), name="marker-pruning"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.aclose()

    def states(self) -> dict[str, str]:
        return {listener.source: listener.state for listener in self.listeners}

    # -- this sidecar's own invalidations (DELETE, POST /v1/invalidate) ------------------

    async def invalidate(self, event: InvalidationEvent) -> None:
        """Apply ``event`` here, then tell the peers; Unavailable when either fell short."""
        version = self.engine.clock.next()
        shortfall = await self.apply(event, version)
        if self._redis is not None:
            message = InvalidationEvent(
                event.keys,
                event.prefixes,
                event.tags,
                origin=self.origin,
                sent_at=time.time(),
                version=version,
            ).to_json()
            try:
                await self._redis.publish(self.channel, message)
            except RedisError as exc:
                raise Unavailable(
                    f"invalidated here, but peer sidecars were not told: {exc}", "invalidation"
                ) from exc
        if shortfall is not None:
            raise shortfall

    async def apply(
        self, event: InvalidationEvent, version: int, local_only: bool = False
    ) -> Unavailable | None:
        """Apply ``event`` at ``version`` to every tier (``local_only``: to the in-process
        tiers and this sidecar's markers: a peer did the shared part); returns why the
        durable tier fell short, if it did (the event is applied regardless: markers cover
        what tombstones could not)."""
        markers = [("p", prefix) for prefix in event.prefixes]
        markers += [("t", tag) for tag in event.tags]
        shortfall = None
        if event.keys:
            try:
                await self.engine.delete_many(list(event.keys), version, local_only)
            except Unavailable as exc:
                markers += [("k", key) for key in event.keys]
                shortfall = exc
        for kind, name in markers:
            self.markers.add(kind, name, version)
        if markers and not local_only:
            await self._share_markers(markers, version)
        return shortfall

    async def _share_markers(self, markers: list[tuple[str, str]], version: int) -> None:
        if self._redis is None:
            return
        arguments: list[Any] = []
        for kind, name in markers:
            arguments += [f"{kind}:{name}", version]
        try:
            await self._redis.eval(_RECORD_MARKERS, 1, self._markers_key, *arguments)
        except RedisError as exc:
            # Applied here and broadcast; only sidecars that start later may not learn it.
            log.warning("could not record invalidation markers in Redis: %s", exc)

    async def _load_markers(self) -> None:
        if self._redis is None:
            return
        await self._redis.zremrangebyscore(
            self._markers_key, "-inf", f"({self.markers.oldest_allowed_us}"
        )
        stored: Any = await self._redis.zrange(self._markers_key, 0, -1, withscores=True)
        for member, score in stored:
            kind, _, name = member.decode().partition(":")
            if kind in ("k", "p", "t"):
                self.markers.add(kind, name, int(score))

    # -- events from the listeners (EventSink) -------------------------------------------

    async def on_event(self, event: InvalidationEvent, source: str) -> None:
        if event.origin == self.origin:
            self._events.labels(source, "own").inc()
            return
        from_peer = event.origin is not None and event.version is not None
        if event.version is not None:
            version = event.version
        elif event.sent_at is not None:
            version = int(event.sent_at * 1_000_000)
        else:
            version = self.engine.clock.next()
        self.engine.clock.witness(version)
        shortfall = await self.apply(event, version, local_only=from_peer)
        if shortfall is not None:
            log.warning("invalidation from %s: %s (hidden by markers)", source, shortfall.detail)
        self._events.labels(source, "applied").inc()
        if event.sent_at is not None:
            self._latency.labels(source).observe(max(0.0, time.time() - event.sent_at))

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None:
        self._events.labels(source, "malformed").inc()
        log.warning("malformed invalidation event from %s (%s): %.200r", source, error, raw)

    def on_disconnect(self, source: str) -> None:
        self._down.add(source)
        self._suspend_in_process_tiers()

    async def on_gap(self, source: str) -> None:
        try:
            await self._load_markers()
        except RedisError as exc:
            log.warning("could not load invalidation markers: %s", exc)
        self._down.discard(source)
        # Whatever an in-process tier cached may have missed an event during the gap.
        for slot in self.engine.slots:
            if slot.tier.in_process:
                await slot.tier.clear()
                slot.suspended = bool(self._down) and slot.suspended
        log.info("invalidation source %s subscribed", source)

    def _suspend_in_process_tiers(self) -> None:
        for slot in self.engine.slots:
            if slot.tier.in_process and len(self.engine.slots) > 1:
                slot.suspended = True

    async def _prune_markers(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            self.markers.prune()
