"""The tier contract (tiers/base.py), checked the same way against every backend.

Versions are realistic (microseconds since the epoch, about 2^50) and neighbours differ by
one: a backend that rounded them would fail.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from urllib.parse import SplitResult, urlsplit

import asyncpg
import pytest

from tests.conformance.conftest import (
    NETWORK_BACKENDS,
    MakeTier,
    TcpProxy,
    backend_url,
    with_port,
)
from tests.servers import free_port
from tiers.base import Payload, Tier, TierUnavailable, TierWrite
from tiers.memcached import MemcachedTier
from tiers.memory import MemoryTier
from tiers.postgres import PostgresTier
from tiers.redis import RedisTier
from tiers.redis_cluster import RedisClusterTier
from tiers.registry import tier_class

Key = Callable[[str], str]

V = 1_700_000_000_000_000  # a version as the engine makes them
TTL = 30.0
DEADLINE = 5.0  # seconds any eventual outcome (expiry, reconnect) may take at most


def w(key: str, payload: Payload | None, version: int, ttl: float = TTL) -> TierWrite:
    return TierWrite(key, payload, version, ttl)


async def eventually(check: Callable[[], Awaitable[bool]], deadline: float = DEADLINE) -> None:
    """Poll ``check`` until it returns True; fail after ``deadline`` seconds."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > deadline:
            pytest.fail(f"condition not met within {deadline} s")
        await asyncio.sleep(0.05)


# -- reads and writes --------------------------------------------------------------------------


async def test_round_trip(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("a"), b"alpha", V)])
    assert await tier.get_many([key("a")]) == [b"alpha"]
    assert await tier.get(key("a")) == b"alpha"


async def test_miss_is_none(tier: Tier, key: Key) -> None:
    assert await tier.get_many([key("never-written")]) == [None]


async def test_empty_batches(tier: Tier) -> None:
    assert await tier.get_many([]) == []
    await tier.set_many([])


async def test_get_many_keeps_order_with_hits_and_misses(tier: Tier, key: Key) -> None:
    names = [f"k{i}" for i in range(12)]
    await tier.set_many([w(key(n), n.encode(), V) for n in names[::2]])
    asked = [key(n) for n in reversed(names)] + [key("k4")]  # a key twice
    expected = [n.encode() if int(n[1:]) % 2 == 0 else None for n in reversed(names)]
    assert await tier.get_many(asked) == [*expected, b"k4"]


async def test_binary_payload_survives(tier: Tier, key: Key) -> None:
    payload = random.Random(7).randbytes(64 * 1024) + b"\r\nEND\r\n\x00"
    await tier.set_many([w(key("bin"), payload, V)])
    assert await tier.get(key("bin")) == payload


async def test_a_payload_handed_out_as_a_view_is_stored_as_it_is(tier: Tier, key: Key) -> None:
    """What one tier hands out (``Payload``: a view of its reply) is what the engine promotes
    into another: every tier stores a view's bytes, not the buffer around them."""
    reply = b"0123456789abcdef" + random.Random(8).randbytes(1000) + b"trailing"
    view = memoryview(reply)[16:-8]
    await tier.set_many([w(key("view"), view, V)])
    assert await tier.get(key("view")) == reply[16:-8]


async def test_payload_too_big_for_a_backend_never_leaves_the_older_value(
    tier: Tier, key: Key
) -> None:
    # 1.5 MiB exceeds memcached's default item size; a tier may refuse to keep it, but must
    # not go on serving the value it replaces.
    big = os.urandom(1536 * 1024)
    await tier.set_many([w(key("big"), b"small", V)])
    await tier.set_many([w(key("big"), big, V + 1)])
    assert await tier.get(key("big")) in (big, None)
    await tier.set_many([w(key("big"), b"small again", V)])  # older: refused either way
    assert await tier.get(key("big")) in (big, None)


