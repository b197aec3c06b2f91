"""A memcached tier of two real nodes, one of them hung (SIGSTOP), killed or restarted:
each node is its own failure domain, through the node tiers it exposes; and its gutter
node keeps values no longer than ``gutter_ttl``.

Tier level only (no sidecar): what the engine builds on. Both nodes are the test's own
servers, so breaking one touches nothing shared.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest

from tests.polling import until
from tests.servers import MemcachedServer
from tiers.base import Tier, TierError, TierUnavailable, TierWrite
from tiers.memcached import MemcachedTier

pytestmark = pytest.mark.faults

V = 1_700_000_000_000_000
TTL = 30.0
HUNG_TIMEOUT = 0.3  # what the engine's per-call timeout would be


@pytest.fixture
def second_memcached() -> Iterator[MemcachedServer]:
    with MemcachedServer() as server:
        yield server


@pytest.fixture
async def ring(
    memcached_server: MemcachedServer, second_memcached: MemcachedServer
) -> AsyncIterator[tuple[MemcachedTier, list[MemcachedServer]]]:
    servers = [memcached_server, second_memcached]
    netloc = ",".join(urlsplit(server.url).netloc for server in servers)
    tier = MemcachedTier("l2", urlsplit(f"memcached://{netloc}"), TTL)
    await tier.start()
    try:
        yield tier, servers
    finally:
        await asyncio.to_thread(memcached_server.resume)  # a hung server would stall close
        await asyncio.to_thread(second_memcached.resume)
        await tier.close()


def keys_by_node(tier: MemcachedTier, count: int = 40) -> list[list[str]]:
    """``count`` fresh keys, grouped by the node that holds them (both nodes get some)."""
    namespace = uuid.uuid4().hex[:8]
    groups: list[list[str]] = [[] for _ in tier.nodes()]
    for n in range(count):
        key = f"{namespace}:{n}"
        groups[tier.node_for(key)].append(key)
    assert all(groups), "every node holds some of the keys"
    return groups


async def written(
    ring: tuple[MemcachedTier, list[MemcachedServer]],
) -> tuple[MemcachedTier, list[MemcachedServer], list[str], list[str]]:
    """The ring with fresh keys written through the whole tier: those of node 0, node 1."""
    tier, servers = ring
    on_0, on_1 = keys_by_node(tier)
    await tier.set_many(writes(on_0 + on_1))
    return tier, servers, on_0, on_1


def writes(keys: list[str], version: int = V) -> list[TierWrite]:
    return [TierWrite(key, key.encode(), version, TTL) for key in keys]


def values(keys: list[str]) -> list[bytes | None]:
    return [key.encode() for key in keys]


async def test_nodes_hold_exactly_the_keys_node_for_names(
    ring: tuple[MemcachedTier, list[MemcachedServer]],
) -> None:
    tier, _ = ring
    nodes = tier.nodes()
    assert len(nodes) == 2
    assert [node.name for node in nodes] == [
        f"l2/{urlsplit(server.url).netloc}" for server in ring[1]
    ]
    assert all(node.ttl == tier.ttl for node in nodes)
    on_0, on_1 = keys_by_node(tier)
    await tier.set_many(writes(on_0 + on_1))  # the whole tier spreads them
    assert await nodes[0].get_many(on_0 + on_1) == values(on_0) + [None] * len(on_1)
    assert await nodes[1].get_many(on_0 + on_1) == [None] * len(on_0) + values(on_1)
    await nodes[1].set_many(writes(on_1, V + 1))  # and a node's writes, the whole tier reads
    assert await tier.get_many(on_0 + on_1) == values(on_0 + on_1)


async def test_a_hung_node_times_out_alone(
    ring: tuple[MemcachedTier, list[MemcachedServer]],
) -> None:
    tier, servers, hung_keys, live_keys = await written(ring)
    hung, live = tier.nodes()
    await asyncio.to_thread(servers[0].hang)

    # A call to the hung node, with a timeout this test makes expire when it chooses.
    started = asyncio.Event()

    async def call_hung_node() -> None:
        async with asyncio.timeout(None) as deadline:
            deadline_of["hung"] = deadline
            started.set()
            await hung.get_many(hung_keys)

    deadline_of: dict[str, asyncio.Timeout] = {}
    stuck = asyncio.ensure_future(call_hung_node())
    await started.wait()
    # While it waits, the other node answers every call, reads and writes.
    for round_ in range(20):
        assert await live.get_many(live_keys) == values(live_keys)
        await live.set_many(writes(live_keys, V + round_))
    assert not stuck.done()  # the hung node cannot have answered
    deadline_of["hung"].reschedule(asyncio.get_running_loop().time())
    with pytest.raises(TimeoutError):
        await stuck
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(HUNG_TIMEOUT):
            await hung.set_many(writes(hung_keys, V + 100))
    with pytest.raises(TimeoutError):  # the whole tier needs every node
        async with asyncio.timeout(HUNG_TIMEOUT):
            await tier.get_many(hung_keys + live_keys)
    assert await live.get_many(live_keys) == values(live_keys)

    await asyncio.to_thread(servers[0].resume)
    # The cancelled calls left no half reply behind: the next call reads its own answer.
    assert await hung.get_many(hung_keys) == values(hung_keys)
    await hung.ping()


async def test_a_killed_node_fails_alone_and_is_used_again_once_restarted(
    ring: tuple[MemcachedTier, list[MemcachedServer]],
) -> None:
    tier, servers, dead_keys, live_keys = await written(ring)
    dead, live = tier.nodes()

    await asyncio.to_thread(servers[0].kill)
    with pytest.raises(TierUnavailable):
        await dead.get_many(dead_keys)
    with pytest.raises(TierUnavailable):
        await dead.set_many(writes(dead_keys, V + 1))
    assert await live.get_many(live_keys) == values(live_keys)

    await asyncio.to_thread(servers[0].restart)  # same port, empty
    await dead.ping()
    assert await dead.get_many(dead_keys) == [None] * len(dead_keys)
    await dead.set_many(writes(dead_keys, V + 2))
    assert await tier.get_many(dead_keys + live_keys) == values(dead_keys + live_keys)


async def test_first_call_after_a_restart_is_clean_and_the_next_works(
    ring: tuple[MemcachedTier, list[MemcachedServer]],
) -> None:
    # No call between the kill and the restart: the node's pooled connections are dead
    # when the first call after the restart comes.
    tier, servers, restarted_keys, live_keys = await written(ring)
    restarted, live = tier.nodes()
    await asyncio.gather(*(restarted.get_many(restarted_keys) for _ in range(8)))

    await asyncio.to_thread(servers[0].kill)
    await asyncio.to_thread(servers[0].restart)
    try:
        first: list[bytes | None] | TierError = await restarted.get_many(restarted_keys)
    except TierError as exc:
        first = exc
    assert first == [None] * len(restarted_keys) or isinstance(first, TierUnavailable)
    assert await restarted.get_many(restarted_keys) == [None] * len(restarted_keys)
    await restarted.set_many(writes(restarted_keys, V + 1))
    assert await restarted.get_many(restarted_keys) == values(restarted_keys)
    assert await live.get_many(live_keys) == values(live_keys)


# -- the gutter ------------------------------------------------------------------------------


@pytest.fixture
async def with_gutter(
    memcached_url: str, second_memcached: MemcachedServer
) -> AsyncIterator[MemcachedTier]:
    gutter = urlsplit(second_memcached.url).netloc
    url = urlsplit(f"{memcached_url}?gutter={gutter}&gutter_ttl=1")
    MemcachedTier.validate_url(url)
    tier = MemcachedTier("l2", url, TTL)
    await tier.start()
    try:
        yield tier
    finally:
        await tier.close()


async def test_gutter_is_a_tier_of_its_own_with_the_short_ttl(with_gutter: MemcachedTier) -> None:
    tier = with_gutter
    gutter = tier.gutter()
    assert isinstance(gutter, Tier)
    assert gutter not in tier.nodes()
    assert (gutter.name, gutter.ttl) == ("l2/gutter", 1.0)
    key = f"{uuid.uuid4().hex[:8]}:k"
    await gutter.set_many([TierWrite(key, b"in the gutter", V, TTL)])
    assert await gutter.get_many([key]) == [b"in the gutter"]
    assert await tier.get_many([key]) == [None]  # not on the ring's node
    await gutter.set_many([TierWrite(key, b"older", V - 1, TTL)])  # versions hold there too
    assert await gutter.get(key) == b"in the gutter"


async def test_gutter_keeps_values_no_longer_than_gutter_ttl_and_tombstones_their_ttl(
    with_gutter: MemcachedTier,
) -> None:
    gutter = with_gutter.gutter()
    assert gutter is not None
    value, deleted = (f"{uuid.uuid4().hex[:8]}:{name}" for name in ("value", "deleted"))
    # Both asked to live 30 s: the value is cut to gutter_ttl, the tombstone is not.
    await gutter.set_many([TierWrite(value, b"v", V, TTL), TierWrite(deleted, None, V, TTL)])

    async def value_gone() -> bool:
        return await gutter.get(value) is None

    await until(value_gone, 5, "the gutter's value expired after gutter_ttl")
    await gutter.set_many([TierWrite(deleted, b"stale fill", V - 1, TTL)])
    assert await gutter.get(deleted) is None  # the tombstone still refuses older writes
