"""Real servers for the tests.

Session fixtures (``redis_url``, ``memcached_url``, ``postgres_url``) use the server named by
``CACHESVC_TEST_<NAME>_URL`` when set, else one private server started on first use and
shared by the whole session. ``clean_*_url`` are the same servers, emptied before the test.
Function fixtures (``redis_server``, ...) give a test its own server to kill, hang or restart.

A Redis Cluster (six nodes) and a Sentinel set (master, replica, three Sentinels) take
seconds to start, so each is started once per session: ``redis_cluster_url`` and
``redis_sentinel_url`` (``CACHESVC_TEST_REDIS_CLUSTER_URL`` / ``..._SENTINEL_URL`` when set),
and ``redis_cluster`` / ``redis_sentinel``, the private servers themselves, for the fault
tests that break them; those restore them before they end.

With ``CACHESVC_TEST_<NAME>_URL`` set, ``clean_*_url`` empties that server's database
(FLUSHDB, flush_all, TRUNCATE cachesvc_entries): point it only at disposable data.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator

import pytest

from tests.servers import (
    MemcachedServer,
    PostgresServer,
    RedisClusterServers,
    RedisSentinelServers,
    RedisServer,
    Server,
    flush_memcached,
    flush_redis,
    truncate_postgres,
)


@pytest.fixture(autouse=True)
def _no_collector_pauses_from_earlier_tests() -> None:
    """The sidecars under test share this process's heap with pytest, hypothesis and
    every earlier test's leftovers; a full collection of those (measured: up to 0.3 s
    late in the suite) can stall a sidecar past its 0.25 s tier timeout, or be charged to
    it in a measured read. Collect them now, and freeze what survives so that later
    collections skip it (frozen for good: unfreezing would make the next test's
    collection walk the whole heap again)."""
    gc.collect()
    gc.freeze()


def _shared_url(env_var: str, server_cls: Callable[[], Server]) -> Iterator[str]:
    if url := os.environ.get(env_var):
        yield url  # somebody else's server: start nothing, stop nothing
        return
    with server_cls() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    yield from _shared_url("CACHESVC_TEST_REDIS_URL", RedisServer)


@pytest.fixture(scope="session")
def memcached_url() -> Iterator[str]:
    yield from _shared_url("CACHESVC_TEST_MEMCACHED_URL", MemcachedServer)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    yield from _shared_url("CACHESVC_TEST_POSTGRES_URL", PostgresServer)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """The private Redis Cluster: three masters, a replica each."""
    with RedisClusterServers() as cluster:
        yield cluster


def _env_or_private_url(request: pytest.FixtureRequest, env_var: str, fixture: str) -> str:
    """The URL in ``env_var``, else the private server group's (started only then)."""
    if url := os.environ.get(env_var):
        return url
    servers: RedisClusterServers | RedisSentinelServers = request.getfixturevalue(fixture)
    return servers.url


@pytest.fixture(scope="session")
def redis_cluster_url(request: pytest.FixtureRequest) -> str:
    return _env_or_private_url(request, "CACHESVC_TEST_REDIS_CLUSTER_URL", "redis_cluster")


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinelServers]:
    """The private Sentinel set: a master, its replica and three Sentinels."""
    with RedisSentinelServers() as servers:
        yield servers


@pytest.fixture(scope="session")
def redis_sentinel_url(request: pytest.FixtureRequest) -> str:
    return _env_or_private_url(request, "CACHESVC_TEST_REDIS_SENTINEL_URL", "redis_sentinel")


# Emptied before, not after, the test: a test then starts clean even if the previous one
# crashed half-way, and a failing test's data is still there to look at.


@pytest.fixture
def clean_redis_url(redis_url: str) -> str:
    flush_redis(redis_url)
    return redis_url


@pytest.fixture
def clean_memcached_url(memcached_url: str) -> str:
    flush_memcached(memcached_url)
    return memcached_url


@pytest.fixture
def clean_postgres_url(postgres_url: str) -> str:
    truncate_postgres(postgres_url)
    return postgres_url


# Always private, never the env-var server: these are for tests that break their server.


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def volatile_redis_server() -> Iterator[RedisServer]:
    """A Redis that keeps nothing on disk: restarted, it comes back empty."""
    with RedisServer(persistent=False) as server:
        yield server


@pytest.fixture
def memcached_server() -> Iterator[MemcachedServer]:
    with MemcachedServer() as server:
        yield server


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server