@pytest.mark.parametrize(
    ("name", "fill"),
    [
        ("a/b?c=d#e%20&f+g:h=i;j,k@l!m$n'o(p)q*r~s", ""),
        ("ключ/ü?x=1#frag", ""),
        ("#starts-with-hash", ""),
        ("emoji-\U0001f600-\u00e9\u4e2d", ""),
        ("", "x"),  # exactly 250 bytes; Redis and memcached add their prefix on top
        ("", "ü"),  # exactly 250 bytes, non-ASCII
    ],
    ids=["reserved", "cyrillic", "hash", "emoji", "250-ascii", "250-utf8"],
)
async def test_any_valid_key_round_trips(tier: Tier, key: Key, name: str, fill: str) -> None:
    k = key(name)
    if fill:
        k = _pad(k, fill)
        assert len(k.encode()) == 250
    await tier.set_many([w(k, k.encode() + b"!", V)])
    assert await tier.get(k) == k.encode() + b"!"


def _pad(prefix: str, fill: str, size: int = 250) -> str:
    """``prefix`` + ``fill`` repeated, ASCII "-" evening it out to exactly ``size`` bytes."""
    room = size - len(prefix.encode())
    count = room // len(fill.encode())
    return prefix + fill * count + "-" * (room - count * len(fill.encode()))


async def test_similar_keys_do_not_collide(tier: Tier, key: Key) -> None:
    long = _pad(key("x"), "é", 249)  # non-ASCII and long: memcached stores a hash
    names = [long, long + "a", long[:-1], key("#x"), key("x"), key("X"), key("x#")]
    assert len(set(names)) == len(names)
    await tier.set_many([w(n, f"v{i}".encode(), V) for i, n in enumerate(names)])
    assert await tier.get_many(names) == [f"v{i}".encode() for i in range(len(names))]


# -- expiry ------------------------------------------------------------------------------------


async def test_entry_expires_after_its_ttl(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("short"), b"v", V, ttl=1.5), w(key("long"), b"v", V)])
    assert await tier.get(key("short")) == b"v"
    start = time.monotonic()
    await eventually(lambda: _is_gone(tier, key("short")))
    # Memcached counts whole seconds on a clock that ticks once a second: at least 1 s.
    assert time.monotonic() - start >= 0.9
    assert await tier.get(key("long")) == b"v"


async def test_ttl_over_30_days_keeps_the_entry(tier: Tier, key: Key) -> None:
    # Memcached reads an expiry over 30 days as a unix time: sent as is, 40 days would be a
    # date in 1970, and the entry gone at once.
    await tier.set_many([w(key("k"), b"v", V, ttl=40 * 24 * 3600.0)])
    assert await tier.get(key("k")) == b"v"
    await tier.set_many([w(key("k"), None, V + 1, ttl=1.0)])  # leave nothing for 40 days


async def test_expired_entry_does_not_protect_its_version(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("k"), b"newer", V + 10, ttl=1.0)])
    await eventually(lambda: _is_gone(tier, key("k")))
    await tier.set_many([w(key("k"), b"older", V)])
    assert await tier.get(key("k")) == b"older"


async def _is_gone(tier: Tier, k: str) -> bool:
    return await tier.get(k) is None


# -- versions ----------------------------------------------------------------------------------


async def test_older_version_never_replaces_newer_value(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("k"), b"newer", V + 1)])
    await tier.set_many([w(key("k"), b"older", V)])
    assert await tier.get(key("k")) == b"newer"


async def test_newer_version_replaces(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("k"), b"older", V)])
    await tier.set_many([w(key("k"), b"newer", V + 1)])
    assert await tier.get(key("k")) == b"newer"


async def test_equal_version_replaces(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("k"), b"first", V)])
    await tier.set_many([w(key("k"), b"again", V)])
    assert await tier.get(key("k")) == b"again"


async def test_tombstone_hides_the_value(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("k"), b"value", V), w(key("other"), b"value", V)])
    await tier.set_many([w(key("k"), None, V + 1)])
    assert await tier.get_many([key("k"), key("other")]) == [None, b"value"]


