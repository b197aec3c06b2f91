"""HTTP-level tests through the real app and its front door (aiohttp's test server with
the sidecar's runner, on a loopback port)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import BaseRunner, TestClient, TestServer

from cachesvc.app import create_app
from cachesvc.config import Settings
from cachesvc.front import FrontDoorRunner

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


class SidecarTestServer(TestServer):
    """aiohttp's test server, serving through the front door as ``cachesvc serve`` does."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return FrontDoorRunner(self.app, **kwargs)


def settings_for(*tier_urls: str, **sections: dict[str, Any]) -> Settings:
    """Settings with tiers l1..lN at ``tier_urls`` (ttl 300/3600/86400 as in SPEC §2)."""
    ttls = (300, 3600, 86400)
    tiers = [{"url": url, "ttl": ttls[min(position, 2)]} for position, url in enumerate(tier_urls)]
    return Settings.model_validate({"tiers": tiers, **sections} if tiers else sections)


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[TestClient[Any, Any]] = []

    async def make(settings: Settings | None = None) -> TestClient[Any, Any]:
        client = TestClient(SidecarTestServer(create_app(settings or Settings())))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        await client.close()


@pytest.fixture
async def three_tier(
    make_client: MakeClient, clean_redis_url: str, clean_memcached_url: str, clean_postgres_url: str
) -> TestClient[Any, Any]:
    return await make_client(settings_for(clean_redis_url, clean_memcached_url, clean_postgres_url))
