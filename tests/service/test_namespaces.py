"""Namespaces (docs/http-api.md#namespaces) against real Redis, memcached and Postgres: one
key in two namespaces is two entries on every server, invalidation stays inside its
namespace, a namespace with fewer tiers reads and writes only those, and its policy (ttl
cap, default strategy, largest value) applies."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from yarl import URL

from cachesvc.envelope import Entry, decode_envelope
from cachesvc.namespaces import scope_of
from tests.polling import until
from tests.servers import flush_memcached, flush_redis
from tests.service.conftest import Client, MakeClient, settings_for
from tests.service.test_api import assert_error
from tiers.base import VERSION_HEADER_LEN
from tiers.memcached import _memcached_key

CHANNEL = "cachesvc:invalidate"
PREFIX = "cachesvc:"  # the Redis and memcached tiers' default key prefix


def in_ns(namespace: str, key: str, query: str = "") -> URL:
    """The path of ``key`` in ``namespace`` (``default``: the path without /ns/)."""
    encoded = quote(key, safe="").replace(".", "%2E")
    base = "/v1/cache/" if namespace == "default" else f"/v1/ns/{namespace}/cache/"
    return URL(base + encoded + ("?" + query if query else ""), encoded=True)


async def value_of(client: Client, namespace: str, key: str) -> tuple[str, bytes] | None:
    """(the tier that served it, the value), or None for a 404."""
    response = await client.get(in_ns(namespace, key))
    if response.status == 404:
        return None
    assert response.status == 200, await response.text()
    return response.headers["X-Cache-Tier"], await response.read()


# -- raw reads of each server ----------------------------------------------------------------


def held(namespace: str, key: str) -> str:
    """``key`` of ``namespace`` as the tiers store it."""
    return scope_of(namespace) + key


async def redis_raw(url: str, key: str) -> Entry | None:
    client = Redis.from_url(url)
    try:
        stored = await client.get(PREFIX + key)
    finally:
        await client.aclose()
    return (
        None
        if len(stored or b"") <= VERSION_HEADER_LEN
        else decode_envelope(stored[VERSION_HEADER_LEN:])
    )


async def memcached_raw(url: str, key: str) -> Entry | None:
    """``get`` over a plain socket, of the memcached key the tier uses for ``key``."""
    host, _, port = urlsplit(url).netloc.rpartition(":")
    mkey = _memcached_key(PREFIX, key)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"get " + mkey + b"\r\n")
        header = await reader.readuntil(b"\r\n")
        if header == b"END\r\n":
            return None
        size = int(header.split()[3])
        data = await reader.readexactly(size + 2)
        assert await reader.readuntil(b"\r\n") == b"END\r\n"
    finally:
        writer.close()
    stored = data[:-2]
    return (
        None if len(stored) == VERSION_HEADER_LEN else decode_envelope(stored[VERSION_HEADER_LEN:])
    )


async def postgres_raw(url: str, key: str) -> Entry | None:
    connection = await asyncpg.connect(url)
    try:
        payload = await connection.fetchval(
            "SELECT payload FROM cachesvc_entries WHERE key = $1", key
        )
    finally:
        await connection.close()
    return None if payload is None else decode_envelope(payload)


Servers = tuple[str, str, str]


@pytest.fixture
def servers(clean_redis_url: str, clean_memcached_url: str, clean_postgres_url: str) -> Servers:
    return clean_redis_url, clean_memcached_url, clean_postgres_url


async def raw_values(servers: Servers, key: str) -> list[bytes | None]:
    """What Redis, memcached and Postgres each hold under ``key`` (as the tiers store it)."""
    redis_url, memcached_url, postgres_url = servers
    entries = [
        await redis_raw(redis_url, key),
        await memcached_raw(memcached_url, key),
        await postgres_raw(postgres_url, key),
    ]
    return [None if entry is None else entry.value for entry in entries]


NAMESPACES = [
    {"name": "orders"},
    {"name": "hot", "tiers": ["l3", "l1"]},  # kept in the [[tiers]] order: l1, l3
    {"name": "cold", "tiers": ["l3"]},
    {"name": "capped", "ttl": 1, "strategy": "cache-aside", "max_value_bytes": 16},
]


@pytest.fixture
async def sidecar(make_client: MakeClient, servers: Servers) -> Client:
    redis_url = servers[0]
    client = await make_client(
        settings_for(
            *servers,
            namespaces=NAMESPACES,  # type: ignore[arg-type]
            invalidation={"url": redis_url},
        )
    )
    await until(lambda: _ready(client), 5.0, "subscribed")
    return client


async def _ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 200


# -- isolation -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["user:42", "x" * 250], ids=["short", "250-bytes"])
async def test_one_key_in_two_namespaces_is_two_entries_on_every_server(
    sidecar: Client, servers: Servers, key: str
) -> None:
    """Redis and Postgres hold the key text as it is; memcached a digest of it (a 250-byte
    key is hashed in both namespaces, to different digests)."""
    assert (await sidecar.put(in_ns("default", key), data=b"of default")).status == 204
    assert (await sidecar.put(in_ns("orders", key), data=b"of orders")).status == 204

    assert await raw_values(servers, held("default", key)) == [b"of default"] * 3
    assert await raw_values(servers, held("orders", key)) == [b"of orders"] * 3
    assert _memcached_key(PREFIX, held("default", key)) != _memcached_key(
        PREFIX, held("orders", key)
    )
    assert await value_of(sidecar, "default", key) == ("l1", b"of default")
    assert await value_of(sidecar, "orders", key) == ("l1", b"of orders")

    # Each comes back from each lower tier as its own.
    redis_url, memcached_url, _ = servers
    flush_redis(redis_url)
    assert await value_of(sidecar, "orders", key) == ("l2", b"of orders")
    # Waits for the promotion the last read sent, which would land after the flush.
    assert await value_of(sidecar, "orders", key) == ("l1", b"of orders")
    flush_redis(redis_url)
    flush_memcached(memcached_url)
    assert await value_of(sidecar, "default", key) == ("l3", b"of default")
    assert await value_of(sidecar, "orders", key) == ("l3", b"of orders")

    assert (await sidecar.delete(in_ns("orders", key))).status == 204
    assert await value_of(sidecar, "orders", key) is None
    assert await value_of(sidecar, "default", key) == ("l1", b"of default")
    assert (await raw_values(servers, held("default", key)))[2] == b"of default"


async def test_bulk_requests_stay_in_their_namespace(sidecar: Client) -> None:
    entries = [{"key": "a", "value": "orders a", "tags": ["t"]}, {"key": "b", "value": "b"}]
    response = await sidecar.post("/v1/ns/orders/bulk/set", json={"entries": entries})
    assert response.status == 200
    assert set((await response.json())["versions"]) == {"a", "b"}  # the keys as sent
    await sidecar.put(in_ns("default", "a"), data=b"default a")

    got = await (await sidecar.post("/v1/ns/orders/bulk/get", json={"keys": ["a", "c"]})).json()
    assert [entry["key"] for entry in got["entries"]] == ["a"] and got["missing"] == ["c"]
    assert got["entries"][0]["value_base64"] == "b3JkZXJzIGE="  # "orders a"

    deleted = await sidecar.post("/v1/ns/orders/bulk/delete", json={"keys": ["a"]})
    assert deleted.status == 204
    assert await value_of(sidecar, "orders", "a") is None
    assert await value_of(sidecar, "default", "a") == ("l1", b"default a")
    assert await value_of(sidecar, "orders", "b") == ("l1", b"b")


async def test_unknown_namespace_is_404_on_every_path(sidecar: Client) -> None:
    for method, target in [
        ("GET", "/v1/ns/nope/cache/k"),
        ("PUT", "/v1/ns/nope/cache/k"),
        ("DELETE", "/v1/ns/nope/cache/k"),
        ("POST", "/v1/ns/nope/bulk/get"),
        ("POST", "/v1/ns/nope/bulk/set"),
        ("POST", "/v1/ns/nope/bulk/delete"),
        ("POST", "/v1/ns/nope/invalidate"),
        ("GET", "/v1/ns/Orders/cache/k"),  # names are lower case
    ]:
        response = await sidecar.request(method, target, json={"keys": ["k"]})
        body = await assert_error(response, 404, "unknown_namespace")
        assert "orders" not in body["detail"], body  # no tenant learns the others' names
    for target in ("/v1/ns/orders/nothing", "/v1/ns/orders", "/v1/ns/orders/cache"):
        await assert_error(await sidecar.get(target), 404, "not_found")
    response = await sidecar.post("/v1/ns/orders/bulk/get/more", json={"keys": ["k"]})
    await assert_error(response, 404, "not_found")
    # The namespace's name is decoded like any path (the key is percent-decoded anyway).
    await sidecar.put(in_ns("orders", "a/b"), data=b"in orders")
    encoded = URL("/v1/ns/ord%65rs/cache/a%2Fb", encoded=True)
    assert await (await sidecar.get(encoded)).read() == b"in orders"
    # The default namespace by its name is the paths without /ns/.
    await sidecar.put(in_ns("default", "k"), data=b"v")
    assert await value_of(sidecar, "default", "k") == ("l1", b"v")
    response = await sidecar.get("/v1/ns/default/cache/k")
    assert response.status == 200 and await response.read() == b"v"


# -- invalidation ------------------------------------------------------------------------------


async def _put_both(client: Client, key: str, tags: str = "") -> None:
    for namespace in ("default", "orders"):
        query = f"tags={tags}" if tags else ""
        response = await client.put(in_ns(namespace, key, query), data=namespace.encode())
        assert response.status == 204


async def test_tag_and_prefix_invalidation_stays_in_its_namespace(sidecar: Client) -> None:
    await _put_both(sidecar, "tagged", tags="t")
    await _put_both(sidecar, "session:1")
    response = await sidecar.post(
        "/v1/ns/orders/invalidate", json={"tags": ["t"], "prefixes": ["session:"]}
    )
    assert response.status == 202
    assert await value_of(sidecar, "orders", "tagged") is None
    assert await value_of(sidecar, "orders", "session:1") is None
    assert await value_of(sidecar, "default", "tagged") == ("l1", b"default")
    assert await value_of(sidecar, "default", "session:1") == ("l1", b"default")

    await _put_both(sidecar, "other", tags="u")
    assert (await sidecar.post("/v1/invalidate", json={"tags": ["u"]})).status == 202
    assert await value_of(sidecar, "default", "other") is None
    assert await value_of(sidecar, "orders", "other") == ("l1", b"orders")
    # A prefix of the default namespace never reaches into another one's keys.
    assert (await sidecar.post("/v1/invalidate", json={"prefixes": ["o"]})).status == 202
    assert await value_of(sidecar, "orders", "other") == ("l1", b"orders")


async def test_the_body_may_not_name_another_namespace(sidecar: Client) -> None:
    await _put_both(sidecar, "k")
    for target, body in [
        ("/v1/invalidate", {"keys": ["k"], "namespace": "orders"}),
        ("/v1/ns/orders/invalidate", {"keys": ["k"], "namespace": "default"}),
        ("/v1/invalidate", {"keys": ["k"], "namespace": "Not A Name"}),
        ("/v1/invalidate", {"prefixes": ["\x1eorders"]}),  # a control character
    ]:
        await assert_error(await sidecar.post(target, json=body), 400)
    response = await sidecar.post("/v1/ns/orders/invalidate", json=body_of("k", "orders"))
    assert response.status == 202
    assert await value_of(sidecar, "orders", "k") is None
    assert await value_of(sidecar, "default", "k") == ("l1", b"default")


def body_of(key: str, namespace: str) -> dict[str, Any]:
    return {"keys": [key], "namespace": namespace}


async def test_events_carry_their_namespace_both_ways(sidecar: Client, servers: Servers) -> None:
    redis = Redis.from_url(servers[0])
    try:
        async with redis.pubsub() as pubsub:
            await pubsub.subscribe(CHANNEL)
            await pubsub.get_message(timeout=1)  # the subscription's confirmation
            assert (await sidecar.delete(in_ns("orders", "k"))).status == 204
            event = await _next_event(pubsub, "keys")
            assert (event["keys"], event["namespace"]) == (["k"], "orders")
            assert (await sidecar.delete(in_ns("default", "k"))).status == 204
            event = await _next_event(pubsub, "keys")
            assert event["keys"] == ["k"] and "namespace" not in event

        # From a publisher: in its namespace only; a name with the separator in it is no
        # way into another namespace.
        await _put_both(sidecar, "k", tags="t")
        await _put_both(sidecar, "p:1")
        await redis.publish(CHANNEL, json.dumps({"namespace": "orders", "tags": ["t"]}))
        await until(lambda: _gone(sidecar, "orders", "k"), 1.0, "orders' tag invalidated")
        await redis.publish(CHANNEL, json.dumps({"prefixes": ["\x1eorders", "p:"]}))
        await until(lambda: _gone(sidecar, "default", "p:1"), 1.0, "default's prefix")
        assert await value_of(sidecar, "orders", "p:1") == ("l1", b"orders")
        assert await value_of(sidecar, "default", "k") == ("l1", b"default")
    finally:
        await redis.aclose()


async def _next_event(pubsub: Any, field: str) -> dict[str, Any]:
    """The next event on the channel that has ``field`` (write announcements are skipped)."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            event: dict[str, Any] = json.loads(message["data"])
            if event.get(field):
                return event
    raise AssertionError(f"no event with {field} within 2 s")