async def test_older_version_never_replaces_a_tombstone(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("k"), None, V + 1)])
    await tier.set_many([w(key("k"), b"stale fill", V)])
    assert await tier.get(key("k")) is None
    await tier.set_many([w(key("k"), b"rewritten", V + 2)])
    assert await tier.get(key("k")) == b"rewritten"


async def test_older_tombstone_never_replaces_a_newer_value(tier: Tier, key: Key) -> None:
    await tier.set_many([w(key("k"), b"newer", V + 1)])
    await tier.set_many([w(key("k"), None, V)])
    assert await tier.get(key("k")) == b"newer"


@pytest.mark.parametrize("order", ["ascending", "descending", "mixed"])
async def test_duplicate_key_in_one_batch_highest_version_wins(
    tier: Tier, key: Key, order: str
) -> None:
    versions = {"ascending": [1, 2, 3], "descending": [3, 2, 1], "mixed": [2, 3, 1]}[order]
    batch = [w(key("k"), f"v{v}".encode(), V + v) for v in versions]
    batch.insert(1, w(key("tomb"), None, V + 5))
    batch.insert(0, w(key("tomb"), b"buried", V + 4))
    await tier.set_many(batch)
    assert await tier.get_many([key("k"), key("tomb")]) == [b"v3", None]


async def test_large_batch_with_repeats_keeps_every_highest_version(tier: Tier, key: Key) -> None:
    # Larger than one Redis script call takes (200 keys): the split must keep the order.
    keys = [key(f"big{n}") for n in range(450)]
    await tier.set_many([w(k, b"older", V + 10) for k in keys[::2]])
    batch = [w(k, b"first", V + 1) for k in keys] + [w(k, b"last", V + 2) for k in keys]
    await tier.set_many(batch)
    assert await tier.get_many(keys) == [
        b"older" if n % 2 == 0 else b"last" for n in range(len(keys))
    ]


async def test_concurrent_writers_keep_the_highest_version(
    tier: Tier, key: Key, make_tier: MakeTier, tier_url: SplitResult
) -> None:
    # Several sidecars: a second and third client of the same server (the memory tier is
    # per process, so it only has the one).
    writers = [tier] if tier.in_process else [tier] + [await make_tier(tier_url) for _ in "ab"]
    keys = [key(f"hot{i}") for i in range(3)]
    versions = list(range(1, 21))
    random.shuffle(versions)

    async def write(version: int) -> None:
        await asyncio.sleep(0)
        batch = [w(k, f"v{version}".encode(), V + version) for k in keys]
        await writers[version % len(writers)].set_many(batch)

    await asyncio.gather(*(write(v) for v in versions))
    for reader in writers:
        assert await reader.get_many(keys) == [b"v20"] * 3


async def test_ping(tier: Tier) -> None:
    await tier.ping()


# -- independent nodes (tiers that declare them) -----------------------------------------------


async def test_each_key_lives_on_the_node_node_for_names(tier: Tier, key: Key) -> None:
    nodes = tier.nodes()
    if not nodes:
        pytest.skip("one failure domain: no nodes")
    assert tier.nodes() == nodes  # the same nodes on every call
    assert len({node.name for node in nodes}) == len(nodes)
    names = [key(f"n{i}") for i in range(24)] + [_pad(key("long"), "é")]
    await tier.set_many([w(n, n.encode(), V) for n in names])
    for n in names:
        owner = tier.node_for(n)
        for index, node in enumerate(nodes):
            assert await node.get(n) == (n.encode() if index == owner else None), (n, index)
    # A write through a node is the tier's entry: versions hold across the two ways in.
    owner = nodes[tier.node_for(names[0])]
    await owner.set_many([w(names[0], b"older", V - 1)])
    assert await tier.get(names[0]) == names[0].encode()
    await owner.set_many([w(names[0], b"via node", V + 1)])
    assert await tier.get(names[0]) == b"via node"


# -- what only one backend has -----------------------------------------------------------------


