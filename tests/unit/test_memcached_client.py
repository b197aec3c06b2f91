"""The memcached tier's client: replies parsed whatever way they are cut, malformed replies
refused and their connection dropped, cancelled calls leaving nothing behind, a bounded
number of connections, one retry on a fresh connection, and pipelining that never hands
one call another's answer.

Protocol faults come from a scripted server on a free loopback port (``ScriptedServer``);
pipelining is checked against the session's real memcached.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import pytest

from tests.polling import until
from tiers.base import TierError, TierUnavailable, TierWrite, pack_versioned
from tiers.memcached import MemcachedTier

V = 1_700_000_000_000_000
BLOB = pack_versioned(V, b"payload")

# (request line, connection number) -> what to do; called for every request.
Script = Callable[[bytes, int, asyncio.StreamWriter], Awaitable[None]]


class ScriptedServer:
    """A loopback server that reads memcached request lines (and the data block of a store)
    and lets ``script`` answer each. Connections are numbered from 1 as they are accepted;
    ``ended`` holds those that are over (closed by either side)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.opened = 0
        self.ended: set[int] = set()
        self.requests: list[tuple[int, bytes]] = []
        self.writers: dict[int, asyncio.StreamWriter] = {}
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        for writer in self.writers.values():
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        number = self.opened
        self.writers[number] = writer
        try:
            while line := await reader.readline():
                words = line.split()
                if words and words[0] in (b"add", b"cas", b"set"):
                    await reader.readexactly(int(words[4]) + 2)
                self.requests.append((number, line))
                await self.script(line, number, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.ended.add(number)
            writer.transport.abort()

    async def until_ended(self, number: int) -> None:
        async def ended() -> bool:
            return number in self.ended

        await until(ended, 5, f"connection {number} closed")


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[ScriptedServer]]]:
    servers: list[ScriptedServer] = []

    async def start(script: Script) -> ScriptedServer:
        server = ScriptedServer(script)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def make_tier() -> AsyncIterator[Callable[..., Awaitable[MemcachedTier]]]:
    built: list[MemcachedTier] = []

    async def make(netloc: str, query: str = "") -> MemcachedTier:
        tier = MemcachedTier("t", urlsplit(f"memcached://{netloc}?{query}"), 30)
        await tier.start()
        built.append(tier)
        return tier

    yield make
    for tier in built:
        await tier.close()


def value_reply(key: bytes, blob: bytes) -> bytes:
    return b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(blob), blob)


async def answer_values(line: bytes, number: int, writer: asyncio.StreamWriter) -> None:
    """A well-behaved server holding BLOB under every key."""
    words = line.split()
    if words[0] == b"get":
        writer.write(b"".join(value_reply(key, BLOB)[:-5] for key in words[1:]) + b"END\r\n")
    elif words[0] == b"version":
        writer.write(b"VERSION 1.6.0\r\n")


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 3, 7, 64])
async def test_a_reply_cut_anywhere_parses_the_same(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
    piece: int,
) -> None:
    # Values that look like protocol lines, sent in pieces of `piece` bytes each.
    tricky = pack_versioned(V, b"VALUE x 0 5\r\nEND\r\n\r\n")
    reply = (
        value_reply(b"cachesvc:a", tricky)[:-5]
        + value_reply(b"cachesvc:b", pack_versioned(V, b"b" * 300))[:-5]
        + b"END\r\n"
    )

    async def dribble(line: bytes, number: int, writer: asyncio.StreamWriter) -> None:
        for start in range(0, len(reply), piece):
            writer.write(reply[start : start + piece])
            await writer.drain()
            await asyncio.sleep(0)  # let the client read each piece on its own

    server = await scripted(dribble)
    tier = await make_tier(f"127.0.0.1:{server.port}")
    assert await tier.get_many(["a", "b", "missing"]) == [
        b"VALUE x 0 5\r\nEND\r\n\r\n",
        b"b" * 300,
        None,
    ]


