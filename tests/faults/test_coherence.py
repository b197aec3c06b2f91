"""Several sidecars sharing tiers stay coherent: one test for each way a history check of
three sidecars found them not to be (issue 11's numbered findings), with real servers.

Each sidecar here is an in-process service (its own engine, memory tier, subscription and
clock, as a separate process has), except where a process must die (kill -9).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from cachesvc.config import Settings
from invalidation.base import Backoff, EventSink, Listener
from tests.conformance.conftest import TcpProxy
from tests.faults.conftest import FAST_CACHE_TIER, FAST_DURABLE_TIER
from tests.polling import until
from tests.servers import MemcachedServer, PostgresServer, RedisServer, flush_redis
from tests.service.conftest import Client, MakeClient
from tests.service.test_api import path

pytestmark = pytest.mark.faults

TTLS = (300, 3600, 86400)


def settings(
    *urls: str,
    channel: str | None = None,
    journal: str | None = None,
    volatile_journal: bool = False,
) -> Settings:
    tiers = []
    for position, url in enumerate(urls):
        fast = FAST_DURABLE_TIER if position == len(urls) - 1 else FAST_CACHE_TIER
        tier = {"url": url, "ttl": TTLS[min(position, 2)]}
        if not url.startswith("memory"):
            tier.update(fast)
        tiers.append(tier)
    document: dict[str, Any] = {
        "tiers": tiers,
        "write": {"drain_timeout": 1, "volatile_journal": volatile_journal},
    }
    if journal is not None:
        document["write"]["journal_url"] = journal
    if channel is not None:
        document["invalidation"] = {"url": channel, "liveness_interval": 0.5}
    return Settings.model_validate(document)


async def get(client: Client, key: str) -> tuple[int, bytes, str | None]:
    response = await client.get(path(key))
    return response.status, await response.read(), response.headers.get("X-Cache-Tier")


async def put(client: Client, key: str, value: bytes, query: str = "") -> int:
    response = await client.put(path(key, query), data=value)
    await response.read()
    return response.status


async def ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 200


async def until_ready(*clients: Client) -> None:
    for client in clients:
        await until(lambda client=client: ready(client), 10, "the sidecar ready")


# -- 1. a PUT reaches the peers' in-process tiers ------------------------------------------


async def test_1_a_put_reaches_the_peers_in_process_tiers(
    make_client: MakeClient, clean_redis_url: str, clean_postgres_url: str
) -> None:
    config = settings("memory://", clean_postgres_url, channel=clean_redis_url)
    first, second = await make_client(config), await make_client(config)
    await until_ready(first, second)
    stale = 0
    for round_ in range(20):
        value = f"v{round_}".encode()
        assert await put(first, "shared", value) == 204
        body = (await get(second, "shared"))[1]  # right after the answer
        stale += body != value
        assert (await get(second, "shared"))[2] == "l1"  # and its l1 holds the new value
    assert stale == 0


# -- 2. a writer's own write-behind value does not come back -------------------------------


async def test_2_the_overlay_goes_once_anyone_applied_the_write(
    make_client: MakeClient, clean_redis_url: str, clean_postgres_url: str
) -> None:
    config = settings(clean_redis_url, clean_postgres_url)
    writer, peer = await make_client(config), await make_client(config)
    assert await put(writer, "wb", b"v1", "strategy=write-behind") == 202
    durable = writer.server.api.engine.durable.tier

    async def flushed() -> bool:
        return await durable.get("wb") is not None

    await until(flushed, 5, "v1 applied below by a flusher")
    assert await put(peer, "wb", b"v2", "strategy=cache-aside") == 204  # l1 tombstoned
    await asyncio.sleep(0)
    reads = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        reads.append((time.monotonic(), (await get(writer, "wb"))[1]))
        await asyncio.sleep(0.05)
    answered = reads[0][0]
    assert [body for at, body in reads if at > answered + 1.0] != []
    assert all(body == b"v2" for at, body in reads if at > answered + 1.0), reads


# -- 3. a tag invalidation does not resurrect an older value -------------------------------


async def test_3_a_tag_invalidation_does_not_bring_back_an_older_value(
    make_client: MakeClient,
    clean_redis_url: str,
    memcached_server: MemcachedServer,
    postgres_server: PostgresServer,
) -> None:
    client = await make_client(settings(clean_redis_url, memcached_server.url, postgres_server.url))
    assert await put(client, "tagged", b"v1") == 204  # write-through: in every tier
    await asyncio.to_thread(postgres_server.stop)
    try:
        assert await put(client, "tagged", b"v2", "strategy=write-behind&tags=T") == 202
        response = await client.post("/v1/invalidate", json={"tags": ["T"]})
        # Applied here, but its marker cannot be kept with the durable tier down: 503.
        assert response.status == 503
        reads = [await get(client, "tagged") for _ in range(10)]
    finally:
        await asyncio.to_thread(postgres_server.start)
    await until_ready(client)
    reads += [await get(client, "tagged") for _ in range(10)]
    assert all(body != b"v1" for _, body, _ in reads), reads
    assert reads[-1][0] == 404


# -- 4. write-behind is refused on a journal that cannot keep it ---------------------------


async def test_4_write_behind_needs_a_journal_that_persists_every_write(
    make_client: MakeClient, volatile_redis_server: RedisServer, clean_postgres_url: str
) -> None:
    url = volatile_redis_server.url
    strict = await make_client(settings(url, clean_postgres_url))
    response = await strict.put(path("j"), data=b"v", params={"strategy": "write-behind"})
    document = await response.json()
    assert response.status == 503 and document["tier"] == "journal"
    assert "appendfsync always" in document["detail"]
    assert "volatile_journal" in document["detail"]
    accepting = await make_client(settings(url, clean_postgres_url, volatile_journal=True))
    assert await put(accepting, "j", b"v", "strategy=write-behind") == 202
    readiness = await (await accepting.get("/readyz")).json()
    assert readiness["journal"] == {"durable": False, "volatile_accepted": True}
    metrics = await (await accepting.get("/metrics")).text()
    assert "cachesvc_journal_durable 0.0" in metrics


# -- 5. markers outlive an empty Redis restart ---------------------------------------------


async def test_5_invalidations_outlive_a_redis_that_comes_back_empty(
    make_client: MakeClient,
    volatile_redis_server: RedisServer,
    clean_memcached_url: str,
    clean_postgres_url: str,
) -> None:
    redis_url = volatile_redis_server.url
    config = settings(
        redis_url, clean_memcached_url, clean_postgres_url, channel=redis_url, volatile_journal=True
    )
    client = await make_client(config)
    await until_ready(client)
    assert await put(client, "session:1", b"s", "tags=tenant-7") == 204
    assert await put(client, "other:1", b"o", "tags=tenant-7") == 204
    response = await client.post(
        "/v1/invalidate", json={"prefixes": ["session:"], "tags": ["tenant-7"]}
    )
    assert response.status == 202
    await client.close()
    await asyncio.to_thread(volatile_redis_server.restart)  # empty: no persistence
    restarted = await make_client(config)
    await until_ready(restarted)
    assert (await get(restarted, "session:1"))[0] == 404
    assert (await get(restarted, "other:1"))[0] == 404  # memcached still holds both


# -- 6. a partitioned sidecar serves nothing a peer deleted --------------------------------


async def test_6_a_sidecar_cut_off_from_redis_serves_nothing_deleted_meanwhile(
    make_client: MakeClient, redis_server: RedisServer, clean_postgres_url: str
) -> None:
    proxy = TcpProxy("127.0.0.1", redis_server.port)
    await proxy.start()
    try:
        through = f"redis://127.0.0.1:{proxy.port}/0"
        cut_off = await make_client(
            settings("memory://", through, clean_postgres_url, channel=through)
        )
        peer = await make_client(
            settings("memory://", redis_server.url, clean_postgres_url, channel=redis_server.url)
        )
        await until_ready(cut_off, peer)
        keys = [f"cut:{n}" for n in range(20)]
        for key in keys:
            assert await put(peer, key, b"old") == 204
            assert (await get(cut_off, key))[1] == b"old"  # in its l1 now
        proxy.stall()  # its Redis link drops everything: a partition
        deleted_at = time.monotonic()
        for key in keys:
            assert (await peer.delete(path(key))).status == 204
        stale = []
        while time.monotonic() - deleted_at < 5:
            for key in keys:
                started = time.monotonic()
                _, body, tier = await get(cut_off, key)
                if body == b"old" and started - deleted_at > 1.0:
                    stale.append((round(started - deleted_at, 2), key, tier))
        proxy.release()
        after = [await get(cut_off, key) for key in keys]
    finally:
        await proxy.stop()
    assert stale == []
    assert all(status == 404 for status, _, _ in after)


# -- 7. the listener loop survives any exception -------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.gaps = 0
        self.disconnects = 0

    async def on_event(self, event: Any, source: str) -> None: ...

    async def on_shared(self, event: Any, source: str) -> None: ...

    async def originate(self, event: Any, source: str) -> None: ...

    def on_malformed(self, raw: Any, error: Any, source: str) -> None: ...

    async def on_gap(self, source: str, lost: bool = True) -> None:
        self.gaps += 1

    def on_disconnect(self, source: str) -> None:
        self.disconnects += 1


class _Surprising(Listener):
    """Subscribes, then its transport raises what no connection error list names."""

    source = "surprising"
    connection_errors = (OSError,)

    async def listen(self, sink: EventSink, backoff: Backoff) -> None:
        self.state = "up"
        await sink.on_gap(self.source)
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")


async def test_7_the_listener_loop_outlives_any_exception_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = _Recorder()
    listener = _Surprising("redis://unused", "c")
    task = asyncio.create_task(listener.run(sink))
    try:
        await until(lambda: _true(sink.gaps >= 3), 10, "three restarts")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sink.disconnects >= 2
    restarts = [r for r in caplog.records if "restarting it" in r.getMessage()]
    assert restarts and restarts[0].levelno == logging.ERROR
    assert "unable to perform operation" in restarts[0].getMessage()


async def _true(value: bool) -> bool:
    return value


# -- 8. the overlay is not served while the source is lost --------------------------------


async def test_8_no_overlay_while_blind(
    make_client: MakeClient,
    clean_redis_url: str,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
) -> None:
    client = await make_client(
        settings(clean_redis_url, postgres_server.url, channel=redis_server.url)
    )
    await until_ready(client)
    assert await put(client, "ov", b"v1") == 204
    await asyncio.to_thread(postgres_server.stop)
    try:
        assert await put(client, "ov", b"v2", "strategy=write-behind") == 202
        flush_redis(clean_redis_url)  # the top tier misses: only the overlay holds v2
        assert (await get(client, "ov"))[1] == b"v2"  # subscribed: the overlay serves
        await asyncio.to_thread(redis_server.kill)  # the channel is lost
        await until(lambda: _blind(client), 5, "blind")
        status, body, _ = await get(client, "ov")
    finally:
        await asyncio.to_thread(postgres_server.start)
    assert (status, body) != (200, b"v2")
    assert status == 503  # the durable tier, the only one read, is down


async def _blind(client: Client) -> bool:
    return client.server.api.engine.blind


# -- 9. one ETag names one value -----------------------------------------------------------


async def test_9_versions_are_unique_across_sidecars(
    make_client: MakeClient, clean_redis_url: str, clean_postgres_url: str
) -> None:
    config = settings(clean_redis_url, clean_postgres_url)
    first, second = await make_client(config), await make_client(config)
    engines = [client.server.api.engine for client in (first, second)]
    await until(lambda: _true(all(e.lease.held is not None for e in engines)), 5, "leases")  # type: ignore[union-attr]
    assert engines[0].clock.node != engines[1].clock.node
    etags: dict[str, bytes] = {}
    for round_ in range(200):
        responses = await asyncio.gather(
            first.put(path("race"), data=b"a%d" % round_),
            second.put(path("race"), data=b"b%d" % round_),
        )
        for response, value in zip(responses, (b"a%d" % round_, b"b%d" % round_), strict=True):
            assert response.status == 204
            etag = response.headers["ETag"]
            assert etag not in etags, (etag, etags[etag], value)
            etags[etag] = value


# -- 10. stranded write-behind entries: re-read by their own consumer, claimed from a dead one


async def test_10_entries_whose_read_reply_was_lost_are_applied_within_seconds(
    make_client: MakeClient, clean_redis_url: str, clean_postgres_url: str
) -> None:
    client = await make_client(settings(clean_redis_url, clean_postgres_url))
    engine = client.server.api.engine
    assert engine.journal is not None
    # Delivered to this sidecar's consumer, whose reply never arrived: it sits in the
    # consumer's pending list, where only a re-read of its own finds it.
    await _delivered_unacknowledged(clean_redis_url, engine, "stranded", engine.journal.consumer)
    started = time.monotonic()
    await until(_applied(engine, "stranded"), 5, "the stranded entry applied")
    assert time.monotonic() - started < engine.journal.reclaim_after / 2


async def test_10_an_idle_sidecar_applies_what_a_dead_peer_took(
    make_client: MakeClient, clean_redis_url: str, clean_postgres_url: str
) -> None:
    config = settings(clean_redis_url, clean_postgres_url)
    write = config.write.model_copy(update={"reclaim_after": 1.0})
    client = await make_client(config.model_copy(update={"write": write}))
    engine = client.server.api.engine
    # Taken by a peer that died before applying it, and no write comes after: only the
    # idle flusher's reclaim (XAUTOCLAIM after reclaim_after) finds it.
    await _delivered_unacknowledged(clean_redis_url, engine, "orphan", "dead-peer")
    await until(_applied(engine, "orphan"), 10.0, "the dead peer's entry applied")


async def _delivered_unacknowledged(redis_url: str, engine: Any, key: str, consumer: str) -> None:
    """A journal entry for ``key``, delivered to ``consumer`` and not acknowledged. Appended
    and delivered in one transaction, so that the flusher's own blocking read cannot take
    it first."""
    stream = engine.journal.stream
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with raw.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, {b"k": key.encode(), b"p": _envelope(engine, b"v")})
            pipe.xreadgroup("cachesvc-flushers", consumer, {stream: ">"}, count=10)
            _, delivered = await pipe.execute()
        assert delivered
    finally:
        await raw.aclose()


def _applied(engine: Any, key: str) -> Callable[[], Awaitable[bool]]:
    async def applied() -> bool:
        return await engine.durable.tier.get(key) is not None

    return applied


def _envelope(engine: Any, value: bytes) -> bytes:
    from cachesvc.envelope import Entry

    entry = Entry(value, "application/octet-stream", engine.clock.next(), None)
    encoded: bytes = entry.encode()
    return encoded


# -- 11. a DELETE that failed leaves no trace ----------------------------------------------


async def test_11_a_failed_delete_leaves_every_sidecar_agreeing(
    make_client: MakeClient, clean_redis_url: str, postgres_server: PostgresServer
) -> None:
    config = settings("memory://", postgres_server.url, channel=clean_redis_url)
    first, second = await make_client(config), await make_client(config)
    await until_ready(first, second)
    assert await put(first, "keep", b"v1") == 204
    assert (await get(second, "keep"))[1] == b"v1"
    await asyncio.to_thread(postgres_server.stop)
    try:
        response = await first.delete(path("keep"))
        assert response.status == 503
        answers = [(await get(client, "keep"))[:2] for client in (first, second)]
    finally:
        await asyncio.to_thread(postgres_server.start)
    # Told first, the peers dropped their copies, and so did the sidecar that tried: with
    # the durable tier down none can read the value again (503), none says it is gone.
    assert [status for status, _ in answers] == [503, 503]
    await until_ready(first, second)
    later = [(await get(client, "keep"))[:2] for client in (first, second)]
    assert later == [(200, b"v1"), (200, b"v1")]


# -- 12. no spurious 503s after a Redis restart --------------------------------------------


async def test_12_a_redis_restart_costs_no_request(
    make_client: MakeClient, redis_server: RedisServer, clean_postgres_url: str
) -> None:
    client = await make_client(
        settings("memory://", redis_server.url, clean_postgres_url, channel=redis_server.url)
    )
    await until_ready(client)
    for n in range(5):  # pooled connections to the journal and the channel
        assert await put(client, f"r{n}", b"v", "strategy=write-behind") == 202
    await asyncio.to_thread(redis_server.restart)  # persistent: the journal survives
    await until_ready(client)
    statuses = [await put(client, f"after{n}", b"v", "strategy=write-behind") for n in range(20)]
    statuses += [await put(client, f"through{n}", b"v") for n in range(20)]
    assert statuses == [202] * 20 + [204] * 20
