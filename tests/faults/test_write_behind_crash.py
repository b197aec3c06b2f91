"""Write-behind survives ``kill -9`` of the sidecar and a Postgres outage (SPEC §6)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from tests.polling import until
from tests.servers import PostgresServer
from tests.service.test_write_behind import _all_found
from tests.sidecar import Sidecar, tiers_config

pytestmark = pytest.mark.faults


def three_tier_config(redis_url: str, memcached_url: str, postgres_url: str) -> str:
    return tiers_config(redis_url, memcached_url, postgres_url) + "[write]\ndrain_timeout = 15\n"


async def put_all(base: str, keys: list[str], concurrency: int = 16) -> list[str]:
    """PUT each key write-behind; returns the keys answered 202 (the acknowledged ones)."""
    acked: list[str] = []
    queue = list(keys)

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            key = queue.pop()
            try:
                async with session.put(
                    f"{base}/v1/cache/{key}?strategy=write-behind", data=key.encode()
                ) as response:
                    if response.status == 202:
                        acked.append(key)
            except aiohttp.ClientError:
                return  # the sidecar died under us: this write was not acknowledged

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return acked


@pytest.fixture
def sidecar(
    clean_redis_url: str, clean_memcached_url: str, postgres_server: PostgresServer
) -> Iterator[Sidecar]:
    with Sidecar(
        three_tier_config(clean_redis_url, clean_memcached_url, postgres_server.url)
    ) as sidecar:
        yield sidecar


async def missing_in_l3(postgres_url: str, acked: list[str]) -> list[str]:
    """The acknowledged writes l3 does not hold (waiting up to 30 s for the flusher)."""
    found = await until(lambda: _all_found(postgres_url, acked), 30.0, "every acked write in l3")
    return [key for key in acked if found.get(key) != key.encode()]


async def test_acked_writes_survive_kill_9_during_an_outage(
    sidecar: Sidecar, postgres_server: PostgresServer
) -> None:
    await asyncio.to_thread(postgres_server.stop_immediate)
    acked = await put_all(sidecar.url, [f"k9-{n}" for n in range(300)])
    assert len(acked) == 300
    sidecar.kill()  # SIGKILL: no drain, no goodbye

    await asyncio.to_thread(postgres_server.start)
    sidecar.start()  # same port: the same journal consumer takes up its pending writes
    assert await missing_in_l3(postgres_server.url, acked) == []


async def test_acked_writes_survive_kill_9_under_load(
    sidecar: Sidecar, postgres_server: PostgresServer
) -> None:
    writing = asyncio.create_task(put_all(sidecar.url, [f"load-{n}" for n in range(3000)]))
    # put_all writes from the end of the list: the first write is load-2999.
    await until(lambda: _all_found(postgres_server.url, ["load-2999"]), 10.0, "the flusher at work")
    sidecar.kill()
    acked = await writing
    assert 0 < len(acked) < 3000, "the kill should land in the middle of the writes"

    sidecar.start()
    assert await missing_in_l3(postgres_server.url, acked) == []


async def test_sigterm_drains_the_journal_before_exit(
    sidecar: Sidecar, postgres_server: PostgresServer
) -> None:
    await asyncio.to_thread(postgres_server.stop_immediate)
    acked = await put_all(sidecar.url, [f"drain-{n}" for n in range(100)])
    assert len(acked) == 100
    await asyncio.to_thread(postgres_server.start)
    assert await asyncio.to_thread(sidecar.terminate) == 0
    # Checked once, right after exit: the drain happened before it, not after.
    assert await _all_found(postgres_server.url, acked) is not None
