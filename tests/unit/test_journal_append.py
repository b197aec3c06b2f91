"""The journal's appends against a real redis-server: appends made together get their own
entry ids, in order; an append to a hung server fails at the journal's deadline; the next
one works on a fresh connection once the server answers."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from cachesvc import journal as journal_module
from cachesvc.envelope import Entry
from cachesvc.journal import JournalUnavailable
from tests.journals import make_journal
from tests.servers import RedisServer


def payload(value: bytes) -> bytes:
    return Entry(value, "text/plain", 1, None, ()).encode()


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
