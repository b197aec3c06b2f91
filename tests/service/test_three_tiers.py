"""SPEC §3 against real Redis (l1), Memcached (l2) and Postgres (l3)."""

from __future__ import annotations

import asyncio
import base64
import os
import time

import msgpack
import pytest
from redis.asyncio import Redis

from cachesvc.engine import Engine
from cachesvc.envelope import decode_live
from tests.polling import until
from tests.servers import flush_memcached, flush_redis
from tests.service.conftest import Client
from tests.service.test_api import assert_error, path


def engine_of(client: Client) -> Engine:
    return client.server.api.engine


async def served_by(client: Client, key: str) -> tuple[str, bytes]:
    response = await client.get(path(key))
    assert response.status == 200, await response.text()
    return response.headers["X-Cache-Tier"], await response.read()


async def test_put_get_delete_in_every_tier(three_tier: Client) -> None:
    assert (await three_tier.put(path("user:1"), data=b"v1")).status == 204
    assert await served_by(three_tier, "user:1") == ("l1", b"v1")
    for slot in engine_of(three_tier).slots:
        assert await slot.tier.get("user:1") is not None, slot.name

    assert (await three_tier.delete(path("user:1"))).status == 204
    await assert_error(await three_tier.get(path("user:1")), 404)
    for slot in engine_of(three_tier).slots:
        assert await slot.tier.get("user:1") is None, slot.name


async def test_promotion_refills_every_tier_above(
    three_tier: Client, clean_redis_url: str, clean_memcached_url: str
) -> None:
    await three_tier.put(path("p"), data=b"value", headers={"Content-Type": "text/plain"})

    flush_redis(clean_redis_url)
    assert await served_by(three_tier, "p") == ("l2", b"value")
    assert await served_by(three_tier, "p") == ("l1", b"value")

    flush_redis(clean_redis_url)
    flush_memcached(clean_memcached_url)
    response = await three_tier.get(path("p"))
    assert response.headers["X-Cache-Tier"] == "l3"
    assert response.headers["Content-Type"] == "text/plain"
    assert await served_by(three_tier, "p") == ("l1", b"value")
    flush_redis(clean_redis_url)  # l2 was refilled by the read from l3 too
    assert await served_by(three_tier, "p") == ("l2", b"value")


async def test_promotion_keeps_the_remaining_lifetime(
    three_tier: Client, clean_redis_url: str, clean_memcached_url: str
) -> None:
    assert (await three_tier.put(path("life", "ttl=30"), data=b"v")).status == 204
    flush_redis(clean_redis_url)
    flush_memcached(clean_memcached_url)
    assert (await served_by(three_tier, "life"))[0] == "l3"
    # The next read waits for the promotion the first one answered without waiting for.
    assert (await served_by(three_tier, "life"))[0] == "l1"
    redis = Redis.from_url(clean_redis_url)
    try:
        ttl_ms = await redis.pttl("cachesvc:life")  # the tier's default key prefix
    finally:
        await redis.aclose()
    # Promoted with what was left of the entry's 30 s, not l1's own ttl of 300 s.
    assert 25_000 < ttl_ms <= 30_000


async def test_cache_aside_reads_from_l3_first_and_evicts_stale_copies(three_tier: Client) -> None:
    await three_tier.put(path("ca"), data=b"old")
    assert await served_by(three_tier, "ca") == ("l1", b"old")

    response = await three_tier.put(path("ca", "strategy=cache-aside"), data=b"new")
    assert response.status == 204
    assert await served_by(three_tier, "ca") == ("l3", b"new")
    assert await served_by(three_tier, "ca") == ("l1", b"new")


async def test_ttl_expires_in_every_tier(three_tier: Client) -> None:
    assert (await three_tier.put(path("ttl", "ttl=1"), data=b"v")).status == 204
    assert (await served_by(three_tier, "ttl"))[0] == "l1"
    slots = engine_of(three_tier).slots
    # Memcached counts whole seconds, so its copy may outlive the TTL by up to a second;
    # the envelope's own expiry hides it from reads either way.

    async def gone_everywhere() -> bool:
        return all([await slot.tier.get("ttl") is None for slot in slots])

    await until(gone_everywhere, 3.0, "the entry expired in every tier")
    await assert_error(await three_tier.get(path("ttl")), 404)