async def test_postgres_sweep_deletes_only_expired_rows(
    make_tier: MakeTier, postgres_url: str, key: Key
) -> None:
    tier = await make_tier(urlsplit(f"{postgres_url}?table=cachesvc_conformance"))
    assert isinstance(tier, PostgresTier)
    keys = [key("expired-value"), key("expired-tombstone"), key("live")]
    await tier.set_many(
        [w(keys[0], b"v", V, ttl=0.2), w(keys[1], None, V, ttl=0.2), w(keys[2], b"v", V)]
    )
    await eventually(lambda: _is_gone(tier, keys[0]))
    assert await tier.sweep() >= 2
    conn = await asyncpg.connect(postgres_url)
    try:
        left = await conn.fetch(
            "SELECT key FROM cachesvc_conformance WHERE key = ANY($1::text[])", keys
        )
    finally:
        await conn.close()
    assert [row["key"] for row in left] == [keys[2]]


# -- the registry and URLs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "cls"),
    [
        ("memory", MemoryTier),
        ("redis", RedisTier),
        ("rediss", RedisTier),
        ("redis-sentinel", RedisTier),
        ("redis-cluster", RedisClusterTier),
        ("memcached", MemcachedTier),
        ("postgresql", PostgresTier),
        ("postgres", PostgresTier),
    ],
)
def test_registry_resolves_each_scheme(scheme: str, cls: type[Tier]) -> None:
    assert tier_class(scheme) is cls
    assert scheme in cls.schemes


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://user:secret@cache.internal/3?prefix=app1:&max_connections=2&client_name=a",
        "rediss://127.0.0.1:6380/0?ssl_cert_reqs=none",
        "redis-cluster://10.0.0.1:7000",
        "redis-cluster://u:p@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/?prefix=a:&max_connections=8",
        "redis-sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster",
        "redis-sentinel://:secret@10.0.0.1:26379/mymaster/3?socket_timeout=0.5&prefix=x:",
        "memcached://127.0.0.1:11211",
        "memcached://10.0.0.1:11211,10.0.0.2:11212?pool_size=8&prefix=x:",
        "memcached://[::1]:11211",
        "memcached://10.0.0.1:11211,10.0.0.2:11211?gutter=10.0.0.3:11211",
        "memcached://10.0.0.1:11211?gutter=[::1]:11211&gutter_ttl=2",
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgres://u:p@db/cache?table=my_cache&pool_size=2&sweep_interval=5&sslmode=prefer",
    ],
)
def test_validate_url_accepts(url: str) -> None:
    parsed = urlsplit(url)
    tier_class(parsed.scheme).validate_url(parsed)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/0?bogus=1", "unknown option 'bogus'"),
        ("redis://127.0.0.1:99999/0", "out of range"),
        ("redis://127.0.0.1:6379/zero", "database 'zero' is not a number"),
        ("redis://127.0.0.1:6379/0?db=x", "Invalid value for 'db'"),
        ("redis://127.0.0.1:6379/0?socket_timeout=1", "the tier's timeout setting"),
        ("redis://127.0.0.1:6379/0?health_check_interval=1", "unknown option"),
        ("rediss://127.0.0.1:6380/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("redis:///0", "needs a host"),
        ("redis://127.0.0.1/0?prefix=a%20b", "prefix must not contain whitespace"),
        ("redis-cluster://", "needs a list of cluster nodes"),
        ("redis-cluster://10.0.0.1", "needs a port"),
        ("redis-cluster://10.0.0.1:7000,", "node '' has no host"),
        ("redis-cluster://10.0.0.1:7000,10.0.0.1:7000", "listed twice"),
        ("redis-cluster://::1:7000", "IPv6 address in brackets"),
        ("redis-cluster://10.0.0.1:70000", "port '70000' is not in 1-65535"),
        ("redis-cluster://10.0.0.1:7000/3", "only database 0"),
        ("redis-cluster://10.0.0.1:7000?db=1", "unknown option 'db'"),
        ("redis-cluster://10.0.0.1:7000?ssl_certfile=c.pem", "unknown option 'ssl_certfile'"),
        ("redis-cluster://10.0.0.1:7000?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis-cluster://10.0.0.1:7000?prefix=a%0A", "prefix must not contain whitespace"),
        ("redis-sentinel://10.0.0.1:26379", "needs the service name"),
        ("redis-sentinel://10.0.0.1:26379/", "needs the service name"),
        ("redis-sentinel://10.0.0.1:26379/mymaster/zero", "only a database number may follow"),
        ("redis-sentinel://10.0.0.1:26379/mymaster/0/1", "only a database number may follow"),
        ("redis-sentinel:///mymaster", "needs a list of Sentinels"),
        ("redis-sentinel://10.0.0.1:26379/m?retry_on_timeout=1", "unknown option"),
        ("memcached://", "needs at least one node"),
        ("memcached://127.0.0.1", "needs a port"),
        ("memcached://127.0.0.1:", "needs a port"),
        ("memcached://127.0.0.1:11211,127.0.0.2", "'127.0.0.2' needs a port"),
        ("memcached://127.0.0.1:eleven", "port 'eleven' is not in 1-65535"),
        ("memcached://127.0.0.1:0", "port '0' is not in 1-65535"),
        ("memcached://::1:11211", "IPv6 address in brackets"),
        ("memcached://:11211", "has no host"),
        ("memcached://a:1,a:1", "same node twice"),
        ("memcached://u@a:1", "no user or password"),
        ("memcached://a:1/path", "no path"),
        ("memcached://a:1?pool_size=0", "pool_size must be a positive integer"),
        ("memcached://a:1?pool_size=many", "option pool_size='many' is not a valid int"),
        ("memcached://a:1?prefix=%C3%BC", "prefix must be printable ASCII"),
        ("memcached://a:1?gutter=b", "option gutter: memcached node 'b' needs a port"),
        ("memcached://a:1,b:2?gutter=b:2", "option gutter: b:2 is also a node of the ring"),
        ("memcached://a:1?gutter_ttl=5", "option gutter_ttl needs option gutter"),
        ("memcached://a:1?gutter=c:3&gutter_ttl=0", "option gutter_ttl must be whole seconds"),
        ("memcached://a:1?gutter=c:3&gutter_ttl=9999999", "gutter_ttl must be whole seconds"),
        ("memcached://a:1?gutter=c:3&gutter_ttl=2.5", "gutter_ttl='2.5' is not a valid int"),
        ("postgresql://postgres@127.0.0.1/postgres?table=drop;table", "lowercase identifier"),
        ("postgresql://postgres@127.0.0.1/postgres?table=Entries", "lowercase identifier"),
        (
            "postgresql://postgres@127.0.0.1/postgres?pool_size=0",
            "pool_size must be a positive integer",
        ),
        ("postgresql://postgres@127.0.0.1/postgres?sweep_interval=0", "sweep_interval must"),
        ("postgresql://postgres@127.0.0.1/postgres?poolsize=1", "unknown option 'poolsize'"),
        ("postgresql://127.0.0.1:70000/postgres", "out of range"),
        ("postgresql:///postgres", "needs a host"),
    ],
)
def test_validate_url_rejects_with_a_clear_message(url: str, message: str) -> None:
    parsed = urlsplit(url)
    with pytest.raises(ValueError, match=re.escape(message)):
        tier_class(parsed.scheme).validate_url(parsed)