@pytest.mark.parametrize(
    "garbage",
    [
        b"HELLO\r\n",
        b"VALUE cachesvc:k 0 abc\r\nxx\r\nEND\r\n",  # length not a number
        b"VALUE cachesvc:k 0 2\r\nxxx\r\nEND\r\n",  # data longer than announced
        b"VALUE cachesvc:k 0\r\n",  # a field missing
        b"SERVER_ERROR out of memory writing get response\r\n",
        b"CLIENT_ERROR bad command line format\r\n",
    ],
    ids=["unknown", "length", "overrun", "fields", "server-error", "client-error"],
)
async def test_malformed_reply_is_a_tier_error_and_drops_the_connection(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
    garbage: bytes,
) -> None:
    async def garbage_first(line: bytes, number: int, writer: asyncio.StreamWriter) -> None:
        if number == 1:
            writer.write(garbage)
        else:
            await answer_values(line, number, writer)

    server = await scripted(garbage_first)
    tier = await make_tier(f"127.0.0.1:{server.port}")
    with pytest.raises(TierError) as error:
        await tier.get_many(["k"])
    assert not isinstance(error.value, TierUnavailable)  # the server answered: not an outage
    assert "malformed reply" in str(error.value)
    await server.until_ended(1)
    assert await tier.get_many(["k"]) == [b"payload"]
    assert server.opened == 2


@pytest.mark.parametrize(
    ("call", "garbage"),
    [
        ("set_many", b"MAYBE\r\n"),
        ("set_many", b"SERVER_ERROR out of memory\r\n"),
        ("ping", b"OK\r\n"),
    ],
    ids=["store-unknown", "store-server-error", "version"],
)
async def test_malformed_one_line_answers_are_tier_errors(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
    call: str,
    garbage: bytes,
) -> None:
    async def script(line: bytes, number: int, writer: asyncio.StreamWriter) -> None:
        if line.startswith(b"gets "):
            writer.write(b"END\r\n")  # nothing stored: the write is an add
        else:
            writer.write(garbage)

    server = await scripted(script)
    tier = await make_tier(f"127.0.0.1:{server.port}")
    calls = {"set_many": lambda: tier.set_many([TierWrite("k", b"v", V, 30)]), "ping": tier.ping}
    with pytest.raises(TierError) as error:
        await calls[call]()
    assert not isinstance(error.value, TierUnavailable)
    await server.until_ended(1)


async def test_unsolicited_data_drops_the_connection(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
) -> None:
    async def chatty(line: bytes, number: int, writer: asyncio.StreamWriter) -> None:
        await answer_values(line, number, writer)
        if number == 1:
            writer.write(b"END\r\n")  # an answer to nothing that was asked

    server = await scripted(chatty)
    tier = await make_tier(f"127.0.0.1:{server.port}")
    assert await tier.get_many(["k"]) == [b"payload"]
    await server.until_ended(1)
    assert await tier.get_many(["k"]) == [b"payload"]
    assert server.opened == 2


# -- cancellation, retries, the pool ---------------------------------------------------------


async def test_cancelled_call_leaves_no_half_reply(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
) -> None:
    rest = asyncio.Event()

    async def stall_half_way(line: bytes, number: int, writer: asyncio.StreamWriter) -> None:
        if number == 1:
            reply = value_reply(b"cachesvc:a", pack_versioned(V, b"from the first call"))
            writer.write(reply[:20])
            await rest.wait()
            writer.write(reply[20:])
        else:
            await answer_values(line, number, writer)

    server = await scripted(stall_half_way)
    tier = await make_tier(f"127.0.0.1:{server.port}", "pool_size=1")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await tier.get_many(["a"])
    rest.set()
    await server.until_ended(1)
    assert await tier.get_many(["a"]) == [b"payload"]
    assert server.opened == 2


async def test_calls_pipelined_behind_a_cancelled_one_are_retried_on_a_fresh_connection(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
) -> None:
    async def first_connection_stalls(
        line: bytes, number: int, writer: asyncio.StreamWriter
    ) -> None:
        if number > 1:
            await answer_values(line, number, writer)

    server = await scripted(first_connection_stalls)
    tier = await make_tier(f"127.0.0.1:{server.port}", "pool_size=1")

    async def cancelled() -> None:
        async with asyncio.timeout(0.2):
            await tier.get_many(["a"])

    first = asyncio.ensure_future(cancelled())
    await until(lambda: _true(len(server.requests) == 1), 5, "the first get is out")
    second = asyncio.ensure_future(tier.get_many(["b"]))  # pipelined on the same connection
    await until(lambda: _true(len(server.requests) == 2), 5, "the second get is out")
    with pytest.raises(TimeoutError):
        await first
    assert await second == [b"payload"]
    assert [number for number, _ in server.requests] == [1, 1, 2]


async def test_connection_lost_mid_call_is_retried_once_on_a_fresh_connection(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
) -> None:
    async def first_connection_drops(
        line: bytes, number: int, writer: asyncio.StreamWriter
    ) -> None:
        if number == 1:
            writer.transport.abort()
        else:
            await answer_values(line, number, writer)

    server = await scripted(first_connection_drops)
    tier = await make_tier(f"127.0.0.1:{server.port}")
    assert await tier.get_many(["k"]) == [b"payload"]
    assert server.opened == 2


