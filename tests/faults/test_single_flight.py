"""Single-flight (issue 5): a cold hot key under 500 concurrent GETs reaches each lower tier
once, counted by the servers themselves:

- Postgres: executions of the read statement, from pg_stat_statements;
- Memcached: ``stats`` ``cmd_get`` (keys fetched) minus ``cmd_set`` (stores): the promotion
  into l2 is a conditional store, one ``gets`` plus one ``add``/``cas``, so what is left is
  the lookups;
- Redis: ``INFO commandstats`` (MGET calls are l1 lookups, EVALSHA calls its fills) and
  ``keyspace_misses``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio

from tests.faults.conftest import StatsPostgresServer, fault_settings
from tests.servers import MemcachedServer, RedisServer, flush_memcached, flush_redis
from tests.service.conftest import MakeClient
from tests.service.test_api import path

pytestmark = pytest.mark.faults

CONCURRENCY = 500
READ_STATEMENT = "SELECT key, payload FROM%"  # tiers/postgres.py, PostgresTier._sql_get


async def postgres_reads(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        calls = await conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE $1",
            READ_STATEMENT,
        )
    finally:
        await conn.close()
    return int(calls)


def memcached_stats(server: MemcachedServer) -> dict[str, int]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            assert chunk, "memcached closed the connection"
            data += chunk
    stats = {}
    for line in data.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "STAT" and parts[2].isdigit():
            stats[parts[1]] = int(parts[2])
    return stats


async def redis_stats(url: str) -> dict[str, int]:
    client = redis.asyncio.Redis.from_url(url)
    try:
        commands: dict[str, Any] = await client.info("commandstats")
        stats: dict[str, Any] = await client.info("stats")
    finally:
        await client.aclose()
    counts = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in commands.items()}
    counts["keyspace_misses"] = int(stats["keyspace_misses"])
    counts["keyspace_hits"] = int(stats["keyspace_hits"])
    return counts


def delta(after: dict[str, int], before: dict[str, int], name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


@pytest.mark.parametrize(
    "arrival",
    ["together", "staggered"],
    ids=["connections-open-arrive-together", "new-connections-arrive-staggered"],
)
async def test_a_cold_hot_key_reaches_each_lower_tier_once(
    arrival: str,
    redis_server: RedisServer,
    memcached_server: MemcachedServer,
    stats_postgres_server: StatsPostgresServer,
    clean_redis_url: str,
    make_client: MakeClient,
) -> None:
    pg_url = stats_postgres_server.url
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()
    # The journal elsewhere: its polling must not show in l1's statistics.
    client = await make_client(
        fault_settings(redis_server.url, memcached_server.url, pg_url, journal_url=clean_redis_url)
    )
    value = b"hot value " * 10
    response = await client.put(path("hot"), data=value)
    assert response.status == 204
    flush_redis(redis_server.url)
    flush_memcached(memcached_server.url)  # "hot" is now only in l3

    base = f"http://{client.host}:{client.port}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        if arrival == "together":
            # Open every connection first, so that the GETs below arrive together; without,
            # connection set-up spreads them over several event-loop iterations.
            async def healthz() -> int:
                async with session.get(f"{base}/healthz") as response:
                    return response.status

            assert set(await asyncio.gather(*(healthz() for _ in range(CONCURRENCY)))) == {200}

        pg_before = await postgres_reads(pg_url)
        mc_before = memcached_stats(memcached_server)
        redis_before = await redis_stats(redis_server.url)

        async def get() -> tuple[int, bytes, str | None]:
            async with session.get(f"{base}{path('hot')}") as response:
                return response.status, await response.read(), response.headers.get("X-Cache-Tier")

        started = time.perf_counter()
        answers = await asyncio.gather(*(get() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
        # The next read waits for the promotion the lookup sent without holding the answers.
        assert (await get())[2] == "l1"

    pg_after = await postgres_reads(pg_url)
    mc_after = memcached_stats(memcached_server)
    redis_after = await redis_stats(redis_server.url)
    tiers: dict[str | None, int] = {}
    for _, _, tier in answers:
        tiers[tier] = tiers.get(tier, 0) + 1
    postgres = pg_after - pg_before
    memcached_lookups = delta(mc_after, mc_before, "cmd_get") - delta(
        mc_after, mc_before, "cmd_set"
    )
    figures = {
        "postgres_reads": postgres,
        "memcached_cmd_get": delta(mc_after, mc_before, "cmd_get"),
        "memcached_cmd_set": delta(mc_after, mc_before, "cmd_set"),
        "memcached_lookups": memcached_lookups,
        "redis_mget": delta(redis_after, redis_before, "mget"),
        "redis_evalsha": delta(redis_after, redis_before, "evalsha"),
        "redis_keyspace_misses": delta(redis_after, redis_before, "keyspace_misses"),
        "redis_keyspace_hits": delta(redis_after, redis_before, "keyspace_hits"),
        "served_by": tiers,
        "elapsed": f"{elapsed * 1000:.0f} ms",
    }
    print(f"\n[faults] single-flight, {CONCURRENCY} concurrent GETs, {arrival}: {figures}")

    assert [a for a in answers if a[:2] != (200, value)] == []
    assert postgres == 1
    assert memcached_lookups == 1
    # One promotion into l1 (one conditional store), not one per request; l1's own lookups
    # are coalesced per event-loop iteration (they are not behind the flight: a read must
    # see what the promotion put there).
    assert delta(redis_after, redis_before, "evalsha") == 1
    assert delta(redis_after, redis_before, "mget") <= CONCURRENCY // 10
