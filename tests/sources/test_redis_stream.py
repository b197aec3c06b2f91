"""The Redis Stream source: every sidecar applies every entry, one sidecar per entry applies
it to the shared tiers, and nothing is missed across stops, reconnects and dead consumers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from invalidation.events import InvalidationEvent
from invalidation.redis_stream import MaxAge, MaxLength, RedisStreamListener, append
from tests.polling import until
from tests.servers import RedisServer
from tests.sources.conftest import RecordingSink, running

_names = itertools.count()
NO_TRIM = MaxLength(1_000_000)


@pytest.fixture
def stream() -> str:
    return f"test:invalidate:{next(_names)}"


@pytest.fixture
async def client(stream_redis: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(stream_redis.url)
    yield redis
    await redis.aclose()


def listener(url: str, stream: str, identity: str = "a") -> RedisStreamListener:
    return RedisStreamListener(url, stream, identity, claim_idle=0.5)


def key_event(key: str, origin: str | None = None) -> InvalidationEvent:
    return InvalidationEvent(keys=(key,), origin=origin)


async def append_keys(client: Redis, stream: str, keys: list[str]) -> None:
    for key in keys:
        await append(client, stream, key_event(key), NO_TRIM)


async def test_entries_appended_while_stopped_are_applied_on_start(
    stream_redis: RedisServer, client: Redis, stream: str
) -> None:
    sink = RecordingSink()
    async with running(listener(stream_redis.url, stream), sink):
        await until(lambda: _true(sink.gaps), 5, "the first catch-up")
        assert sink.gaps == [True]  # no cursor yet: it cannot know what came before
        await append_keys(client, stream, ["before"])
        await until(lambda: _true(sink.keys()["before"]), 5, "the first entry")
    await append_keys(client, stream, ["while-stopped-1", "while-stopped-2"])

    restarted = RecordingSink()  # a new process: only the stored cursor remembers
    async with running(listener(stream_redis.url, stream), restarted):
        await until(lambda: _true(restarted.gaps), 5, "caught up after the restart")
        assert restarted.keys() == {"while-stopped-1": 1, "while-stopped-2": 1}
        assert restarted.gaps == [False]
        assert [event.keys for event in restarted.shared] == [
            ("while-stopped-1",),
            ("while-stopped-2",),
        ]


async def test_killed_connections_lose_no_entry_and_are_no_lost_gap(
    stream_redis: RedisServer, client: Redis, stream: str
) -> None:
    sink = RecordingSink()
    keys = [f"k{i}" for i in range(300)]
    own_id = await client.client_id()
    the_listener = listener(stream_redis.url, stream)
    async with running(the_listener, sink) as task:
        for part in range(3):
            await until(lambda: _true(the_listener.state == "up"), 5, "connected")
            await append_keys(client, stream, keys[part * 100 : part * 100 + 50])
            killed = await _kill_other_clients(client, own_id)
            assert killed >= 1
            await append_keys(client, stream, keys[part * 100 + 50 : (part + 1) * 100])
            await until(
                lambda part=part: _true(sink.disconnects > part),
                5,
                f"disconnect {part + 1} noticed",
            )
        await until(lambda: _true(len(sink.events) >= len(keys)), 10, "every entry applied")
        await until(lambda: _true(len(sink.gaps) == 4), 5, "caught up after the last kill")
        assert not task.done()
        assert sink.disconnects == 3
    assert sink.keys() == dict.fromkeys(keys, 1)
    assert sink.keys("shared") == dict.fromkeys(keys, 1)
    assert sink.gaps == [True, False, False, False]


async def test_a_hung_server_is_noticed_and_the_gap_after_it_loses_nothing(
    redis_server: RedisServer, stream: str
) -> None:
    sink = RecordingSink()
    the_listener = listener(redis_server.url, stream)
    redis = Redis.from_url(redis_server.url)
    try:
        async with running(the_listener, sink):
            await until(lambda: _true(sink.gaps), 5, "the first catch-up")
            await asyncio.to_thread(redis_server.hang)
            hung = time.monotonic()
            await until(lambda: _true(sink.disconnects), 5, "the hang noticed")
            print(f"hang noticed after {time.monotonic() - hung:.2f} s")
            assert the_listener.state == "down"
            await asyncio.to_thread(redis_server.resume)
            await append_keys(redis, stream, ["after-the-hang"])
            await until(lambda: _true(sink.keys()["after-the-hang"]), 10, "entries after it")
            # The catch-up is reported once it is done, which may be just after its entries.
            await until(lambda: _true(sink.gaps[1:]), 5, "the catch-up after the hang")
            assert sink.gaps[1:] == [False]
    finally:
        await redis.aclose()


async def test_entries_trimmed_before_they_were_read_are_a_lost_gap(
    stream_redis: RedisServer, client: Redis, stream: str
) -> None:
    sink = RecordingSink()
    async with running(listener(stream_redis.url, stream), sink):
        await until(lambda: _true(sink.gaps), 5, "the first catch-up")
    await append_keys(client, stream, [f"k{i}" for i in range(10)])
    await client.xtrim(stream, maxlen=3, approximate=False)

    restarted = RecordingSink()
    async with running(listener(stream_redis.url, stream), restarted):
        await until(lambda: _true(restarted.gaps), 5, "caught up")
        assert restarted.gaps == [True]
        assert restarted.keys() == {"k7": 1, "k8": 1, "k9": 1}
        # Reported once: the next entries are no new gap.
        await append_keys(client, stream, ["next"])
        await until(lambda: _true(restarted.keys()["next"]), 5, "the next entry")
        assert restarted.gaps == [True]


async def test_trimming_while_running_is_a_lost_gap(
    stream_redis: RedisServer, client: Redis, stream: str
) -> None:
    sink = RecordingSink()
    slow = listener(stream_redis.url, stream)
    slow.block = 0.5
    async with running(slow, sink):
        await until(lambda: _true(sink.gaps), 5, "the first catch-up")
        # Trimmed in the same transaction as appended: no read can come in between.
        async with client.pipeline(transaction=True) as pipe:
            for i in range(5):
                pipe.xadd(stream, {"event": key_event(f"k{i}").to_json()})
            pipe.xtrim(stream, maxlen=1, approximate=False)
            await pipe.execute()
        await until(lambda: _true(sink.keys()["k4"]), 5, "the entry kept")
        assert sink.gaps == [True, True]
        assert sink.keys() == {"k4": 1}


async def test_each_entry_reaches_the_shared_tiers_once_across_three_sidecars(
    stream_redis: RedisServer, client: Redis, stream: str
) -> None:
    sinks = [RecordingSink() for _ in range(3)]
    listeners = [listener(stream_redis.url, stream, name) for name in "abc"]
    keys = [f"k{i}" for i in range(300)]
    async with (
        running(listeners[0], sinks[0]),
        running(listeners[1], sinks[1]),
        running(listeners[2], sinks[2]),
    ):
        for sink in sinks:
            await until(lambda sink=sink: _true(sink.gaps), 5, "every listener caught up")
        await append_keys(client, stream, keys)
        # Applied by their publisher already: every sidecar applies them here, none shares.
        for i in range(20):
            await append(client, stream, key_event(f"own{i}", origin="sidecar-x"), NO_TRIM)
        for sink in sinks:
            await until(lambda sink=sink: _true(len(sink.events) == 320), 10, "all broadcast")
        await until(lambda: _true(_shared_total(sinks) >= 300), 10, "all shared")
        await until(lambda: _nothing_pending(client, stream), 5, "all acknowledged")
    shared = sum((sink.keys("shared") for sink in sinks), start=type(sinks[0].keys())())
    assert shared == dict.fromkeys(keys, 1)
    for sink in sinks:
        assert len(sink.keys()) == 320


async def test_an_entry_taken_by_a_consumer_that_died_is_applied_by_another(
    stream_redis: RedisServer, client: Redis, stream: str
) -> None:
    doomed_sink = RecordingSink(hold_shared=asyncio.Event())  # never set: it dies first
    async with running(listener(stream_redis.url, stream, "doomed"), doomed_sink):
        await until(lambda: _true(doomed_sink.gaps), 5, "the first catch-up")
        await append_keys(client, stream, ["orphan"])
        await until(lambda: _true(doomed_sink.shared_started), 5, "the doomed consumer took it")
    assert doomed_sink.shared == []
    pending = await client.xpending(stream, "cachesvc-appliers")
    assert pending["pending"] == 1

    survivors = [RecordingSink(), RecordingSink()]
    async with (
        running(listener(stream_redis.url, stream, "b"), survivors[0]),
        running(listener(stream_redis.url, stream, "c"), survivors[1]),
    ):
        await until(lambda: _true(_shared_total(survivors) >= 1), 10, "claimed and applied")
        await until(lambda: _nothing_pending(client, stream), 5, "acknowledged")
        # Idle longer than claim_idle again: nobody claims it a second time.
        await asyncio.sleep(1.0)
    assert _shared_total(survivors) == 1
    assert [event.keys for sink in survivors for event in sink.shared] == [("orphan",)]


async def test_append_trims_by_length_and_by_age(client: Redis, stream: str) -> None:
    for i in range(1000):
        await append(client, stream, key_event(f"k{i}"), MaxLength(100))
    length = await client.xlen(stream)
    assert 100 <= length < 1000  # approximate: whole nodes of 100 entries go at once

    aged = f"{stream}:aged"
    a_minute_ago = int(time.time() * 1000) - 60_000
    for i in range(150):  # more than one node's worth: the first node is all old
        await client.xadd(aged, {"event": "{}"}, id=f"{a_minute_ago}-{i + 1}")
    await append(client, aged, key_event("new"), MaxAge(30))
    assert await client.xlen(aged) < 151


async def test_malformed_entries_are_reported_and_skipped(
    stream_redis: RedisServer, client: Redis, stream: str
) -> None:
    sink = RecordingSink()
    async with running(listener(stream_redis.url, stream), sink):
        await until(lambda: _true(sink.gaps), 5, "the first catch-up")
        await client.xadd(stream, {"event": "not json"})
        await client.xadd(stream, {"other": "field"})
        await append_keys(client, stream, ["good"])
        await until(lambda: _true(sink.keys()["good"]), 5, "the good entry")
        await until(lambda: _nothing_pending(client, stream), 5, "all acknowledged")
    assert sink.malformed == 2
    assert [event.keys for event in sink.shared] == [("good",)]


async def test_lag_is_zero_once_caught_up(stream_redis: RedisServer, stream: str) -> None:
    sink = RecordingSink()
    the_listener = listener(stream_redis.url, stream)
    assert the_listener.lag >= 0
    async with running(the_listener, sink):
        await until(lambda: _true(sink.gaps), 5, "caught up")
        assert the_listener.lag == 0.0


def _shared_total(sinks: list[RecordingSink]) -> int:
    return sum(len(sink.shared) for sink in sinks)


async def _nothing_pending(client: Redis, stream: str) -> bool:
    pending = await client.xpending(stream, "cachesvc-appliers")
    return bool(pending["pending"] == 0)


async def _kill_other_clients(client: Redis, own_id: int) -> int:
    killed = 0
    for info in await client.client_list():
        if int(info["id"]) != own_id:
            killed += await client.execute_command("CLIENT", "KILL", "ID", info["id"])
    return killed


async def _true(value: object) -> bool:
    return bool(value)
