"""Invalidation events over Redis pub/sub (SPEC §4)."""

from __future__ import annotations

import time

import redis.asyncio as redis
from redis.exceptions import RedisError

from invalidation.base import Backoff, EventSink, Listener


class RedisPubSubListener(Listener):
    """SUBSCRIBE on ``channel``; a silent connection is detected by PINGing it.

    A pub/sub connection that a proxy or ``CLIENT KILL`` dropped may look idle rather than
    broken, so after ``liveness_interval`` seconds without traffic the listener PINGs, and
    reconnects when no PONG arrives within another interval.
    """

    source = "redis"

    connection_errors = (RedisError, OSError)

    async def listen(self, sink: EventSink, backoff: Backoff) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2)
        try:
            await self._subscribed(client, sink, backoff)
        finally:
            await client.aclose()

    async def _subscribed(self, client: redis.Redis, sink: EventSink, backoff: Backoff) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(self.channel)
            last_heard = time.monotonic()
            ping_sent: float | None = None
            while True:
                message = await pubsub.get_message(timeout=min(1.0, self.liveness_interval))
                now = time.monotonic()
                if message is None:
                    if ping_sent is not None and now - ping_sent > self.liveness_interval:
                        raise RedisError("no PONG on the pub/sub connection")
                    if ping_sent is None and now - last_heard > self.liveness_interval:
                        await pubsub.ping()
                        ping_sent = now
                    continue
                last_heard, ping_sent = now, None
                kind = message["type"]
                if kind == "subscribe":
                    # Also after a reconnect inside redis-py: either way, a gap just ended.
                    self.state = "up"
                    backoff.reset()
                    await sink.on_gap(self.source)
                elif kind == "message":
                    await self.deliver(message["data"], sink)


async def publish(url: str, channel: str, message: str) -> int:
    """Publish ``message`` on ``channel``; returns how many subscribers received it."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        receivers: int = await client.publish(channel, message)
    finally:
        await client.aclose()
    return receivers