async def test_connection_lost_twice_is_tier_unavailable(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
) -> None:
    async def always_drops(line: bytes, number: int, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server = await scripted(always_drops)
    tier = await make_tier(f"127.0.0.1:{server.port}")
    with pytest.raises(TierUnavailable, match="connection lost"):
        await tier.get_many(["k"])
    assert server.opened == 2  # one retry, not a loop


async def busy_pool(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
    pool_size: int,
) -> tuple[ScriptedServer, MemcachedTier, asyncio.Event, list[asyncio.Future[list[bytes | None]]]]:
    """A tier whose ``pool_size`` connections are all open, with calls waiting on each: the
    server holds every answer until the returned event is set."""
    gate = asyncio.Event()

    async def gated(line: bytes, number: int, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        await answer_values(line, number, writer)

    server = await scripted(gated)
    tier = await make_tier(f"127.0.0.1:{server.port}", f"pool_size={pool_size}")
    # A call that finds every connection busy opens another, while the pool has room.
    calls: list[asyncio.Future[list[bytes | None]]] = []
    deadline = asyncio.get_running_loop().time() + 5
    while server.opened < pool_size:
        assert asyncio.get_running_loop().time() < deadline, f"{server.opened} connections"
        calls.append(asyncio.ensure_future(tier.get_many(["k"])))
        await asyncio.sleep(0.001)
    return server, tier, gate, calls


async def test_connections_per_node_are_bounded_by_pool_size(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
) -> None:
    server, tier, gate, calls = await busy_pool(scripted, make_tier, 3)
    calls += [asyncio.ensure_future(tier.get_many(["k"])) for _ in range(20)]
    await asyncio.sleep(0.05)  # time for a connection over the bound to be opened
    gate.set()
    assert await asyncio.gather(*calls) == [[b"payload"]] * len(calls)
    assert server.opened == 3


async def test_a_connection_closed_by_the_server_retires_the_older_ones(
    scripted: Callable[[Script], Awaitable[ScriptedServer]],
    make_tier: Callable[..., Awaitable[MemcachedTier]],
) -> None:
    # A restarted server closed every connection; the one noticed first must not leave the
    # others to fail the next calls one by one.
    server, tier, gate, calls = await busy_pool(scripted, make_tier, 2)
    gate.set()
    assert await asyncio.gather(*calls) == [[b"payload"]] * len(calls)
    server.writers[1].close()  # connection 2 stays open on the server's side
    await server.until_ended(2)  # idle, retired: closed by the client
    assert await tier.get_many(["k"]) == [b"payload"]
    assert server.requests[-1][0] == 3  # on a fresh connection


# -- pipelining against a real memcached -----------------------------------------------------


@pytest.mark.parametrize("pool_size", [1, 3])
async def test_concurrent_calls_each_get_their_own_answer(
    memcached_url: str, make_tier: Callable[..., Awaitable[MemcachedTier]], pool_size: int
) -> None:
    tier = await make_tier(urlsplit(memcached_url).netloc, f"pool_size={pool_size}")
    namespace = uuid.uuid4().hex[:8]
    keys = [f"{namespace}:{n}" for n in range(40)]
    rng = random.Random(5)
    written: dict[str, int] = {}

    def payload(key: str, version: int) -> bytes:
        return f"{key}={version}".encode() * (1 + len(key) % 7)  # sizes differ per key

    async def writer(round_: int) -> None:
        # Overlapping batches, each key in at most 6 of them: a write that lost a race to
        # every other writer of its key still lands within the tier's 10 rounds.
        batch = [keys[(round_ // 10 + step * 7) % len(keys)] for step in range(6)]
        version = V + round_
        await tier.set_many([TierWrite(k, payload(k, version), version, 30) for k in batch])
        for k in batch:
            written[k] = max(written.get(k, 0), version)

    async def reader() -> None:
        batch = rng.sample(keys, rng.randint(1, 15))
        for key, got in zip(batch, await tier.get_many(batch), strict=True):
            if got is not None:
                assert got.startswith(f"{key}=".encode()), (key, got[:40])

    await asyncio.gather(*(writer(n) if n % 10 == 0 else reader() for n in range(400)))
    final = await tier.get_many(list(written))
    assert final == [payload(k, v) for k, v in written.items()]


async def _true(value: bool) -> bool:
    return value