async def test_binary_value_and_content_type_round_trip_through_l3(
    three_tier: Client, clean_redis_url: str, clean_memcached_url: str
) -> None:
    value = os.urandom(64 * 1024)
    headers = {"Content-Type": "image/webp"}
    assert (await three_tier.put(path("blob/ü?#%"), data=value, headers=headers)).status == 204
    flush_redis(clean_redis_url)
    flush_memcached(clean_memcached_url)
    response = await three_tier.get(path("blob/ü?#%"))
    assert response.headers["X-Cache-Tier"] == "l3"
    assert response.headers["Content-Type"] == "image/webp"
    assert await response.read() == value


@pytest.mark.parametrize("key", ["a/b?c=d#e&f", "ключ:ü1", "x" * 250, "%41"])
async def test_reserved_and_long_keys_in_every_tier(
    three_tier: Client, clean_redis_url: str, clean_memcached_url: str, key: str
) -> None:
    await three_tier.put(path(key), data=key.encode())
    assert await served_by(three_tier, key) == ("l1", key.encode())
    flush_redis(clean_redis_url)
    assert await served_by(three_tier, key) == ("l2", key.encode())
    # The next read waits for the promotion into l1 the last one sent (it would land after
    # the flush otherwise).
    assert await served_by(three_tier, key) == ("l1", key.encode())
    flush_redis(clean_redis_url)
    flush_memcached(clean_memcached_url)
    assert await served_by(three_tier, key) == ("l3", key.encode())


async def test_later_write_wins_in_every_tier(three_tier: Client) -> None:
    responses = await asyncio.gather(
        *(three_tier.put(path("race"), data=str(n).encode()) for n in range(20))
    )
    versions = [int(r.headers["ETag"].strip('"')) for r in responses]
    newest = str(versions.index(max(versions))).encode()
    for slot in engine_of(three_tier).slots:
        entry = decode_live(await slot.tier.get("race"), time.time())
        assert entry is not None and entry.value == newest, slot.name


async def test_bulk_through_three_tiers(
    three_tier: Client, clean_redis_url: str, clean_memcached_url: str
) -> None:
    entries = [{"key": f"b{n}", "value": f"v{n}"} for n in range(50)]
    assert (await three_tier.post("/v1/bulk/set", json={"entries": entries})).status == 200
    flush_redis(clean_redis_url)
    flush_memcached(clean_memcached_url)
    response = await three_tier.post("/v1/bulk/get", json={"keys": [e["key"] for e in entries]})
    body = await response.json()
    assert body["missing"] == []
    assert {entry["tier"] for entry in body["entries"]} == {"l3"}
    response = await three_tier.post("/v1/bulk/get", json={"keys": ["b0", "b49"]})
    assert {entry["tier"] for entry in (await response.json())["entries"]} == {"l1"}


async def test_a_large_value_comes_back_whole_from_each_tier(
    three_tier: Client, clean_redis_url: str, clean_memcached_url: str
) -> None:
    """A value past ``tiers.base.VIEWED_SIZE`` goes from the tier's reply to the answer as
    a view of it, not a copy: from each tier, alone and in bulk (JSON and msgpack)."""
    value = os.urandom(300 * 1024)
    assert (await three_tier.put(path("big"), data=value)).status == 204
    assert await served_by(three_tier, "big") == ("l1", value)
    response = await three_tier.post("/v1/bulk/get", json={"keys": ["big"]})
    (entry,) = (await response.json())["entries"]
    assert (entry["tier"], base64.b64decode(entry["value_base64"])) == ("l1", value)
    response = await three_tier.post(
        "/v1/bulk/get",
        data=msgpack.packb({"keys": ["big"]}),
        headers={"Content-Type": "application/msgpack"},
    )
    assert msgpack.unpackb(await response.read())["entries"][0]["value"] == value
    flush_redis(clean_redis_url)
    assert await served_by(three_tier, "big") == ("l2", value)
    flush_redis(clean_redis_url)
    flush_memcached(clean_memcached_url)
    assert await served_by(three_tier, "big") == ("l3", value)


async def test_readiness_names_every_tier(three_tier: Client) -> None:
    response = await three_tier.get("/readyz")
    assert response.status == 200
    body = await response.json()
    assert [(tier["name"], tier["state"]) for tier in body["tiers"]] == [
        ("l1", "up"),
        ("l2", "up"),
        ("l3", "up"),
    ]
