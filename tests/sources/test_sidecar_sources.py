"""The durable sources through a running sidecar: a stream event appended while it was
stopped applied on start, a dropped connection that loses nothing and keeps the warm
in-process tier, and a committed UPDATE read from the write-ahead log invalidating."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import redis.asyncio

from cachesvc.config import Settings
from tests.polling import until
from tests.servers import RedisServer
from tests.service.conftest import Client, MakeClient, make_client  # noqa: F401 - the fixture
from tests.service.test_api import path

STREAM = "sidecar:events"


def with_stream(redis_url: str, durable: str, identity: str) -> Settings:
    return Settings.model_validate(
        {
            "tiers": [{"url": "memory://"}, {"url": durable, "ttl": 86400}],
            "invalidation": {
                "url": redis_url,
                "stream": STREAM,
                "identity": identity,
                "liveness_interval": 0.5,
            },
        }
    )


async def answer(client: Client, key: str) -> tuple[int, str | None]:
    response = await client.get(path(key))
    await response.read()
    return response.status, response.headers.get("X-Cache-Tier")


async def ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 200


async def append(redis_url: str, event: dict[str, object]) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.xadd(STREAM, {"event": json.dumps(event)})
    finally:
        await client.aclose()


async def test_an_event_appended_while_stopped_is_applied_on_start(
    make_client: MakeClient,  # noqa: F811 - the fixture imported above
    stream_redis: RedisServer,
    clean_postgres_url: str,
) -> None:
    config = with_stream(stream_redis.url, clean_postgres_url, "sidecar-one")
    first = await make_client(config)
    await until(lambda: ready(first), 10, "subscribed")
    assert (await first.put(path("while-stopped"), data=b"v")).status == 204
    await first.close()
    await append(stream_redis.url, {"keys": ["while-stopped"], "sent_at": time.time()})
    again = await make_client(config)  # the same identity: it resumes after its cursor
    await until(lambda: ready(again), 10, "subscribed again")

    async def gone() -> bool:
        return (await answer(again, "while-stopped"))[0] == 404

    await until(gone, 5, "the event applied, in Postgres too")
    conn = await asyncpg.connect(clean_postgres_url)
    try:
        payload = await conn.fetchval(
            "SELECT payload FROM cachesvc_entries WHERE key = 'while-stopped'"
        )
    finally:
        await conn.close()
    assert payload is None  # a tombstone in the durable tier


async def test_a_dropped_connection_loses_no_event_and_keeps_the_warm_tier(
    make_client: MakeClient,  # noqa: F811 - the fixture imported above
    stream_redis: RedisServer,
    clean_postgres_url: str,
) -> None:
    client = await make_client(with_stream(stream_redis.url, clean_postgres_url, "sidecar-two"))
    await until(lambda: ready(client), 10, "subscribed")
    keys = [f"kept:{n}" for n in range(20)]
    for key in [*keys, "warm"]:
        assert (await client.put(path(key), data=b"v")).status == 204
        assert await answer(client, key) == (200, "l1")
    killer = redis.asyncio.Redis.from_url(stream_redis.url)
    try:
        for n, key in enumerate(keys):
            await append(stream_redis.url, {"keys": [key], "sent_at": time.time()})
            if n % 5 == 0:  # the stream listener's connections, and every other client's
                await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        await killer.aclose()

    async def all_gone() -> bool:
        return all([(await answer(client, key))[0] == 404 for key in keys])

    await until(all_gone, 10, "every appended event applied")
    await until(lambda: ready(client), 10, "reconnected")
    assert await answer(client, "warm") == (200, "l1")  # not cleared: nothing was lost


async def test_a_committed_update_read_from_the_wal_invalidates(
    make_client: MakeClient,  # noqa: F811 - the fixture imported above
    stream_redis: RedisServer,
    logical_postgres_url: str,
) -> None:
    conn = await asyncpg.connect(logical_postgres_url)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS people;"
            "CREATE TABLE people (id int PRIMARY KEY, org int, name text);"
            "INSERT INTO people VALUES (1, 7, 'ada'), (2, 7, 'grace')"
        )
        config = Settings.model_validate(
            {
                "tiers": [{"url": "memory://"}, {"url": logical_postgres_url, "ttl": 86400}],
                "invalidation": {
                    "url": stream_redis.url,
                    "tables": [
                        {"table": "public.people", "keys": ["person:{id}"], "tags": ["org:{org}"]}
                    ],
                },
            }
        )
        client = await make_client(config)
        await until(lambda: ready(client), 15, "the slot read")
        for key in ("person:1", "person:2"):
            assert (await client.put(path(key), data=b"cached")).status == 204
        assert (await client.put(path("org-cached", "tags=org:7"), data=b"x")).status == 204
        committed = time.monotonic()
        await conn.execute("UPDATE people SET name = 'ada l.' WHERE id = 1")

        async def invalidated() -> bool:
            return (await answer(client, "person:1"))[0] == 404

        await until(invalidated, 1.0, "the UPDATE's key invalidated within 1 s")
        elapsed = time.monotonic() - committed
        assert (await answer(client, "person:2"))[0] == 200  # another row: untouched
        assert (await answer(client, "org-cached"))[0] == 404  # its tag, org:7
        print(f"\ncommit -> 404: {1000 * elapsed:.0f} ms")
    finally:
        await conn.execute("DROP TABLE IF EXISTS people")
        await conn.close()
        await asyncio.sleep(0)
