"""The journal's appends against a real redis-server: appends made together get their own
entry ids, in order; an append to a hung server fails at the journal's deadline; the next
one works on a fresh connection once the server answers. On the Redis tier's database, a
write's top-tier write and append reach Redis in one request, except while appends wait
for replicas, which then never hold up the tier's calls."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis

from cachesvc import journal as journal_module
from cachesvc.envelope import Entry
from cachesvc.journal import Journal, JournalUnavailable
from cachesvc.metrics import Metrics
from cachesvc.slot import TierSlot
from tests.journals import make_journal
from tests.servers import RedisServer
from tiers.base import TierWrite
from tiers.redis import RedisTier

V = 1_700_000_000_000_000


def payload(value: bytes) -> bytes:
    return Entry(value, "text/plain", 1, None, ()).encode()


@contextlib.asynccontextmanager
async def tier_and_journal(
    url: str, replicas: int | None = None
) -> AsyncIterator[tuple[RedisTier, Journal, redis.Redis]]:
    """A Redis tier and a journal on the database ``url`` names, and a client to look."""
    tier = RedisTier("l1", urlsplit(url), 60)
    await tier.start()
    journal = make_journal(url, "unit:journal", replicas=replicas)
    raw = redis.Redis("127.0.0.1", urlsplit(url).port or 6379, socket_timeout=2)
    try:
        yield tier, journal, raw
    finally:
        raw.close()
        await journal.close()
        await tier.close()


def top_slot(tier: RedisTier) -> TierSlot:
    """The engine's hold on its top tier: writes made in one turn go as one batch."""
    return TierSlot(
        tier, timeout=5, breaker_failures=3, breaker_reset=1, metrics=Metrics().for_tier("l1")
    )


async def test_an_append_to_a_hung_journal_fails_at_its_deadline_and_the_next_works(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "CALL_TIMEOUT", 0.3)
    journal = make_journal(redis_server.url, "unit:journal")
    stream = journal.stream
    raw = redis.Redis("127.0.0.1", redis_server.port, socket_timeout=2)
    try:
        first = await journal.append("k:1", payload(b"one"))  # creates the group: a task
        together = [journal.append(f"k:{n}", payload(b"more")) for n in (2, 3)]
        ids = await asyncio.gather(*together)  # one batch: one pipeline call
        assert len(set(ids)) == 2 and first not in ids
        accepted = int(raw.info("stats")["total_connections_received"])
        redis_server.hang()
        try:
            started = time.monotonic()
            with pytest.raises(JournalUnavailable, match=r"no answer within 0\.3 s"):
                await journal.append("k:4", payload(b"lost"))
            assert time.monotonic() - started < 2.0
        finally:
            redis_server.resume()
        # The call given up closed its connection: the next append gets a fresh one and
        # its own reply, not the late one of the append given up.
        fifth = await journal.append("k:5", payload(b"five"))
        assert int(raw.info("stats")["total_connections_received"]) > accepted
        entries = raw.xrange(stream)
        assert fifth == entries[-1][0]
        assert [fields[b"k"] for _, fields in entries][:3] == [b"k:1", b"k:2", b"k:3"]
    finally:
        raw.close()
        await journal.close()


async def test_a_writes_top_tier_write_and_append_reach_redis_in_one_request(
    redis_server: RedisServer,
) -> None:
    """What the engine does for a write-behind write, in one turn: the top tier's write
    and the journal append. On the tier's own database (the journal's default) they share
    connections and go as one request: Redis reads them once."""
    async with tier_and_journal(redis_server.url) as (tier, journal, raw):
        slot = top_slot(tier)
        # The first of each opens the connection and creates the stream's group.
        await asyncio.gather(
            slot.set(TierWrite("k", b"one", V, 60)), journal.append("k", payload(b"one"))
        )
        raw.config_resetstat()
        _, entry_id = await asyncio.gather(
            slot.set(TierWrite("k", b"two", V + 1, 60)), journal.append("k", payload(b"two"))
        )
        # The write's request, then the INFO asking: two reads (three with two requests).
        assert int(raw.info("stats")["total_reads_processed"]) == 2
        assert await tier.get_many(["k"]) == [b"two"]
        assert raw.xrange(journal.stream)[-1][0] == entry_id


async def test_appends_waiting_for_replicas_never_hold_up_the_tiers_reads(
    redis_server: RedisServer,
) -> None:
    """A journal whose entries replicas must take sends WAIT after its appends, which
    holds up its connection until they answer: here never (no replica), so the append
    fails after WAIT's second. Its appends keep connections of their own, so a read of
    the tier, on one connection to the same database, is answered meanwhile."""
    url = redis_server.url + "?max_connections=1"
    async with tier_and_journal(url, replicas=1) as (tier, journal, raw):
        await tier.set_many([TierWrite("k", b"one", V, 60)])
        append = journal.append("k", payload(b"one"))

        def waiting() -> bool:
            return any(c["cmd"] == "wait" and "b" in c["flags"] for c in raw.client_list())

        deadline = time.monotonic() + 5
        while not waiting():
            assert time.monotonic() < deadline, "the append's WAIT never reached Redis"
            await asyncio.sleep(0.01)
        assert await tier.get_many(["k"]) == [b"one"]
        assert waiting()  # answered while the WAIT still holds its connection
        with pytest.raises(JournalUnavailable, match="0 of the 1 replicas"):
            await append
