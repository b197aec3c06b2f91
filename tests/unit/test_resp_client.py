"""The Redis tier's own client (tiers/resp.py) against a real redis-server: what it sets up
on each connection (AUTH, SELECT, CLIENT SETNAME), error replies in and out of a
pipeline, a call given up on a hung server, and the Redis tier reloading its script after
the server forgot it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis

from tests.servers import RedisServer
from tiers.base import TierUnavailable, TierWrite
from tiers.redis import RedisTier
from tiers.resp import ReplyError, RespClient

V = 1_700_000_000_000_000


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis("127.0.0.1", redis_server.port, socket_timeout=2) as client:
        yield client


def client_for(server: RedisServer, **options: object) -> RespClient:
    return RespClient("test", ("127.0.0.1", server.port), dict(options))


async def test_each_connection_is_authenticated_on_its_database_under_its_name(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    raw.config_set("requirepass", "s3cret")
    try:
        client = client_for(redis_server, password="s3cret", db=3, client_name="sidecar-7")
        await client.command("SET", "k", "in db 3")
        with redis.Redis("127.0.0.1", redis_server.port, password="s3cret", db=3) as db3:
            assert db3.get("k") == b"in db 3"
            assert "sidecar-7" in [c["name"] for c in db3.client_list()]
        await client.aclose()
    finally:
        with redis.Redis("127.0.0.1", redis_server.port, password="s3cret") as admin:
            admin.config_set("requirepass", "")


async def test_a_refused_password_is_unavailable_and_says_so(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    raw.config_set("requirepass", "s3cret")
    try:
        client = client_for(redis_server, password="wrong")
        with pytest.raises(TierUnavailable, match=r"WRONGPASS.*\(to AUTH\)"):
            await client.ping()
        await client.aclose()
    finally:
        with redis.Redis("127.0.0.1", redis_server.port, password="s3cret") as admin:
            admin.config_set("requirepass", "")


async def test_error_replies_fail_their_call_or_take_their_place_in_a_pipeline(
    redis_server: RedisServer,
) -> None:
    client = client_for(redis_server)
    await client.command("SET", "text", "not a hash")
    with pytest.raises(ReplyError, match="WRONGTYPE") as failed:
        await client.hgetall("text")
    assert failed.value.reply.startswith("WRONGTYPE")
    first, second, third = await client.pipeline(
        [("SET", "a", "1"), ("HGETALL", "text"), ("GET", "a")]
    )
    assert (first, third) == (b"OK", b"1")
    assert isinstance(second, ReplyError)
    assert await client.ping() == b"PONG"  # the connection goes on after error replies
    await client.aclose()


async def test_a_call_given_up_on_a_hung_server_does_not_hold_up_the_next(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    client = client_for(redis_server, max_connections=1)
    await client.command("SET", "k", "v")
    accepted = int(raw.info("stats")["total_connections_received"])
    redis_server.hang()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.command("GET", "k")
    finally:
        redis_server.resume()
    # Its connection was closed when the call was given up: the next call gets a fresh
    # one, and its own reply (not the late one of the call given up).
    assert await client.command("GET", "k") == b"v"
    assert int(raw.info("stats")["total_connections_received"]) > accepted
    await client.aclose()


async def test_the_tier_loads_its_script_again_once_the_server_forgot_it(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    tier = RedisTier("l1", urlsplit(redis_server.url), 60)
    await tier.start()
    try:
        await tier.set_many([TierWrite("k", b"one", V, 60)])
        raw.script_flush()
        await tier.set_many([TierWrite("k", b"two", V + 1, 60)])
        assert await tier.get_many(["k"]) == [b"two"]
    finally:
        await tier.close()


async def test_a_script_the_server_forgot_goes_once_as_eval_on_the_same_connection(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    """A write batch is one call completed from the read callback (``set_many_soon``, no
    task); a server without the script gets it as EVAL once, and EVALSHA serves again."""
    tier = RedisTier("l1", urlsplit(redis_server.url + "?max_connections=1"), 60)
    await tier.start()
    try:
        await tier.set_many_soon([TierWrite("k", b"one", V, 60)])
        raw.script_flush()
        accepted = int(raw.info("stats")["total_connections_received"])
        raw.config_resetstat()
        pipelined = [tier.set_many_soon([TierWrite("k", b"two", V + n, 60)]) for n in (1, 2)]
        assert await asyncio.gather(*pipelined) == [0, 0]
        assert await tier.get_many(["k"]) == [b"two"]
        await tier.set_many_soon([TierWrite("k", b"three", V + 3, 60)])
        assert await tier.get_many(["k"]) == [b"three"]
        stats = raw.info("commandstats")
        # Both pipelined calls were answered NOSCRIPT before the first EVAL loaded it.
        assert stats["cmdstat_eval"]["calls"] == 2
        assert stats["cmdstat_evalsha"]["calls"] == 3
        assert stats["cmdstat_evalsha"]["failed_calls"] == 2
        # Sent again where they were: the one connection of the pool stayed open.
        assert int(raw.info("stats")["total_connections_received"]) == 0 < accepted
    finally:
        await tier.close()


async def test_the_conditional_set_compares_headers_and_replaces_what_is_not_ours(
    redis_server: RedisServer, raw: redis.Redis
) -> None:
    """The script reads only a stored value's 16-character version header: another
    program's value under the key (no header, a short one, an empty one) is replaced, a
    newer version of ours is kept however large the values."""
    tier = RedisTier("l1", urlsplit(redis_server.url), 60)
    await tier.start()
    big = b"x" * 300_000
    try:
        for foreign in (b"hello", b"abc", b"0123456789abcde", b""):
            raw.set("cachesvc:foreign", foreign)
            await tier.set_many([TierWrite("foreign", b"ours", V, 60)])
            assert await tier.get_many(["foreign"]) == [b"ours"], foreign
        await tier.set_many([TierWrite("big", big, V + 5, 60)])
        await tier.set_many([TierWrite("big", b"older", V + 4, 60)])
        assert await tier.get_many(["big"]) == [big]
        await tier.set_many([TierWrite("big", big + b"!", V + 6, 60)])
        assert await tier.get_many(["big"]) == [big + b"!"]
    finally:
        await tier.close()
