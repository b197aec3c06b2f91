"""One external event, many sidecars: the shared tiers are written once, whatever the
number of sidecars (it was 2.7 times the writes with 8 sidecars than with 1: each applied the
event to Redis, memcached and Postgres), and still once the applier dies.

Counted by the servers themselves: Redis ``INFO commandstats`` (the tier's tombstones are
script calls), memcached's ``cmd_set`` (stores), Postgres' executions of the tier's upsert
(pg_stat_statements). The channel lives on a Redis of its own, so that the sidecars' lease
renewals and subscriptions do not show in the tier's figures.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from cachesvc.config import Settings
from tests.faults.conftest import StatsPostgresServer, fault_settings
from tests.faults.test_single_flight import memcached_stats, redis_stats
from tests.polling import until
from tests.servers import MemcachedServer, RedisServer
from tests.service.conftest import Client, MakeClient
from tests.sidecar import Sidecar, tiers_config

pytestmark = pytest.mark.faults

KEYS = [f"evt:{n}" for n in range(50)]
CHANNEL = "cost:invalidate"
UPSERT = 'INSERT INTO "cachesvc_entries"%'


async def postgres_writes(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        calls = await conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE $1", UPSERT
        )
    finally:
        await conn.close()
    return int(calls)


async def shared_writes(
    tier_redis: str, memcached: MemcachedServer, postgres: str
) -> dict[str, int]:
    redis = await redis_stats(tier_redis)
    return {
        "redis": redis.get("evalsha", 0) + redis.get("eval", 0),
        "memcached": memcached_stats(memcached).get("cmd_set", 0),
        "postgres": await postgres_writes(postgres),
    }


def settings(tier_redis: str, memcached: str, postgres: str, channel_redis: str) -> Settings:
    base = fault_settings(tier_redis, memcached, postgres)
    return Settings.model_validate(
        {
            **base.model_dump(exclude={"invalidation", "write"}),
            "write": {**base.write.model_dump(), "journal_url": channel_redis},
            "invalidation": {"url": channel_redis, "channel": CHANNEL},
        }
    )


async def applied_everywhere(clients: list[Client]) -> bool:
    for client in clients:
        metrics = await (await client.get("/metrics")).text()
        if (
            'cachesvc_invalidation_events_total{outcome="applied",source="redis"} 1.0'
            not in metrics
        ):
            return False
    return True


async def event_cost(
    count: int,
    make_client: MakeClient,
    tier_redis: str,
    memcached: MemcachedServer,
    postgres: str,
    channel_redis: str,
) -> tuple[dict[str, int], list[Client]]:
    clients = [
        await make_client(settings(tier_redis, memcached.url, postgres, channel_redis))
        for _ in range(count)
    ]
    await until(lambda: _ready(clients), 10, "every sidecar subscribed")
    await until(lambda: _one_applier(clients), 5, "one sidecar holds the applier lease")
    before = await shared_writes(tier_redis, memcached, postgres)
    publisher = Redis.from_url(channel_redis)
    try:
        await publisher.publish(CHANNEL, json.dumps({"keys": KEYS}))
    finally:
        await publisher.aclose()
    await until(lambda: applied_everywhere(clients), 5, "the event applied by every sidecar")
    after = await shared_writes(tier_redis, memcached, postgres)
    return {name: after[name] - before[name] for name in after}, clients


async def _ready(clients: list[Client]) -> bool:
    return all([(await client.get("/readyz")).status == 200 for client in clients])


async def _one_applier(clients: list[Client]) -> bool:
    return sum(client.server.api.invalidator.applier.held for client in clients) == 1  # type: ignore[union-attr]


@pytest.fixture
async def servers(
    redis_server: RedisServer,
    memcached_server: MemcachedServer,
    stats_postgres_server: StatsPostgresServer,
    clean_redis_url: str,
) -> Any:
    conn = await asyncpg.connect(stats_postgres_server.url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()
    return redis_server.url, memcached_server, stats_postgres_server.url, clean_redis_url


async def test_one_event_costs_the_shared_tiers_the_same_with_8_sidecars(
    servers: Any, make_client: MakeClient
) -> None:
    tier_redis, memcached, postgres, channel_redis = servers
    one, alone = await event_cost(1, make_client, tier_redis, memcached, postgres, channel_redis)
    for client in alone:
        await client.close()  # its lease goes with it
    eight, _ = await event_cost(8, make_client, tier_redis, memcached, postgres, channel_redis)
    ratio = sum(eight.values()) / sum(one.values())
    print(f"[faults] event of 50 keys, shared-tier writes: 1 sidecar {one}, 8 sidecars {eight}")
    assert sum(one.values()) > 0
    assert ratio <= 1.2, (one, eight)


async def test_an_event_reaches_the_shared_tiers_when_its_applier_dies(
    redis_url: str, memcached_url: str, postgres_url: str, redis_server: RedisServer
) -> None:
    """The applier killed (-9) just as an event is published: the other sidecars stop
    serving the keys at once, though the shared tiers still hold them until one of them
    takes the lease over (seconds later) and applies what it heard meanwhile there."""
    config = (
        tiers_config(redis_url, memcached_url, postgres_url)
        + f'[invalidation]\nurl = "{redis_server.url}"\nchannel = "{CHANNEL}"\n'
        + f'[write]\njournal_url = "{redis_server.url}"\n'
    )
    keys = [f"orphan:{n}" for n in range(20)]
    sidecars = [Sidecar(config).start() for _ in range(3)]
    try:
        first = sidecars[0]
        for key in keys:
            assert _request("PUT", f"{first.url}/v1/cache/{key}", b"v") == 204
        applier = await until(lambda: _applier(sidecars), 10, "a sidecar applying events")
        applier.kill()
        publisher = Redis.from_url(redis_server.url)
        try:
            await publisher.publish(CHANNEL, json.dumps({"keys": keys}))
        finally:
            await publisher.aclose()
        survivors = [sidecar for sidecar in sidecars if sidecar is not applier]

        async def dropped_by_survivors() -> bool:
            async with aiohttp.ClientSession() as session:
                for sidecar in survivors:
                    for key in keys:
                        async with session.get(f"{sidecar.url}/v1/cache/{key}") as response:
                            if response.status != 404:
                                return False
            return True

        # Within a second: not waiting for the lease (3 s) to pass to another sidecar.
        await until(dropped_by_survivors, 1, "the keys dropped by the other sidecars")
        conn = await asyncpg.connect(postgres_url)
        try:

            async def tombstoned() -> bool:
                rows = await conn.fetch(
                    "SELECT payload FROM cachesvc_entries WHERE key = ANY($1::text[])", keys
                )
                return len(rows) == len(keys) and all(row[0] is None for row in rows)

            await until(tombstoned, 10, "the event applied to Postgres by the new applier")
        finally:
            await conn.close()
    finally:
        for sidecar in sidecars:
            sidecar.close()


async def _applier(sidecars: list[Sidecar]) -> Sidecar | None:
    async with aiohttp.ClientSession() as session:
        for sidecar in sidecars:
            async with session.get(sidecar.url + "/readyz") as response:
                if (await response.json()).get("applier"):
                    return sidecar
    return None


def _request(method: str, url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        status: int = response.status
        return status
