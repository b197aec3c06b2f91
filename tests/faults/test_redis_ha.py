"""Clustered and replicated Redis tiers under real faults: a cluster master killed, slots
migrated under traffic, a Sentinel failover (forced, and after a kill).

The servers are the session's private cluster and Sentinel set (``redis_cluster``,
``redis_sentinel``): each test waits until they are healthy before it breaks them, and
restores them (restarts what it killed, waits for the replicas to sync) before it ends.

Calls run as the engine runs them, each under the tier's own timeout; a call that runs
out of it counts as a TierTimeout. What the tests measure is printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import pytest
import redis

from invalidation.events import InvalidationEvent, MalformedEvent
from invalidation.redis_pubsub import RedisPubSubListener, publish
from tests.polling import until
from tests.servers import RedisClusterServers, RedisSentinelServers
from tiers.base import Tier, TierError, TierWrite
from tiers.redis import RedisTier
from tiers.redis_clients import create_client
from tiers.redis_cluster import RedisClusterTier

pytestmark = pytest.mark.faults

T = TypeVar("T")
V = 1_700_000_000_000_000
TIMEOUT = Tier.default_timeout  # what the engine gives a Redis call by default
# A call may overrun its timeout only by what cancelling it takes; more is a hang.
HANG = TIMEOUT + 1.0


@pytest.fixture
def cluster(redis_cluster: RedisClusterServers) -> Iterator[RedisClusterServers]:
    redis_cluster.wait_healthy()
    yield redis_cluster
    redis_cluster.restore()


@pytest.fixture
def sentinel_set(redis_sentinel: RedisSentinelServers) -> Iterator[RedisSentinelServers]:
    redis_sentinel.wait_healthy()
    yield redis_sentinel
    redis_sentinel.restore()


async def started(tier: Tier) -> AsyncIterator[Tier]:
    await tier.start()
    try:
        yield tier
    finally:
        await tier.close()


@pytest.fixture
async def cluster_tier(cluster: RedisClusterServers) -> AsyncIterator[Tier]:
    async for tier in started(RedisClusterTier("ha", urlsplit(cluster.url), 60)):
        yield tier


@pytest.fixture
async def sentinel_tier(sentinel_set: RedisSentinelServers) -> AsyncIterator[Tier]:
    async for tier in started(RedisTier("ha", urlsplit(sentinel_set.url), 60)):
        yield tier


@dataclass
class Traffic:
    """Batches of versioned writes and reads from a few tasks, each call under ``TIMEOUT``.

    Every write's payload is its version. ``acknowledged`` holds, per key, the highest
    version a write that succeeded carried; a read that returns an older version than was
    acknowledged before it started has lost a write (or let an older one win). Every
    fifth write carries versions older than any written, which must never be stored.
    """

    tier: Tier
    keys: list[str]
    started: float = field(default_factory=time.monotonic)
    versions: Iterator[int] = field(default_factory=lambda: itertools.count(V, 100))
    acknowledged: dict[str, int] = field(default_factory=dict)
    attempted: dict[str, int] = field(default_factory=dict)
    successes: list[float] = field(default_factory=list)  # when each call ended
    failures: list[tuple[float, BaseException]] = field(default_factory=list)  # (ended, ...)
    failed_starts: list[float] = field(default_factory=list)  # when each failed call began
    stale_reads: list[tuple[str, int, int]] = field(default_factory=list)
    worst: float = 0.0  # the longest call, seconds
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _workers: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Traffic:
        """Start four workers; return once calls succeed."""
        self._workers = [asyncio.create_task(self._worker(self._stop, n)) for n in range(4)]
        await self.until_succeeded(50, since=0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._workers)

    async def until_succeeded(self, calls: int, since: float) -> None:
        await until(
            lambda: _true(self.successes_since(since) > calls), 10, f"{calls} calls succeeding"
        )

    async def _worker(self, stop: asyncio.Event, seed: int) -> None:
        rng = random.Random(seed)
        for round_ in itertools.count():
            if stop.is_set():
                return
            batch = rng.sample(self.keys, 16)
            version = next(self.versions)
            if round_ % 5 == 4:
                version -= 10**9  # older than every version written: must never win
            else:
                for k in batch:
                    self.attempted[k] = max(self.attempted.get(k, 0), version)
            writes = [TierWrite(k, b"%d" % version, version, 60) for k in batch]
            if await self._call(self.tier.set_many(writes)) and round_ % 5 != 4:
                for k in batch:
                    self.acknowledged[k] = max(self.acknowledged.get(k, 0), version)
            floor = {k: self.acknowledged.get(k, 0) for k in batch}
            found = await self._call(self.tier.get_many(batch))
            for k, value in zip(batch, found or [], strict=False):
                stored = int(value) if value is not None else 0
                if stored < floor[k]:
                    self.stale_reads.append((k, stored, floor[k]))
            await asyncio.sleep(0.005)

    async def _call(self, call: Awaitable[T]) -> T | None:
        start = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT):
                result = await call
        except (TierError, TimeoutError) as exc:  # anything else fails the test
            self.failures.append((time.monotonic(), exc))
            self.failed_starts.append(start)
            return None
        finally:
            self.worst = max(self.worst, time.monotonic() - start)
        self.successes.append(time.monotonic())
        return result

    def successes_since(self, moment: float) -> int:
        return sum(1 for t in self.successes if t > moment)

    def failures_since(self, moment: float) -> list[BaseException]:
        """The failures of calls made after ``moment``. (A call sent just before it, on a
        connection to the node that died, still times out after it.)"""
        return [
            exc
            for began, (_, exc) in zip(self.failed_starts, self.failures, strict=True)
            if began > moment
        ]


@dataclass
class Outage:
    """When a fault began, what failed after it, and when the tier served again."""

    began: float
    first_failure: float | None = None
    last_failure: float | None = None
    served_again: float | None = None  # the first success after the first failure

    @classmethod
    def of(cls, traffic: Traffic, began: float) -> Outage:
        failed = [t for t, _ in traffic.failures if t > began]
        outage = cls(began)
        if failed:
            outage.first_failure, outage.last_failure = failed[0], failed[-1]
            outage.served_again = next((t for t in traffic.successes if t > failed[0]), None)
        return outage

    def report(self, what: str, traffic: Traffic) -> str:
        def since(moment: float | None) -> str:
            return "-" if moment is None else f"{moment - self.began:.2f} s"

        kinds = sorted({type(exc).__name__ for _, exc in traffic.failures})
        return (
            f"{what}: first failure after {since(self.first_failure)}, served again after "
            f"{since(self.served_again)}, last failure after {since(self.last_failure)}; "
            f"{len(traffic.failures)} failed calls ({', '.join(kinds) or 'none'}), "
            f"{len(traffic.successes)} succeeded, worst call {traffic.worst:.3f} s"
        )


async def serving(tier: Tier, key: str) -> bool:
    """Whether the tier reads and writes ``key``'s slot. The write's version is older than
    any the traffic writes, so it changes nothing."""
    try:
        async with asyncio.timeout(TIMEOUT):
            await tier.get_many([key])
            await tier.set_many([TierWrite(key, b"0", V - 1, 60)])
    except (TierError, TimeoutError):
        return False
    return True


def unique_keys(name: str, count: int) -> list[str]:
    run = f"{time.monotonic_ns():x}"
    return [f"ha:{run}:{name}:{n}" for n in range(count)]


# -- Redis Cluster -----------------------------------------------------------------------------


async def test_cluster_master_killed_under_traffic_fails_fast_then_serves_again(
    cluster: RedisClusterServers, cluster_tier: Tier
) -> None:
    keys = unique_keys("kill", 300)
    async with Traffic(cluster_tier, keys) as traffic:
        victim = cluster.master_of(f"cachesvc:{keys[0]}")
        killed_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        await until(lambda: _true(bool(traffic.failures)), 10, "calls failing after the kill")
        await asyncio.to_thread(cluster.wait_serving, 30)  # a replica took over
        await until(lambda: serving(cluster_tier, keys[0]), 15, "the tier serving again")
        recovered = time.monotonic()
        await traffic.until_succeeded(100, since=recovered)
    outage = Outage.of(traffic, killed_at)
    print("\n" + outage.report("cluster master killed -9", traffic))
    assert traffic.worst < HANG
    assert all(isinstance(exc, TierError | TimeoutError) for _, exc in traffic.failures)
    assert outage.served_again is not None
    assert traffic.failures_since(recovered) == []


async def test_cluster_slots_migrated_under_traffic_lose_nothing(
    cluster: RedisClusterServers, cluster_tier: Tier
) -> None:
    keys = unique_keys("reshard", 400)
    async with Traffic(cluster_tier, keys) as traffic:
        source = cluster.master_of(f"cachesvc:{keys[0]}")
        target = cluster.master_of(next(k for k in _other_slots(cluster, source)))
        began = time.monotonic()
        # Several thousand slots: the migration takes seconds, with keys moving meanwhile.
        await asyncio.to_thread(cluster.reshard, 3000, source, target)
        took = time.monotonic() - began
        await asyncio.to_thread(cluster.wait_healthy, 30)
        await traffic.until_succeeded(50, since=time.monotonic())
    print(
        f"\n3000 slots migrated in {took:.2f} s under traffic: {len(traffic.successes)} calls,"
        f" {len(traffic.failures)} failed, worst call {traffic.worst:.3f} s"
    )
    assert traffic.failures == []
    assert traffic.stale_reads == []
    final = await cluster_tier.get_many(keys)
    assert {k: int(v) for k, v in zip(keys, final, strict=True) if v is not None} == {
        k: traffic.attempted[k] for k in keys if k in traffic.attempted
    }


def _other_slots(cluster: RedisClusterServers, master: object) -> Iterator[str]:
    """Keys whose slot another master serves."""
    for n in itertools.count():
        if cluster.master_of(f"other{n}") is not master:
            yield f"other{n}"


# -- Redis Sentinel ----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "kill -9"])
async def test_sentinel_tier_follows_the_new_master(
    sentinel_set: RedisSentinelServers, sentinel_tier: Tier, how: str
) -> None:
    keys = unique_keys("sentinel", 200)
    async with Traffic(sentinel_tier, keys) as traffic:
        old = sentinel_set.master()
        began = time.monotonic()
        if how == "kill -9":
            await asyncio.to_thread(old.kill)
            new = await asyncio.to_thread(sentinel_set.wait_master_is_not, old)
        else:
            new = await asyncio.to_thread(sentinel_set.failover)
        named = time.monotonic()
        # Written after the Sentinels named it, read back from the new master itself: the
        # tier writes there, not to the old master (which a SENTINEL FAILOVER leaves a
        # master, its clients connected, until Sentinel reconfigures it ~10 s later).
        probe = keys[0] + ":probe"
        await until(lambda: _landed_on(sentinel_tier, new.port, probe), 5, "writes on the new")
        followed = time.monotonic()
        await traffic.until_succeeded(100, since=followed)
    outage = Outage.of(traffic, began)
    print(
        f"\n{outage.report(f'Sentinel failover ({how})', traffic)}; Sentinels named the new "
        f"master after {named - began:.2f} s, the tier wrote there after {followed - began:.2f} s"
    )
    assert traffic.worst < HANG
    assert all(isinstance(exc, TierError | TimeoutError) for _, exc in traffic.failures)
    assert traffic.failures_since(followed) == []


async def test_sentinel_tier_leaves_the_old_master_before_sentinel_demotes_it(
    sentinel_set: RedisSentinelServers, sentinel_tier: Tier
) -> None:
    # One call at a time: the pool reuses one connection, so nothing but the pool's own
    # check moves it; redis-py alone asks the Sentinels only when it opens a connection.
    key = unique_keys("pooled", 1)[0]
    assert await _landed_on(sentinel_tier, sentinel_set.master().port, key)
    old = sentinel_set.master()
    new = await asyncio.to_thread(sentinel_set.failover)
    await until(lambda: _landed_on(sentinel_tier, new.port, key), 5, "writes on the new master")
    # Sentinel has not made the old master a replica yet (it does on its next INFO, ~10 s
    # after): until then, a client still connected to it would write there, and lose it.
    assert (await asyncio.to_thread(old.info, "replication"))["role"] == "master"


async def test_sentinel_pool_drops_a_busy_connection_after_another_noticed_the_failover(
    sentinel_set: RedisSentinelServers,
) -> None:
    # A connection opened after the failover asks the Sentinels and so tells the pool of
    # the new master first; redis-py then closes only the idle connections. One that was
    # busy meanwhile still holds the old master and goes back to the pool, first in line.
    client = create_client(sentinel_set.url)
    pool = client.connection_pool
    try:
        busy = await pool.get_connection()
        new = await asyncio.to_thread(sentinel_set.failover)
        opened_after = await pool.get_connection()
        assert opened_after.port == new.port
        await pool.release(opened_after)
        await pool.release(busy)
        key = unique_keys("busy", 1)[0]

        async def written_to_the_new_master() -> bool:
            version = b"%d" % time.time_ns()
            await client.set(key, version)
            with redis.Redis("127.0.0.1", new.port, socket_timeout=2) as server:
                return await asyncio.to_thread(server.get, key) == version

        await until(written_to_the_new_master, 5, "writes on the new master")
    finally:
        await client.aclose()


@dataclass(frozen=True)
class NotLanded:
    """A write not found where it should be: false, and what happened instead (which a
    wait that gives up prints)."""

    instead: str

    def __bool__(self) -> bool:
        return False


async def _landed_on(tier: Tier, port: int, key: str) -> bool | NotLanded:
    version = time.time_ns() // 1000
    try:
        async with asyncio.timeout(TIMEOUT):
            await tier.set_many([TierWrite(key, b"%d" % version, version, 60)])
    except (TierError, TimeoutError) as exc:
        return NotLanded(f"the write failed: {exc!r}")
    with redis.Redis("127.0.0.1", port, socket_timeout=2) as server:
        stored = await asyncio.to_thread(server.get, f"cachesvc:{key}")
    if stored is not None and stored.endswith(b"%d" % version):
        return True
    return NotLanded(f"written at {version}; port {port} holds {stored!r:.60}")


async def test_invalidation_listener_follows_a_sentinel_failover(
    sentinel_set: RedisSentinelServers,
) -> None:
    sink = Sink()
    listener = RedisPubSubListener(sentinel_set.url, "ha:invalidate", liveness_interval=0.5)
    task = asyncio.create_task(listener.run(sink))
    try:
        await until(lambda: _true(sink.gaps == 1), 5, "subscribed")
        await asyncio.to_thread(sentinel_set.failover)
        # The subscription moves to the new master: a gap, then events published there.
        await until(lambda: _true(sink.gaps == 2), 5, "subscribed to the new master")

        async def delivered() -> bool:
            await publish(sentinel_set.url, "ha:invalidate", '{"keys": ["k"]}')
            return bool(sink.events)

        await until(delivered, 5, "an event published on the new master delivered")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_invalidation_listener_follows_its_shard_to_a_promoted_replica(
    cluster: RedisClusterServers,
) -> None:
    channel = "ha:invalidate"
    sink = Sink()
    listener = RedisPubSubListener(cluster.url, channel, liveness_interval=0.5)
    task = asyncio.create_task(listener.run(sink))
    try:
        await until(lambda: _true(sink.gaps == 1), 5, "subscribed")
        await asyncio.to_thread(cluster.master_of(channel).kill)
        await asyncio.to_thread(cluster.wait_serving, 30)

        async def delivered() -> bool:
            try:
                await publish(cluster.url, channel, '{"keys": ["k"]}')
            except (redis.RedisError, redis.RedisClusterException):
                return False  # the publisher's slot map is older than the failover
            return bool(sink.events)

        await until(delivered, 10, "an event published on the promoted replica delivered")
        assert sink.gaps >= 2  # the subscription was lost and made again: a gap
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class Sink:
    def __init__(self) -> None:
        self.events: list[InvalidationEvent] = []
        self.gaps = 0

    async def on_event(self, event: InvalidationEvent, source: str) -> None:
        self.events.append(event)

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None:
        raise AssertionError(f"malformed: {raw!r}")

    async def on_gap(self, source: str) -> None:
        self.gaps += 1

    def on_disconnect(self, source: str) -> None:
        pass


async def _true(value: bool) -> bool:
    return value
