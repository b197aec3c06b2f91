"""A running sidecar over clustered and replicated Redis, under the faults operators see:
a cluster master killed under reads and writes, and a Sentinel failover right after
write-behind acknowledgements while Postgres is down.

What each test measures is printed (``pytest -s``): the figures issue 13 asks for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from cachesvc.config import Settings
from tests.faults.conftest import FAST_CACHE_TIER, FAST_DURABLE_TIER
from tests.polling import until
from tests.servers import PostgresServer, RedisClusterServers, RedisSentinelServers
from tests.service.conftest import Client, MakeClient
from tests.service.test_api import path

pytestmark = pytest.mark.faults


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


def two_tiers(top: str, durable: str, journal: str | None = None) -> Settings:
    write: dict[str, object] = {"drain_timeout": 1}
    if journal is not None:
        write["journal_url"] = journal
    return Settings.model_validate(
        {
            "tiers": [
                {"name": "l1", "url": top, "ttl": 300, **FAST_CACHE_TIER},
                {"name": "l3", "url": durable, "ttl": 86400, **FAST_DURABLE_TIER},
            ],
            "write": write,
        }
    )


@dataclass
class Load:
    """Writers and readers of ``keys`` through one sidecar, recording what a client sees."""

    client: Client
    keys: list[str]
    failures: list[tuple[float, str, int]] = field(default_factory=list)
    stale: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    served_by_l1: list[tuple[float, str]] = field(default_factory=list)
    # key -> the last value whose PUT was answered, and the number after it
    acknowledged: dict[str, int] = field(default_factory=dict)
    stopping: bool = False

    async def writer(self, key: str) -> None:
        number = 0
        while not self.stopping:
            number += 1
            started = time.monotonic()
            response = await self.client.put(path(key), data=b"%d" % number)
            await response.read()
            self.latencies.append(time.monotonic() - started)
            if response.status == 204:
                self.acknowledged[key] = number
            else:
                self.failures.append((started, f"PUT {key}", response.status))

    async def reader(self) -> None:
        while not self.stopping:
            for key in self.keys:
                floor = self.acknowledged.get(key, 0)  # answered before this read began
                started = time.monotonic()
                response = await self.client.get(path(key))
                body = await response.read()
                self.latencies.append(time.monotonic() - started)
                if response.status != 200:
                    if floor:
                        self.failures.append((started, f"GET {key}", response.status))
                    continue
                if int(body) < floor:
                    self.stale.append((key, body, b"%d" % floor))
                if response.headers.get("X-Cache-Tier") == "l1":
                    self.served_by_l1.append((started, key))


async def test_a_cluster_master_killed_costs_no_request_and_no_stale_read(
    cluster: RedisClusterServers,
    clean_postgres_url: str,
    clean_redis_url: str,
    make_client: MakeClient,
) -> None:
    client = await make_client(two_tiers(cluster.url, clean_postgres_url, clean_redis_url))
    keys = [f"ha:{n}" for n in range(12)]
    load = Load(client, keys)
    tasks = [asyncio.create_task(load.writer(key)) for key in keys]
    tasks += [asyncio.create_task(load.reader()) for _ in range(2)]
    try:
        await asyncio.sleep(1.0)  # traffic on every master
        victim = cluster.master_of(f"cachesvc:{keys[0]}")
        hit_keys = [key for key in keys if cluster.master_of(f"cachesvc:{key}") is victim]
        killed_at = time.monotonic()
        await asyncio.to_thread(victim.kill)
        await asyncio.to_thread(cluster.wait_serving, 30)

        async def l1_serves_again() -> bool:
            return any(at > killed_at and key in hit_keys for at, key in load.served_by_l1[-200:])

        await until(l1_serves_again, 20, "l1 serving the failed master's keys again")
        back_at = max(at for at, key in load.served_by_l1 if key in hit_keys)
        await asyncio.sleep(1.0)
    finally:
        load.stopping = True
        await asyncio.gather(*tasks)
    print(
        f"\n[faults] cluster master killed -9: requests {len(load.latencies)}, "
        f"failed {len(load.failures)}, stale reads {len(load.stale)}, worst "
        f"{1000 * max(load.latencies):.0f} ms, l1 serving its keys again after "
        f"{back_at - killed_at:.2f} s"
    )
    assert load.failures == []
    assert load.stale == []
    assert max(load.latencies) < 1.0


async def test_a_sentinel_failover_right_after_write_behind_loses_nothing(
    sentinel_set: RedisSentinelServers, postgres_server: PostgresServer, make_client: MakeClient
) -> None:
    """The journal is the Sentinel master: an acknowledged write-behind write is on its
    replica too (WAIT), so the master killed right after the acknowledgements, with
    Postgres down, loses none of them."""
    client = await make_client(two_tiers(sentinel_set.url, postgres_server.url))
    keys = [f"wb:{n}" for n in range(200)]
    await asyncio.to_thread(postgres_server.stop)
    try:
        for key in keys:
            response = await client.put(path(key, "strategy=write-behind"), data=key.encode())
            assert response.status == 202, await response.text()
        old = sentinel_set.master()
        await asyncio.to_thread(old.kill)
        await asyncio.to_thread(sentinel_set.wait_master_is_not, old, 30)
    finally:
        await asyncio.to_thread(postgres_server.start)
    conn = await asyncpg.connect(postgres_server.url)
    try:

        async def stored() -> int:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM cachesvc_entries WHERE key = ANY($1::text[]) "
                "AND payload IS NOT NULL",
                keys,
            )
            return count

        await until(lambda: _all(stored, len(keys)), 30, "every acknowledged write in l3")
        lost = len(keys) - await stored()
    finally:
        await conn.close()
    print(f"\n[faults] Sentinel master killed after 200 write-behind 202s: lost {lost}")
    assert lost == 0


async def _all(count: object, expected: int) -> bool:
    return await count() == expected  # type: ignore[operator]
