"""What the fault tests share: the service test client, settings that detect a fault fast,
timed reads, and readiness polling.

Fault tests break real servers (SIGSTOP, SIGKILL, ``pg_ctl stop -m immediate``), so the
server a test breaks is always its own (``redis_server``, ``memcached_server``,
``postgres_server``); the tiers it leaves alone use the shared session servers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from cachesvc.config import Settings
from cachesvc.engine import Engine
from tests.polling import until
from tests.servers import MemcachedServer, PostgresServer
from tests.service.conftest import Client, MakeClient, make_client  # noqa: F401 - the fixture, re-exported
from tests.service.test_api import path

_TTLS = (300, 3600, 86400)
# Cache tiers: a hung server is noticed after 0.1 s, three failures open the breaker, and it
# lets a probe through after 0.5 s. The durable tier keeps its own timeout (a commit, or the
# first connect of a pool connection, takes longer than a cache round trip).
FAST_CACHE_TIER: dict[str, Any] = {"timeout": 0.1, "breaker_failures": 3, "breaker_reset": 0.5}
FAST_DURABLE_TIER: dict[str, Any] = {"breaker_failures": 3, "breaker_reset": 0.5}


def fault_settings(
    *urls: str,
    journal_url: str | None = None,
    volatile_journal: bool = False,
    **per_tier: dict[str, Any],
) -> Settings:
    """Tiers l1..lN at ``urls`` (ttl 300/3600/86400), with fast fault detection.

    ``per_tier`` overrides a tier's options by name (``l1={"timeout": None}`` restores the
    backend's default timeout). A short drain timeout keeps teardown quick when a test
    fails with a server still hung.
    """
    tiers = []
    for position, url in enumerate(urls):
        name = f"l{position + 1}"
        durable = position == len(urls) - 1 and url.startswith("postgres")
        options = {**(FAST_DURABLE_TIER if durable else FAST_CACHE_TIER), **per_tier.get(name, {})}
        tiers.append({"name": name, "url": url, "ttl": _TTLS[min(position, 2)], **options})
    # The journal gets its own database of the top tier's Redis (unless told otherwise), so
    # that a test flushing l1 (FLUSHDB of db 0) does not delete the journal's stream.
    if journal_url is None and urls[0].startswith("redis://"):
        journal_url = urlunsplit(urlsplit(urls[0])._replace(path="/1", query=""))
    write: dict[str, Any] = {"drain_timeout": 1, "volatile_journal": volatile_journal}
    if journal_url is not None:
        write["journal_url"] = journal_url
    return Settings.model_validate({"tiers": tiers, "write": write})


def engine_of(client: Client) -> Engine:
    return client.server.api.engine


@dataclass(frozen=True)
class Read:
    status: int
    tier: str | None
    body: bytes
    seconds: float


async def timed_get(client: Client, key: str) -> Read:
    started = time.perf_counter()
    async with client.get(path(key)) as response:
        body = await response.read()
    return Read(
        response.status, response.headers.get("X-Cache-Tier"), body, time.perf_counter() - started
    )


async def readiness(client: Client) -> tuple[int, dict[str, dict[str, Any]]]:
    """/readyz status and its tiers by name."""
    response = await client.get("/readyz")
    body = await response.json()
    return response.status, {tier["name"]: tier for tier in body["tiers"]}


async def until_ready(client: Client, within: float) -> dict[str, dict[str, Any]]:
    async def ready() -> dict[str, dict[str, Any]] | None:
        status, tiers = await readiness(client)
        return tiers if status == 200 else None

    return await until(ready, within, "/readyz answers 200")


async def until_not_ready(client: Client, tier: str, within: float) -> dict[str, Any]:
    """Poll /readyz until it answers 503 with ``tier`` in a state other than "up"."""

    async def reported() -> dict[str, Any] | None:
        status, tiers = await readiness(client)
        if status == 503 and tiers[tier]["state"] != "up":
            return tiers[tier]
        return None

    return await until(reported, within, f"/readyz answers 503 naming {tier} as not up")


async def until_repaired(client: Client, tier: str, within: float) -> None:
    """Poll /readyz until ``tier`` is up and has no missed keys left to delete."""

    async def repaired() -> bool:
        _, tiers = await readiness(client)
        return tiers[tier]["state"] == "up" and tiers[tier]["missed_keys"] == 0

    await until(repaired, within, f"{tier} up with its missed keys repaired")


class StatsPostgresServer(PostgresServer):
    """A private Postgres that counts executions per statement (pg_stat_statements)."""

    def _command(self) -> list[str]:
        return [*super()._command(), "-c", "shared_preload_libraries=pg_stat_statements"]


@pytest.fixture
async def sidecar(
    clean_redis_url: str,
    memcached_server: MemcachedServer,
    clean_postgres_url: str,
    make_client: MakeClient,  # noqa: F811 - the fixture imported above
) -> Client:
    """A three-tier sidecar whose l2 is the test's own memcached (``memcached_server``),
    to hang, kill and restart."""
    return await make_client(
        fault_settings(clean_redis_url, memcached_server.url, clean_postgres_url)
    )


@pytest.fixture
def stats_postgres_server() -> Iterator[StatsPostgresServer]:
    with StatsPostgresServer() as server:
        yield server