async def _gone(client: Client, namespace: str, key: str) -> bool:
    return await value_of(client, namespace, key) is None


async def test_cli_invalidate_in_a_namespace(
    sidecar: Client, servers: Servers, tmp_path: Path
) -> None:
    await _put_both(sidecar, "k")
    config = tmp_path / "cachesvc.toml"
    config.write_text(
        f'[[tiers]]\nurl = "memory://"\n[invalidation]\nurl = "{servers[0]}"\n'
        '[[namespaces]]\nname = "orders"\n'
    )

    async def invalidate(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cachesvc", "invalidate", "--config", str(config)]
        return await asyncio.to_thread(
            subprocess.run, [*command, *args], capture_output=True, text=True, timeout=30
        )

    done = await invalidate("--namespace", "orders", "--key", "k")
    assert done.returncode == 0, done.stderr
    await until(lambda: _gone(sidecar, "orders", "k"), 1.0, "the CLI's event applied")
    assert await value_of(sidecar, "default", "k") == ("l1", b"default")
    unknown = await invalidate("--namespace", "nope", "--key", "k")
    assert unknown.returncode == 2 and "unknown namespace 'nope'" in unknown.stderr


# -- a namespace's own tiers -----------------------------------------------------------------


async def test_a_namespace_reads_and_writes_only_its_tiers(
    sidecar: Client, servers: Servers
) -> None:
    redis_url, _, _ = servers
    hot = held("hot", "k")
    assert (await sidecar.put(in_ns("hot", "k", "tags=t"), data=b"hot")).status == 204
    assert await raw_values(servers, hot) == [b"hot", None, b"hot"]
    flush_redis(redis_url)
    assert await value_of(sidecar, "hot", "k") == ("l3", b"hot")  # l2 is not asked
    assert await value_of(sidecar, "hot", "k") == ("l1", b"hot")
    assert await raw_values(servers, hot) == [b"hot", None, b"hot"]  # promoted into l1 only

    cold = held("cold", "k")
    assert (await sidecar.put(in_ns("cold", "k"), data=b"cold")).status == 204
    assert await raw_values(servers, cold) == [None, None, b"cold"]
    assert await value_of(sidecar, "cold", "k") == ("l3", b"cold")
    assert await raw_values(servers, cold) == [None, None, b"cold"]  # nothing promoted

    # Deletes and invalidations leave nothing in the other tiers either.
    assert (await sidecar.delete(in_ns("cold", "k"))).status == 204
    assert (await sidecar.post("/v1/ns/hot/invalidate", json={"keys": ["k"]})).status == 202
    assert await value_of(sidecar, "hot", "k") is None
    assert await value_of(sidecar, "cold", "k") is None
    redis_client = Redis.from_url(redis_url)
    try:
        assert await redis_client.exists(PREFIX + cold) == 0  # not even a tombstone
    finally:
        await redis_client.aclose()
    assert await memcached_raw(servers[1], hot) is None
    assert await memcached_raw(servers[1], cold) is None


async def test_write_behind_lands_in_the_namespaces_tiers_only(
    sidecar: Client, servers: Servers
) -> None:
    response = await sidecar.put(in_ns("hot", "wb", "strategy=write-behind"), data=b"behind")
    assert response.status == 202

    async def durable() -> bool:
        return await postgres_raw(servers[2], held("hot", "wb")) is not None

    await until(durable, 5.0, "the journal applied to l3")
    assert await raw_values(servers, held("hot", "wb")) == [b"behind", None, b"behind"]


# -- a namespace's policy ----------------------------------------------------------------------


async def test_ttl_cap_default_strategy_and_largest_value(
    sidecar: Client, servers: Servers
) -> None:
    capped = held("capped", "k")
    assert (await sidecar.put(in_ns("capped", "k", "ttl=3600"), data=b"v")).status == 204
    entry = await postgres_raw(servers[2], capped)
    assert entry is not None and entry.expires_at is not None
    assert entry.expires_at - time.time() <= 1.0  # capped at the namespace's ttl
    # cache-aside (its default strategy): in the durable tier, a tombstone above.
    assert await redis_raw(servers[0], capped) is None
    assert (await sidecar.put(in_ns("capped", "big"), data=b"x" * 17)).status == 413
    assert (await sidecar.put(in_ns("capped", "fits"), data=b"x" * 16)).status == 204
    too_big = [{"key": "ok", "value": "v"}, {"key": "big", "value": "x" * 17}]
    response = await sidecar.post("/v1/ns/capped/bulk/set", json={"entries": too_big})
    body = await assert_error(response, 413, "payload_too_large")
    assert "'big'" in body["detail"] and "capped" in body["detail"]
    assert await value_of(sidecar, "capped", "ok") is None  # nothing of the request stored
    # The default namespace keeps the top-level limits.
    assert (await sidecar.put(in_ns("default", "big"), data=b"x" * 17)).status == 204


async def test_metrics_by_namespace(sidecar: Client) -> None:
    await sidecar.put(in_ns("orders", "k"), data=b"v")
    await sidecar.get(in_ns("orders", "k"))
    await sidecar.get(in_ns("orders", "absent"))
    await sidecar.post("/v1/ns/orders/bulk/get", json={"keys": ["k", "absent"]})
    await sidecar.get("/v1/ns/nope/cache/k")
    text = await (await sidecar.get("/metrics")).text()
    for line in [
        'cachesvc_requests_total{namespace="orders",operation="put",status="204"} 1.0',
        'cachesvc_requests_total{namespace="orders",operation="get",status="200"} 1.0',
        'cachesvc_requests_total{namespace="orders",operation="get",status="404"} 1.0',
        'cachesvc_requests_total{namespace="",operation="get",status="404"} 1.0',
        'cachesvc_hits_total{namespace="orders",tier="l1"} 2.0',
        'cachesvc_misses_total{namespace="orders"} 2.0',
        'cachesvc_request_duration_seconds_count{namespace="orders",operation="get"} 2.0',
    ]:
        assert line in text, line
    assert "nope" not in text  # only configured namespaces are label values
