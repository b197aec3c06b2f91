"""cachesvc.nodes.NodeSlots over a real two-node memcached tier, one node hung (SIGSTOP):
the other node's keys keep being served, the hung node's keys fail fast once its own
breaker is open, go to the gutter when there is one (after its quarantine), and the node
is repaired once back.

The calls are the engine's (readable, get, set, set_many, miss, probe, repair), made by
the test so that each step can be checked.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import pytest

from cachesvc.metrics import Metrics
from cachesvc.nodes import NodeSlots
from cachesvc.slot import PartlyFailed, TierSlot
from tests.faults.test_memcached_nodes import second_memcached  # noqa: F401 - the fixture
from tests.polling import until
from tests.servers import MemcachedServer
from tiers.base import Tier, TierError, TierUnavailable, TierWrite
from tiers.memcached import MemcachedTier

pytestmark = pytest.mark.faults

V = 1_700_000_000_000_000
TTL = 300.0
BREAKER_RESET = 0.2

MakeSlots = Callable[[str], Awaitable[NodeSlots]]


@pytest.fixture
async def make_slots(
    memcached_server: MemcachedServer,
    second_memcached: MemcachedServer,  # noqa: F811 - the fixture imported above
) -> AsyncIterator[MakeSlots]:
    """NodeSlots over a tier of the test's two memcached servers (``query`` added to its
    URL); node 0 is ``memcached_server``, the one the tests hang."""
    servers = [memcached_server, second_memcached]
    metrics = Metrics()
    built: list[NodeSlots] = []

    def slot_for(tier: Tier) -> TierSlot:
        return TierSlot(
            tier,
            timeout=0.1,
            breaker_failures=1,
            breaker_reset=BREAKER_RESET,
            metrics=metrics.for_tier(tier.name),
        )

    async def make(query: str) -> NodeSlots:
        netloc = ",".join(urlsplit(server.url).netloc for server in servers)
        tier = MemcachedTier("l2", urlsplit(f"memcached://{netloc}?{query}"), TTL)
        await tier.start()
        slots = NodeSlots(tier, slot_for, metrics.for_tier("l2"))
        built.append(slots)
        return slots

    yield make
    for server in servers:
        await asyncio.to_thread(server.resume)
    for slots in built:
        await slots.close()


def key_on(slots: NodeSlots, node: int) -> str:
    while True:
        key = uuid.uuid4().hex[:12]
        if slots.tier.node_for(key) == node:
            return key


async def until_every_breaker_closed(slots: NodeSlots) -> None:
    async def closed() -> bool:
        await slots.probe()  # as the engine's tier monitor does
        return slots.state == "closed"

    await until(closed, 5, "every node's breaker closed by a probe")


async def settle(future: asyncio.Future[bytes | None]) -> bytes | TierError | None:
    try:
        return await future
    except TierError as exc:
        return exc


async def test_without_gutter_a_hung_node_fails_only_its_keys(
    make_slots: MakeSlots, memcached_server: MemcachedServer
) -> None:
    slots = await make_slots("")
    hung, live = key_on(slots, 0), key_on(slots, 1)
    await slots.set(TierWrite(hung, b"h", V, TTL))
    await slots.set(TierWrite(live, b"l", V, TTL))

    await asyncio.to_thread(memcached_server.hang)
    assert isinstance(await settle(slots.get(hung)), TierError)  # times out, opens node 0
    assert [slots.nodes[0].state, slots.nodes[1].state, slots.state] == [
        "open",
        "closed",
        "degraded",
    ]
    assert await slots.get(live) == b"l"
    with pytest.raises(TierUnavailable, match="circuit breaker open"):
        await slots.get(hung)  # at once: the node's breaker is open
    with pytest.raises(PartlyFailed) as failed:
        await slots.set_many(
            [TierWrite(hung, b"h2", V + 1, TTL), TierWrite(live, b"l2", V + 1, TTL)]
        )
    assert [write.key for write in failed.value.failed] == [hung]
    for write in failed.value.failed:  # what the engine does with them
        slots.miss(write.key, write.version)
    assert await slots.get(live) == b"l2"
    assert slots.missed == {hung: V + 1}
    assert not slots.readable(hung) and slots.readable(live)

    await asyncio.to_thread(memcached_server.resume)
    await until_every_breaker_closed(slots)
    await slots.repair()
    assert slots.missed == {}
    assert await slots.get(hung) is None  # the value it missed the replacement of: deleted


async def test_gutter_serves_and_takes_a_down_nodes_keys(
    make_slots: MakeSlots,
    memcached_server: MemcachedServer,
    memcached_url: str,
) -> None:
    gutter_netloc = urlsplit(memcached_url).netloc
    slots = await make_slots(f"gutter={gutter_netloc}&gutter_ttl=1")
    assert slots.gutter is not None
    hung, live = key_on(slots, 0), key_on(slots, 1)
    await slots.set(TierWrite(hung, b"before", V, TTL))

    await asyncio.to_thread(memcached_server.hang)
    assert isinstance(await settle(slots.get(hung)), TierError)  # opens node 0's breaker

    async def served_by_gutter() -> bool:  # once gutter_ttl has passed since the start
        return not isinstance(await settle(slots.get(hung)), TierError)

    await until(served_by_gutter, 5, "reads of node 0's keys answered by the gutter")
    assert await slots.get(hung) is None  # not in the gutter yet: the engine reads below
    with pytest.raises(TierUnavailable, match="went to the gutter"):
        await slots.set(TierWrite(hung, b"during", V + 1, TTL))
    slots.miss(hung, V + 1)  # as the engine does for a write the tier did not take
    assert await slots.get(hung) == b"during"  # from the gutter
    assert await slots.gutter.tier.get(hung) == b"during"
    await slots.set(TierWrite(live, b"live", V, TTL))  # node 1 is not concerned
    assert await slots.nodes[1].tier.get(live) == b"live"
    assert await slots.gutter.tier.get(live) is None

    await asyncio.to_thread(memcached_server.resume)
    await until_every_breaker_closed(slots)
    await slots.repair()
    # Node 0 is read again: the write it missed deleted what it held from before.
    assert await slots.get(hung) is None
    assert await slots.nodes[0].tier.get(hung) is None


async def test_gutter_is_not_read_until_gutter_ttl_after_a_node_came_back(
    make_slots: MakeSlots,
    memcached_server: MemcachedServer,
    memcached_url: str,
) -> None:
    # At start as after an outage: the gutter may hold what was put there during an
    # earlier outage, older than what the node took since. With gutter_ttl = 60 s, this
    # whole test runs inside that window.
    slots = await make_slots(f"gutter={urlsplit(memcached_url).netloc}&gutter_ttl=60")
    assert slots.gutter is not None
    hung = key_on(slots, 0)
    await slots.gutter.tier.set(TierWrite(hung, b"from an earlier outage", V, TTL))

    await asyncio.to_thread(memcached_server.hang)
    assert isinstance(await settle(slots.get(hung)), TierError)
    with pytest.raises(TierUnavailable, match="circuit breaker open"):
        await slots.get(hung)  # not the gutter's old value
    with pytest.raises(TierUnavailable, match="went to the gutter"):
        await slots.set(TierWrite(hung, b"newer", V + 1, TTL))  # writes still go there
    assert await slots.gutter.tier.get(hung) == b"newer"
