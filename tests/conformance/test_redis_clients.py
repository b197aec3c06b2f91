"""The Redis client factory (tiers/redis_clients.py) and what the Redis tiers do on a
cluster and behind Sentinel beyond the shared contract."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from cachesvc.config import Settings
from tests.conformance.conftest import MakeTier
from tests.servers import free_port
from tiers.base import TierUnavailable, TierWrite
from tiers.redis_clients import (
    SentinelMasterClient,
    create_client,
    hash_tag,
    is_cluster_url,
    parse_redis_url,
)

Key = Callable[[str], str]
V = 1_700_000_000_000_000


@pytest.mark.parametrize(
    ("name", "tagged"),
    [
        ("cachesvc:journal", "{cachesvc}:journal"),
        ("cachesvc:missed:l1", "{cachesvc}:missed:l1"),
        ("journal", "{journal}"),
        ("{app}:journal", "{app}:journal"),
        ("a{b}c", "a{b}c"),
        ("a{}:b", "{a{}}:b"),  # an empty {} is no tag: Redis hashes the whole key
        ("a{}b}:c", "{a{}b}}:c"),  # nor is {} followed by a }
    ],
)
def test_hash_tag(name: str, tagged: str) -> None:
    assert hash_tag(name) == tagged


def test_keys_tagged_alike_share_a_slot() -> None:
    assert key_slot(hash_tag("cachesvc:journal").encode()) == key_slot(
        hash_tag("cachesvc:missed").encode()
    )


def test_is_cluster_url() -> None:
    assert is_cluster_url("redis-cluster://a:1,b:2")
    assert is_cluster_url("REDIS-CLUSTER://a:1")
    assert not is_cluster_url("redis://a:1/0")
    assert not is_cluster_url("redis-sentinel://a:1/m")


def test_parsed_urls() -> None:
    sentinel = parse_redis_url("redis-sentinel://:pw@a:1,[::1]:2/mymaster/3?socket_timeout=0.5")
    assert (sentinel.kind, sentinel.nodes, sentinel.service, sentinel.db) == (
        "sentinel",
        (("a", 1), ("::1", 2)),
        "mymaster",
        3,
    )
    assert (sentinel.username, sentinel.password) == (None, "pw")
    assert sentinel.options == {"socket_timeout": 0.5}
    cluster = parse_redis_url("redis-cluster://u:p%40ss@a:1?prefix=x:", own_options=("prefix",))
    assert (cluster.kind, cluster.nodes, cluster.username, cluster.password) == (
        "cluster",
        (("a", 1),),
        "u",
        "p@ss",
    )
    assert cluster.options == {}
    assert "prefix" not in cluster.url


@pytest.mark.parametrize(
    "url", ["redis-cluster://10.0.0.1:7000,10.0.0.2:7000", "redis-sentinel://10.0.0.1:26379/m/1"]
)
def test_config_takes_cluster_and_sentinel_urls_wherever_redis_urls_go(url: str) -> None:
    settings = Settings.model_validate(
        {
            "tiers": [{"url": f"{url}?prefix=app:"}],
            "write": {"journal_url": url},
            "invalidation": {"url": url},
        }
    )
    assert settings.write.journal_url == settings.invalidation.url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis-sentinel://10.0.0.1:26379", "needs the service name"),
        ("redis-cluster://10.0.0.1:7000?prefix=x:", "unknown option 'prefix'"),
        ("memcached://10.0.0.1:11211", "must be a redis://, rediss://, redis-cluster:// or"),
    ],
)
def test_config_names_what_is_wrong_with_a_redis_url(url: str, message: str) -> None:
    for section, field in (("write", "journal_url"), ("invalidation", "url")):
        with pytest.raises(ValidationError, match=f"{field}: .*{re.escape(message)}"):
            Settings.model_validate({section: {field: url}})


async def test_create_client_kinds() -> None:
    clients = [
        create_client("redis://127.0.0.1:1/0"),
        create_client("redis-sentinel://127.0.0.1:1/mymaster"),
        create_client("redis-cluster://127.0.0.1:1"),
    ]
    try:
        assert type(clients[0]) is Redis
        assert isinstance(clients[1], SentinelMasterClient)
        assert isinstance(clients[2], RedisCluster)
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.parametrize("scheme", ["redis-cluster", "redis-sentinel"])
async def test_nothing_reachable_gives_tier_unavailable(make_tier: MakeTier, scheme: str) -> None:
    nodes = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"  # nobody listens there
    path = "/mymaster" if scheme == "redis-sentinel" else ""
    tier = await make_tier(urlsplit(f"{scheme}://{nodes}{path}"))  # start() must not raise
    for call in (tier.get_many(["k"]), tier.set_many([TierWrite("k", b"v", V, 30)]), tier.ping()):
        with pytest.raises(TierUnavailable) as error:
            await call
        assert type(error.value.__cause__).__module__.startswith("redis")


async def test_cluster_batch_spreads_over_every_master(
    make_tier: MakeTier, redis_cluster_url: str, key: Key
) -> None:
    # Entry keys carry no hash tag, so a batch lands on all masters, one MGET and one
    # script call per slot (a command spanning slots would be refused with CROSSSLOT).
    tier = await make_tier(urlsplit(redis_cluster_url))
    keys = [key(f"spread{n}") for n in range(450)]
    await tier.set_many([TierWrite(k, k.encode(), V, 30) for k in keys])
    assert await tier.get_many(keys) == [k.encode() for k in keys]

    client = create_client(redis_cluster_url)
    assert isinstance(client, RedisCluster)
    try:
        await client.initialize()  # the slot map
        # Under the tier's default prefix, on the master serving each key's slot.
        masters = {client.get_node_from_key(f"cachesvc:{k}").name for k in keys}
        assert len(masters) == len(client.get_primaries())
        assert await client.get(f"cachesvc:{keys[0]}") is not None
    finally:
        await client.aclose()
