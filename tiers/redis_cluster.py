"""Redis Cluster tier: ``redis-cluster://[user:password@]h1:p1[,h2:p2...]?prefix=cachesvc:``.

The listed nodes are the seeds: redis-py discovers the others and keeps the map of which
master serves which of the 16384 hash slots (tiers/redis_clients.py creates the client).
Entries are stored as by the Redis tier (tiers/redis.py), under ``prefix + key`` with no
hash tag, so the keys of a batch spread over the masters.

No command ever spans two slots (the server would refuse it, CROSSSLOT): a batch of reads
is one MGET per slot, a batch of writes one call of the versioned conditional-set script
per slot (at most ``KEYS_PER_CALL`` keys each). Both are sent as one pipeline per node, to
all nodes at once.

Faults: redis-py follows MOVED and ASK redirects during a slot migration by itself. When a
master dies, calls for its slots fail (TierUnavailable, or TierTimeout when the caller's
timeout runs out first) and each failure makes the client refresh its slot map, at most
once a second; once a replica has taken over, the next refresh finds it and calls
succeed again, with no restart. ``ping`` asks every master the client knows of, so the
engine's probe succeeds only when all slots are served again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

from tiers.base import TierWrite
from tiers.redis import KEYS_PER_CALL, RedisTier
from tiers.redis_clients import RedisClient
from tiers.resp import RespClient


class RedisClusterTier(RedisTier):
    schemes = ("redis-cluster",)

    async def _read(self, client: RedisClient, keys: list[str]) -> list[Any]:
        # One MGET per slot, in one pipeline per node.
        return await _cluster(client).mget_nonatomic(keys)

    def _script_calls(
        self, client: RedisClient | RespClient, writes: Sequence[TierWrite]
    ) -> list[Sequence[TierWrite]]:
        by_slot: dict[int, list[TierWrite]] = {}
        for write in writes:
            by_slot.setdefault(_cluster(client).keyslot(self.prefix + write.key), []).append(write)
        return [
            group[i : i + KEYS_PER_CALL]
            for group in by_slot.values()
            for i in range(0, len(group), KEYS_PER_CALL)
        ]

    async def ping(self) -> None:
        client = _cluster(self._started())
        with self.mapped_errors():
            await client.ping(target_nodes=RedisCluster.PRIMARIES)


def _cluster(client: RedisClient | RespClient) -> RedisCluster:
    assert isinstance(client, RedisCluster), "a redis-cluster:// URL makes a cluster client"
    return client