# -- a server that is down, comes back, or stalls ----------------------------------------------


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
async def test_down_server_gives_tier_unavailable(
    request: pytest.FixtureRequest, make_tier: MakeTier, backend: str
) -> None:
    # A closed port: the tier must start anyway and then report the outage in its own terms.
    url = with_port(backend_url(request, backend), free_port())  # nobody listens there
    tier = await make_tier(url)  # start() must not raise
    with pytest.raises(TierUnavailable) as get_error:
        await tier.get_many(["k"])
    with pytest.raises(TierUnavailable):
        await tier.set_many([w("k", b"v", V)])
    with pytest.raises(TierUnavailable):
        await tier.ping()
    assert isinstance(get_error.value.__cause__, Exception)  # raised `from` the driver's
    assert type(get_error.value.__cause__).__module__.split(".")[0] != "tiers"


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
async def test_tier_reconnects_without_restart(
    make_tier: MakeTier, tier_url: SplitResult, proxy: TcpProxy, key: Key
) -> None:
    tier = await make_tier(with_port(tier_url, proxy.port))  # server not reachable yet
    with pytest.raises(TierUnavailable):
        await tier.get(key("k"))

    await proxy.start()  # the server "comes up"
    await eventually(lambda: _answers(tier))
    await tier.set_many([w(key("k"), b"before", V)])

    await proxy.stop()  # connections cut, port refused
    with pytest.raises(TierUnavailable):
        await tier.get(key("k"))

    await proxy.start()
    await eventually(lambda: _answers(tier))
    assert await tier.get(key("k")) == b"before"


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
@pytest.mark.parametrize("graceful", [True, False], ids=["fin", "rst"])
async def test_first_call_after_a_server_restart_succeeds(
    make_tier: MakeTier, tier_url: SplitResult, proxy: TcpProxy, key: Key, graceful: bool
) -> None:
    # Pooled connections die with the server; the tier must not fail a call on one of them
    # once the server is back (that would count against its circuit breaker for nothing).
    await proxy.start()
    tier = await make_tier(with_port(tier_url, proxy.port))
    await tier.set_many([w(key("k"), b"v", V)])
    await asyncio.gather(*(tier.get(key("k")) for _ in range(8)))  # several pooled connections
    await proxy.stop(graceful=graceful)
    await proxy.start()
    assert await tier.get(key("k")) == b"v"
    await tier.set_many([w(key("k"), b"v2", V + 1)])
    await tier.ping()
    assert await tier.get(key("k")) == b"v2"


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
async def test_cancelled_call_leaves_the_tier_consistent(
    make_tier: MakeTier, tier_url: SplitResult, proxy: TcpProxy, key: Key
) -> None:
    # The engine cancels calls that take too long. The late answer to a cancelled call must
    # never be taken for the answer to a later one.
    await proxy.start()
    tier = await make_tier(with_port(tier_url, proxy.port))
    await tier.set_many([w(key("a"), b"A", V), w(key("b"), b"B", V)])
    assert await tier.get(key("a")) == b"A"  # connections are open now

    proxy.stall()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await tier.get(key("a"))
    proxy.release()

    for _ in range(5):
        assert await tier.get_many([key("b")]) == [b"B"]
        assert await tier.get_many([key("a"), key("b")]) == [b"A", b"B"]


