"""The Redis invalidation listener and ``publish`` on every kind of Redis URL: a server,
the master that Sentinels name, and a cluster (sharded pub/sub: SSUBSCRIBE, SPUBLISH)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from invalidation.events import InvalidationEvent, MalformedEvent
from invalidation.redis_pubsub import RedisPubSubListener, publish
from tests.polling import until
from tiers.redis_clients import create_client

CHANNEL = "test:invalidate"


class Sink:
    def __init__(self) -> None:
        self.events: list[InvalidationEvent] = []
        self.malformed: list[bytes | str] = []
        self.gaps = 0

    async def on_event(self, event: InvalidationEvent, source: str) -> None:
        self.events.append(event)

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None:
        self.malformed.append(raw)

    async def on_gap(self, source: str) -> None:
        self.gaps += 1

    def on_disconnect(self, source: str) -> None:
        pass


@pytest.fixture(params=["redis", "redis-sentinel", "redis-cluster"])
def url(request: pytest.FixtureRequest) -> str:
    fixture = {
        "redis": "redis_url",
        "redis-sentinel": "redis_sentinel_url",
        "redis-cluster": "redis_cluster_url",
    }[request.param]
    value: str = request.getfixturevalue(fixture)
    return value


@pytest.fixture
async def sink(url: str) -> AsyncIterator[Sink]:
    received = Sink()
    listener = RedisPubSubListener(url, CHANNEL, liveness_interval=0.3)
    task = asyncio.create_task(listener.run(received))
    await until(lambda: _true(listener.state == "up"), 5, "subscribed")
    yield received
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_published_events_reach_the_sink(url: str, sink: Sink) -> None:
    assert await publish(url, CHANNEL, '{"keys": ["a"], "tags": ["t"]}') == 1
    assert await publish(url, CHANNEL, "not json") == 1
    await until(lambda: _true(len(sink.events) == 1 and len(sink.malformed) == 1), 2, "both")
    assert sink.events[0].keys == ("a",)
    assert sink.gaps == 1


async def test_a_quiet_subscription_stays_up(url: str, sink: Sink) -> None:
    # Three liveness intervals without traffic: the listener PINGs, gets its PONG (on a
    # cluster, on the shard's own connection) and neither reconnects nor reports a gap.
    await asyncio.sleep(1.0)
    assert sink.gaps == 1
    assert await publish(url, CHANNEL, '{"keys": ["b"]}') == 1
    await until(lambda: _true(len(sink.events) == 1), 2, "delivered after the quiet time")


async def test_cluster_events_are_sharded(redis_cluster_url: str) -> None:
    # Received through SSUBSCRIBE, published with SPUBLISH: a plain PUBLISH on a cluster
    # (broadcast to every node) reaches no sharded subscriber.
    sink = Sink()
    listener = RedisPubSubListener(redis_cluster_url, CHANNEL, liveness_interval=5)
    task = asyncio.create_task(listener.run(sink))
    try:
        await until(lambda: _true(listener.state == "up"), 5, "subscribed")
        client = create_client(redis_cluster_url)
        assert isinstance(client, RedisCluster)
        try:
            assert await client.publish(CHANNEL, '{"keys": ["plain"]}') == 0
            assert await client.spublish(CHANNEL, '{"keys": ["sharded"]}') == 1
        finally:
            await client.aclose()
        await until(lambda: _true(len(sink.events) == 1), 2, "the SPUBLISHed event")
        assert sink.events[0].keys == ("sharded",)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _true(value: bool) -> bool:
    return value
