"""Write-behind (SPEC §3, §6; issue 3) against real Redis, Memcached and Postgres."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from cachesvc.envelope import decode_live
from tests.polling import until
from tests.servers import PostgresServer
from tests.service.conftest import Client, MakeClient, settings_for
from tests.service.test_api import assert_error, path
from tests.service.test_three_tiers import engine_of, served_by


async def tier_values(client: Client, key: str) -> list[bytes | None]:
    values = []
    for slot in engine_of(client).slots:
        entry = decode_live(await slot.tier.get(key), time.time())
        values.append(None if entry is None else entry.value)
    return values


async def journal_depth(redis_url: str) -> int:
    redis = Redis.from_url(redis_url)
    try:
        return int(await redis.xlen("cachesvc:journal"))
    finally:
        await redis.aclose()


async def l3_values(postgres_url: str, keys: list[str]) -> dict[str, bytes]:
    """What the durable tier holds for ``keys``, read straight from its table."""
    connection = await asyncpg.connect(postgres_url)
    try:
        rows = await connection.fetch(
            "SELECT key, payload FROM cachesvc_entries WHERE key = ANY($1) AND payload IS NOT NULL",
            keys,
        )
    finally:
        await connection.close()
    found = {}
    for row in rows:
        entry = decode_live(row["payload"], time.time())
        if entry is not None:
            found[row["key"]] = entry.value
    return found


async def test_write_behind_answers_202_reads_its_write_and_fills_lower_tiers(
    three_tier: Client,
) -> None:
    response = await three_tier.put(path("wb", "strategy=write-behind"), data=b"new")
    assert response.status == 202
    assert response.headers["ETag"]
    assert await served_by(three_tier, "wb") == ("l1", b"new")  # read-your-writes
    await until(lambda: _all_equal(three_tier, "wb", b"new"), 5.0, "the write reached l2 and l3")


async def _all_equal(client: Client, key: str, value: bytes) -> bool:
    return await tier_values(client, key) == [value, value, value]


async def test_rapid_writes_of_one_key_leave_the_last_in_every_tier(
    three_tier: Client, clean_redis_url: str
) -> None:
    for n in range(50):
        response = await three_tier.put(path("hot", "strategy=write-behind"), data=b"%d" % n)
        assert response.status == 202, await response.text()
    await until(lambda: _all_equal(three_tier, "hot", b"49"), 5.0, "the last write everywhere")
    await until(lambda: _is_zero(journal_depth(clean_redis_url)), 5.0, "an empty journal")


async def _is_zero(value: Any) -> bool:
    return await value == 0


async def test_interleaved_strategies_keep_the_latest_write(three_tier: Client) -> None:
    strategies = ["write-behind", "write-through", "cache-aside"] * 10
    for n, strategy in enumerate(strategies):
        response = await three_tier.put(path("mix", f"strategy={strategy}"), data=b"%d" % n)
        assert response.status in (202, 204)
    last = b"%d" % (len(strategies) - 1)  # a cache-aside write: only l3 holds it
    await until(lambda: _l3_is(three_tier, "mix", last), 5.0, "the last write in l3")
    assert await served_by(three_tier, "mix") == ("l3", last)
    assert await served_by(three_tier, "mix") == ("l1", last)
    # Nothing older may land later: wait for the journal to drain, then look again.
    await until(lambda: _flushed(three_tier), 5.0, "the journal drained")
    assert await tier_values(three_tier, "mix") == [last, last, last]


async def _l3_is(client: Client, key: str, value: bytes) -> bool:
    return (await tier_values(client, key))[2] == value


async def _flushed(client: Client) -> bool:
    journal = engine_of(client).journal
    assert journal is not None
    return not engine_of(client)._unflushed and journal.drained()


async def test_lag_at_idle_is_well_under_a_second(three_tier: Client) -> None:
    for n in range(20):
        await three_tier.put(path(f"lag{n}", "strategy=write-behind"), data=b"v")
    await until(lambda: _flushed(three_tier), 5.0, "the journal drained")
    metrics = await (await three_tier.get("/metrics")).text()
    lag = float(_metric(metrics, "cachesvc_journal_lag_seconds"))
    assert lag < 0.5
    assert float(_metric(metrics, "cachesvc_journal_flushed_total")) >= 20


def _metric(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return line.split()[1]
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
async def with_private_postgres(
    make_client: MakeClient,
    clean_redis_url: str,
    clean_memcached_url: str,
    postgres_server: PostgresServer,
) -> tuple[Client, PostgresServer]:
    settings = settings_for(
        clean_redis_url,
        clean_memcached_url,
        postgres_server.url,
        write={"journal_max_pending": 200},
    )
    return await make_client(settings), postgres_server


async def test_postgres_down_write_behind_202_write_through_503_nothing_lost(
    with_private_postgres: tuple[Client, PostgresServer],
) -> None:
    client, postgres = with_private_postgres
    assert (await client.put(path("before"), data=b"v")).status == 204
    await asyncio.to_thread(postgres.stop_immediate)

    acked = []
    for n in range(100):
        response = await client.put(path(f"out{n}", "strategy=write-behind"), data=b"%d" % n)
        assert response.status == 202, await response.text()
        acked.append(f"out{n}")
    body = await assert_error(await client.put(path("wt"), data=b"v"), 503)
    assert body["tier"] == "l3"
    body = await assert_error(await client.put(path("ca", "strategy=cache-aside"), data=b"v"), 503)
    assert body["tier"] == "l3"
    assert await served_by(client, "out7") == ("l1", b"7")

    await asyncio.to_thread(postgres.start)
    found = await until(lambda: _all_found(postgres.url, acked), 20.0, "every acked write in l3")
    assert found == {key: key[3:].encode() for key in acked}


async def _all_found(postgres_url: str, keys: list[str]) -> dict[str, bytes] | None:
    try:
        found = await l3_values(postgres_url, keys)
    except (OSError, asyncpg.PostgresError):
        return None
    return found if len(found) == len(keys) else None


async def test_full_journal_answers_503(
    make_client: MakeClient,
    clean_redis_url: str,
    clean_memcached_url: str,
    postgres_server: PostgresServer,
) -> None:
    client = await make_client(
        settings_for(
            clean_redis_url,
            clean_memcached_url,
            postgres_server.url,
            write={"journal_max_pending": 10},
        )
    )
    await asyncio.to_thread(postgres_server.stop_immediate)
    statuses = []
    for n in range(15):
        statuses.append(
            (await client.put(path(f"bp{n}", "strategy=write-behind"), data=b"v")).status
        )
    assert statuses[:10] == [202] * 10
    assert set(statuses[10:]) == {503}
    body = await assert_error(await client.put(path("x", "strategy=write-behind"), data=b"v"), 503)
    assert "full" in body["detail"]


async def test_undecodable_entries_are_dead_lettered(
    three_tier: Client, clean_redis_url: str
) -> None:
    redis = Redis.from_url(clean_redis_url)
    try:
        await three_tier.put(path("seed", "strategy=write-behind"), data=b"v")  # creates the group
        await redis.xadd("cachesvc:journal", {"k": "broken", "p": b"\xc1not msgpack"})
        await three_tier.put(path("after", "strategy=write-behind"), data=b"ok")
        await until(lambda: redis.xlen("cachesvc:journal:dead"), 5.0, "a dead letter")
        dead = await redis.xrange("cachesvc:journal:dead")
        assert len(dead) == 1
        fields = dead[0][1]
        assert fields[b"k"] == b"broken" and b"undecodable" in fields[b"reason"]
        # The bad entry did not block the good one behind it.
        await until(lambda: _all_equal(three_tier, "after", b"ok"), 5.0, "the next write applied")
    finally:
        await redis.aclose()
