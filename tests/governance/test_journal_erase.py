"""Erasure from the write-behind journal (Journal.erase) against a real Redis: the entries
of given keys or tags go from the stream and its dead letters, pending ones included,
and nothing else does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from cachesvc.envelope import Entry
from cachesvc.journal import ERASE_SCAN_BATCH, GROUP, Journal
from tests.journals import make_journal


@pytest.fixture
async def journal(redis_url: str) -> AsyncIterator[Journal]:
    journal = make_journal(redis_url, "gov:journal")
    yield journal
    await journal.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def payload(value: bytes, *tags: str, version: int = 1) -> bytes:
    return Entry(value, "text/plain", version, None, tags).encode()


async def stream_text(redis: Redis, stream: str) -> bytes:
    """Everything the stream holds, fields and values, as one byte string."""
    entries = await redis.xrange(stream)
    return b"|".join(
        field + b"=" + value for _, fields in entries for field, value in fields.items()
    )


async def test_the_entries_of_keys_and_tags_go_from_both_streams(
    journal: Journal, redis: Redis
) -> None:
    await journal.append("subject:1", payload(b"first write of the subject"))
    await journal.append("subject:1", payload(b"second write of the subject", version=2))
    await journal.append("orders:1", payload(b"order of the subject", "user:subject"))
    await journal.append("other:1", payload(b"someone else", "user:other"))
    # One of the subject's writes was refused and dead-lettered.
    await redis.xadd(
        journal.dead_stream,
        {b"k": b"address:1", b"p": payload(b"dead address of the subject", "user:subject")},
    )

    erased = await journal.erase(["subject:1"], ["user:subject"])

    assert erased.entries == 4
    assert erased.keys == {"subject:1", "orders:1", "address:1"}
    remaining = await stream_text(redis, journal.stream) + await stream_text(
        redis, journal.dead_stream
    )
    assert b"subject" not in remaining.replace(b"user:other", b"")
    assert b"someone else" in remaining
    assert await redis.xlen(journal.stream) == 1 and await redis.xlen(journal.dead_stream) == 0


async def test_an_entry_a_flusher_holds_pending_is_not_applied(
    journal: Journal, redis: Redis
) -> None:
    await journal.append("subject:1", payload(b"secret"))
    await journal.append("other:1", payload(b"kept"))
    # A flusher read both and has not acknowledged them yet (its apply failed, say).
    await redis.xreadgroup(GROUP, "peer", {journal.stream: ">"}, count=10)

    assert (await journal.erase(["subject:1"])).entries == 1

    pending = await redis.xpending(journal.stream, GROUP)
    assert pending["pending"] == 1  # the erased one is acknowledged: nobody retries it
    # What the peer re-reads of its own pending entries on its retry: the other one only.
    reread = await redis.xreadgroup(GROUP, "peer", {journal.stream: "0"}, count=10)
    assert [fields[b"k"] for _, fields in reread[0][1]] == [b"other:1"]


async def test_a_long_journal_is_scanned_in_batches(journal: Journal, redis: Redis) -> None:
    count = ERASE_SCAN_BATCH * 2 + 17
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            key = "subject" if n % 500 == 499 else f"k{n}"
            pipe.xadd(journal.stream, {b"k": key.encode(), b"p": payload(b"v")})
        await pipe.execute()

    erased = await journal.erase(["subject", f"k{count - 1}"])

    assert erased.entries == count // 500 + 1
    assert await redis.xlen(journal.stream) == count - erased.entries
    keys = {fields[b"k"] for _, fields in await redis.xrange(journal.stream)}
    assert b"subject" not in keys and f"k{count - 1}".encode() not in keys


async def test_nothing_asked_nothing_read(journal: Journal, redis: Redis) -> None:
    await journal.append("k", payload(b"v", "t"))
    assert (await journal.erase([], [])).entries == 0
    assert (await journal.erase(["absent"], ["absent"])).entries == 0
    assert await redis.xlen(journal.stream) == 1
