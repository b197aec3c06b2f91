"""A memcached tier of two nodes, one of them hung, in a running sidecar: only the keys the
hung node holds go to the tier below; the other node goes on serving its own (it was 1 of
100 reads still served by l2: one node's fault took the whole tier out)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tests.faults.conftest import fault_settings, timed_get
from tests.faults.test_memcached_nodes import second_memcached  # noqa: F401 - the fixture
from tests.faults.test_tier_faults import put_all, report
from tests.servers import MemcachedServer, flush_redis
from tests.service.conftest import MakeClient

pytestmark = pytest.mark.faults

KEYS = [f"node-fault:{n}" for n in range(100)]


async def test_one_hung_node_takes_out_only_its_keys(
    clean_redis_url: str,
    memcached_server: MemcachedServer,
    second_memcached: MemcachedServer,  # noqa: F811 - the fixture imported above
    clean_postgres_url: str,
    make_client: MakeClient,
) -> None:
    nodes = f"memcached://127.0.0.1:{memcached_server.port},127.0.0.1:{second_memcached.port}"
    client = await make_client(fault_settings(clean_redis_url, nodes, clean_postgres_url))
    await put_all(client, KEYS, lambda key: key.encode())
    flush_redis(clean_redis_url)  # reads must reach l2
    await asyncio.to_thread(second_memcached.hang)
    try:
        reads = [await timed_get(client, key) for key in KEYS]
    finally:
        await asyncio.to_thread(second_memcached.resume)
    served = Counter(read.tier for read in reads)
    state = (await (await client.get("/readyz")).json())["tiers"][1]
    report(
        "one of two memcached nodes hung",
        served_by=dict(served),
        worst_read_ms=round(1000 * max(read.seconds for read in reads), 1),
        l2_state=state["state"],
    )
    assert all(
        read.status == 200 and read.body == key.encode()
        for read, key in zip(reads, KEYS, strict=True)
    )
    # Consistent hashing puts about half the keys on each node (the ring's split of these
    # 100 keys is fixed: it is the hash's, not chance's).
    assert 25 <= served["l2"] <= 75
    assert served["l2"] + served["l3"] == len(KEYS)
    assert state["state"] in ("degraded", "up")