@pytest.mark.parametrize("backend", NETWORK_BACKENDS)
@pytest.mark.parametrize("call", ["get_many", "set_many", "ping"])
async def test_connection_closed_mid_call_gives_tier_unavailable(
    make_tier: MakeTier, tier_url: SplitResult, proxy: TcpProxy, key: Key, call: str
) -> None:
    # The server goes away while a request is out: the caller must get TierUnavailable
    # promptly, not a driver error, and the event loop must not spin on the dead socket.
    await proxy.start()
    tier = await make_tier(with_port(tier_url, proxy.port))
    await tier.ping()  # connections are open now
    calls = {
        "get_many": lambda: tier.get_many([key("k")]),
        "set_many": lambda: tier.set_many([w(key("k"), b"v", V)]),
        "ping": tier.ping,
    }
    proxy.stall()
    sent = proxy.forwarded
    pending = asyncio.ensure_future(calls[call]())
    await eventually(lambda: _true(proxy.forwarded > sent))  # the request is out
    start = time.monotonic()
    await proxy.stop(graceful=True)
    with pytest.raises(TierUnavailable):
        async with asyncio.timeout(DEADLINE):
            await pending
    # A client spinning on the closed socket blocks the loop, so the timeout cannot fire.
    assert time.monotonic() - start < DEADLINE


async def _true(value: bool) -> bool:
    return value


async def _answers(tier: Tier) -> bool:
    try:
        await tier.ping()
    except TierUnavailable:
        return False
    return True
