"""Invalidation events over Redis pub/sub (SPEC §4), and sharded pub/sub on a cluster.

The URL is any the Redis client factory knows (tiers/redis_clients.py): a server, the
master that Sentinels name (followed through a failover: the subscription moves with it,
and its confirmation is a gap like any reconnect), or a Redis Cluster. A cluster's
ordinary pub/sub sends every message to every node; sharded pub/sub keeps a channel on
the nodes of its hash slot, so there the listener ``SSUBSCRIBE``\\s and ``publish``
``SPUBLISH``\\es, and redis-py moves the subscription when the slot changes hands.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from invalidation.base import Backoff, EventSink, Listener, raise_if_cancelled
from tiers.redis_clients import create_client


class RedisPubSubListener(Listener):
    """SUBSCRIBE (SSUBSCRIBE on a cluster) on ``channel``; a silent connection is detected
    by PINGing it.

    A pub/sub connection that a proxy, a partition or ``CLIENT KILL`` dropped may look idle
    rather than broken, so the listener PINGs a connection silent for a third of
    ``liveness_interval`` and counts it lost when nothing at all arrived for the whole
    interval.
    """

    source = "redis"

    connection_errors = (RedisError, RedisClusterException, OSError)

    async def listen(self, sink: EventSink, backoff: Backoff) -> None:
        # No socket timeout: the reads wait with their own, and liveness is checked by PING.
        client = create_client(self.url, socket_timeout=None, connect_timeout=2)
        try:
            async with client.pubsub() as pubsub:
                await self._subscribed(pubsub, sink, backoff)
        finally:
            await client.aclose()

    async def _subscribed(self, pubsub: PubSub, sink: EventSink, backoff: Backoff) -> None:
        sharded = isinstance(pubsub, ClusterPubSub)
        if isinstance(pubsub, ClusterPubSub):
            await pubsub.ssubscribe(self.channel)
        else:
            await pubsub.subscribe(self.channel)
        # Silent for a third of the liveness interval: PING. Nothing at all (no message, no
        # PONG) for the whole interval: the connection is lost (a partition that drops
        # packets looks idle, not broken), which the sidecar must know within it.
        last_heard = time.monotonic()
        quiet = self.liveness_interval / 3
        while True:
            # A stop that came while redis-py waited for SUBSCRIBE's reply (or a PONG) is
            # swallowed by it; this loop never ends by itself, so it looks each turn.
            raise_if_cancelled()
            message = await self._next_message(pubsub, quiet)
            now = time.monotonic()
            if message is None:
                if now - last_heard >= self.liveness_interval:
                    raise RedisError(
                        f"nothing heard on the pub/sub connection for {self.liveness_interval:g} s"
                    )
                await _ping(pubsub)
                continue
            last_heard = now
            kind = message["type"]
            if kind == ("ssubscribe" if sharded else "subscribe"):
                # Also after a reconnect inside redis-py: either way, a gap just ended.
                self.state = "up"
                backoff.reset()
                await sink.on_gap(self.source)
            elif kind == ("smessage" if sharded else "message"):
                await self.deliver(message["data"], sink)

    @staticmethod
    async def _next_message(pubsub: PubSub, wait: float) -> dict[str, Any] | None:
        """The next message, or None after ``wait`` seconds without one."""
        if isinstance(pubsub, ClusterPubSub):
            return await pubsub.get_sharded_message(timeout=wait)
        message: dict[str, Any] | None = await pubsub.get_message(timeout=wait)
        return message


async def _ping(pubsub: PubSub) -> None:
    """PING the connection(s) the subscription lives on; the PONG arrives as a message."""
    if isinstance(pubsub, ClusterPubSub):
        # The subscription lives on the connection to its slot's node, not on the
        # cluster pub/sub's own.
        for node_pubsub in list(pubsub.node_pubsub_mapping.values()):
            await node_pubsub.ping()
    else:
        await pubsub.ping()


async def publish(url: str, channel: str, message: str) -> int:
    """Publish ``message`` on ``channel`` (SPUBLISH on a cluster); returns how many
    subscribers received it."""
    client = create_client(url, connect_timeout=2)
    try:
        if isinstance(client, RedisCluster):
            receivers: int = await client.spublish(channel, message)
        else:
            receivers = await client.publish(channel, message)
    finally:
        await client.aclose()
    return receivers
