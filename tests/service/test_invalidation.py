"""Invalidation events (SPEC §4, issue 4) with real Redis pub/sub and Postgres NOTIFY."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from cachesvc.config import Settings
from tests.polling import until
from tests.servers import RedisServer, flush_memcached, flush_redis
from tests.service.conftest import Client, MakeClient
from tests.service.test_api import assert_error, path
from tests.service.test_three_tiers import engine_of, served_by

CHANNEL = "cachesvc:invalidate"
TRIGGER_EXAMPLE = Path(__file__).parents[2] / "docs" / "invalidation-trigger.sql"


def settings(*tier_urls: str, invalidation: dict[str, Any]) -> Settings:
    return Settings.model_validate(
        {"tiers": [{"url": url} for url in tier_urls], "invalidation": invalidation}
    )


async def ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 200


@pytest.fixture
async def publisher(clean_redis_url: str) -> Any:
    redis = Redis.from_url(clean_redis_url)
    yield redis
    await redis.aclose()


@pytest.fixture
async def sidecar(
    make_client: MakeClient, clean_redis_url: str, clean_memcached_url: str, clean_postgres_url: str
) -> Client:
    client = await make_client(
        settings(
            clean_redis_url,
            clean_memcached_url,
            clean_postgres_url,
            invalidation={"url": clean_redis_url},
        )
    )
    await until(lambda: ready(client), 5.0, "subscribed")
    return client


async def gone(client: Client, key: str) -> bool:
    return (await client.get(path(key))).status == 404


async def test_published_key_is_gone_within_a_second(sidecar: Client, publisher: Redis) -> None:
    await sidecar.put(path("user:42"), data=b"v")
    assert await served_by(sidecar, "user:42") == ("l1", b"v")
    published = time.monotonic()
    assert await publisher.publish(CHANNEL, json.dumps({"keys": ["user:42"]})) == 1
    await until(lambda: gone(sidecar, "user:42"), 1.0, "the key invalidated")
    print(f"key invalidation visible after {1000 * (time.monotonic() - published):.1f} ms")

    async def dropped_by_every_tier() -> bool:
        return all([await slot.tier.get("user:42") is None for slot in engine_of(sidecar).slots])

    # The shared tiers get it from the sidecar holding the applier lease (this one).
    await until(dropped_by_every_tier, 5.0, "the key dropped by every tier")


async def test_tags_and_prefixes_invalidate_in_every_tier(
    sidecar: Client, publisher: Redis, clean_redis_url: str, clean_memcached_url: str
) -> None:
    await sidecar.put(path("a", "tags=tenant-7,x"), data=b"a")
    await sidecar.put(path("b", "tags=tenant-7"), data=b"b")
    await sidecar.put(path("session:1"), data=b"s")
    await sidecar.put(path("session:2"), data=b"s")
    await sidecar.put(path("keep", "tags=tenant-8"), data=b"k")
    await publisher.publish(CHANNEL, json.dumps({"tags": ["tenant-7"], "prefixes": ["session:"]}))
    for key in ("a", "b", "session:1", "session:2"):
        await until(lambda key=key: gone(sidecar, key), 1.0, f"{key} invalidated")
    # Not from l2 or l3 either, and not brought back by promotion.
    for _ in range(2):
        flush_redis(clean_redis_url)
        flush_memcached(clean_memcached_url)
        for key in ("a", "b", "session:1", "session:2"):
            await assert_error(await sidecar.get(path(key)), 404)
    assert (await served_by(sidecar, "keep"))[1] == b"k"
    # A write after the invalidation is visible again.
    await sidecar.put(path("a", "tags=tenant-7"), data=b"new")
    assert await served_by(sidecar, "a") == ("l1", b"new")
    await sidecar.put(path("session:3"), data=b"new")
    assert (await served_by(sidecar, "session:3"))[1] == b"new"


async def test_invalidate_endpoint_and_bad_bodies(sidecar: Client) -> None:
    await sidecar.put(path("p:1"), data=b"v")
    response = await sidecar.post("/v1/invalidate", json={"prefixes": ["p:"], "extra": "ignored"})
    assert response.status == 202
    await assert_error(await sidecar.get(path("p:1")), 404)
    for body in (b"nope", b"[]", b'{"keys": "k"}', b'{"keys": [1]}', b"{}", b'{"keys": ["a b"]}'):
        await assert_error(await sidecar.post("/v1/invalidate", data=body), 400)


async def test_malformed_events_are_counted_not_fatal(sidecar: Client, publisher: Redis) -> None:
    for bad in ("not json", "[1]", json.dumps({"keys": "k"}), json.dumps({"tags": [None]})):
        await publisher.publish(CHANNEL, bad)
    await sidecar.put(path("after"), data=b"v")
    await publisher.publish(CHANNEL, json.dumps({"keys": ["after"]}))
    await until(lambda: gone(sidecar, "after"), 1.0, "a good event after bad ones")
    metrics = await (await sidecar.get("/metrics")).text()
    assert 'cachesvc_invalidation_events_total{outcome="malformed",source="redis"} 4.0' in metrics


async def test_listener_comes_back_after_client_kill(sidecar: Client, publisher: Redis) -> None:
    killed = await publisher.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed >= 1
    await until(lambda: _subscribed(publisher), 10.0, "a new subscription")
    await until(lambda: ready(sidecar), 10.0, "readiness back")
    await sidecar.put(path("later"), data=b"v")
    await publisher.publish(CHANNEL, json.dumps({"keys": ["later"]}))
    await until(lambda: gone(sidecar, "later"), 1.0, "events work again")


async def _subscribed(redis: Redis) -> bool:
    counts = await redis.pubsub_numsub(CHANNEL)
    return bool(counts and counts[0][1] >= 1)


@pytest.fixture
async def peers(
    make_client: MakeClient, clean_redis_url: str, clean_postgres_url: str
) -> tuple[Client, Client]:
    """Two subscribed sidecars, each with its own in-process l1, sharing l2 (Postgres)
    and the channel."""
    config = settings("memory://", clean_postgres_url, invalidation={"url": clean_redis_url})
    first, second = await make_client(config), await make_client(config)
    await until(lambda: ready(first), 5.0, "first subscribed")
    await until(lambda: ready(second), 5.0, "second subscribed")
    return first, second


async def test_a_peer_sidecar_drops_what_the_first_invalidated(
    peers: tuple[Client, Client],
) -> None:
    first, second = peers
    for key in ("k", "t1", "pre:1"):
        await first.put(path(key, "tags=t" if key == "t1" else ""), data=b"v")
        assert (await served_by(second, key))[0] == "l2"
        assert (await served_by(second, key))[0] == "l1"  # now cached in second's memory
    assert (await first.delete(path("k"))).status == 204
    await first.post("/v1/invalidate", json={"tags": ["t"], "prefixes": ["pre:"]})
    for key in ("k", "t1", "pre:1"):
        await until(lambda key=key: gone(second, key), 1.0, f"{key} dropped by the peer")


async def test_notify_from_a_trigger_invalidates(
    make_client: MakeClient, clean_redis_url: str, clean_postgres_url: str
) -> None:
    client = await make_client(
        settings(
            "memory://",
            clean_postgres_url,
            invalidation={"url": clean_redis_url, "postgres_url": clean_postgres_url},
        )
    )
    await until(lambda: ready(client), 5.0, "listening")
    trigger_sql = TRIGGER_EXAMPLE.read_text()
    connection = await asyncpg.connect(clean_postgres_url)
    try:
        await connection.execute(
            "DROP TABLE IF EXISTS users CASCADE;"
            "CREATE TABLE users (id int PRIMARY KEY, name text);"
            "INSERT INTO users VALUES (42, 'ada');"
        )
        await connection.execute(trigger_sql)
        await client.put(path("user:42"), data=b"ada")
        assert (await served_by(client, "user:42"))[0] == "l1"
        await connection.execute("UPDATE users SET name = 'grace' WHERE id = 42")
        await until(lambda: gone(client, "user:42"), 1.0, "the trigger's NOTIFY applied")
    finally:
        await connection.execute("DROP TABLE IF EXISTS users CASCADE")
        await connection.close()


async def test_in_process_tier_is_not_trusted_across_a_subscription_gap(
    make_client: MakeClient, clean_postgres_url: str, redis_server: RedisServer
) -> None:
    client = await make_client(
        settings(
            "memory://",
            clean_postgres_url,
            invalidation={"url": redis_server.url, "liveness_interval": 0.5},
        )
    )
    await until(lambda: ready(client), 5.0, "subscribed")
    await client.put(path("k"), data=b"v")
    assert (await served_by(client, "k"))[0] == "l1"

    await asyncio.to_thread(redis_server.kill)
    await until(lambda: _not_ready(client), 5.0, "readiness reports the lost subscription")
    body = await (await client.get("/readyz")).json()
    assert body["invalidation"]["redis"] != "up"
    # Events published now would be missed: the in-process tier must not answer.
    assert (await served_by(client, "k"))[0] == "l2"

    await asyncio.to_thread(redis_server.restart)
    await until(lambda: ready(client), 10.0, "subscribed again")
    assert (await served_by(client, "k"))[0] == "l2"  # l1 was cleared after the gap
    assert (await served_by(client, "k"))[0] == "l1"


async def _not_ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 503


async def test_a_peers_invalidation_never_hides_a_later_acknowledged_write(
    peers: tuple[Client, Client],
) -> None:
    # DELETE then PUT on the first sidecar; the second applies the DELETE's event after
    # the PUT was acknowledged, and must not tombstone the shared tier over it.
    first, second = peers
    await first.put(path("k", "tags=t"), data=b"old")
    assert (await first.delete(path("k"))).status == 204
    assert (await first.put(path("k", "tags=t"), data=b"new")).status == 204
    await until(lambda: _applied(second), 1.0, "the second sidecar applied the event")
    assert await served_by(second, "k") == ("l2", b"new")
    await first.post("/v1/invalidate", json={"tags": ["t"]})
    assert (await first.put(path("k", "tags=t"), data=b"newer")).status == 204
    await until(lambda: _applied(second, 2), 1.0, "the tag event applied")
    assert (await served_by(second, "k"))[1] == b"newer"


async def _applied(client: Client, count: int = 1) -> bool:
    metrics = await (await client.get("/metrics")).text()
    line = 'cachesvc_invalidation_events_total{outcome="applied",source="redis"}'
    return any(
        row.startswith(line) and float(row.split()[-1]) >= count for row in metrics.splitlines()
    )
