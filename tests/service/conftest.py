"""HTTP-level tests through the real service: the front door on a free loopback port, as
``cachesvc serve`` listens (or aiohttp's server, for a settings with ``access_log``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from cachesvc.app import Service
from cachesvc.config import Settings


class Client:
    """An HTTP client of one running ``Service``: ``get``/``put``/``post``/``delete`` take
    paths, as aiohttp's ``ClientSession`` with a base URL does; ``server`` is the service
    (its ``app``, ``host``, ``port``)."""

    def __init__(self, server: Service, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.get = session.get
        self.put = session.put
        self.post = session.post
        self.delete = session.delete
        self.request = session.request

    async def close(self) -> None:
        """Stop the service (gracefully) and the session; harmless when done already."""
        if not self.session.closed:
            await self.session.close()
            await self.server.stop()

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port


MakeClient = Callable[..., Awaitable[Client]]


def settings_for(*tier_urls: str, **sections: dict[str, Any]) -> Settings:
    """Settings with tiers l1..lN at ``tier_urls`` (ttl 300/3600/86400, the README's)."""
    ttls = (300, 3600, 86400)
    tiers = [{"url": url, "ttl": ttls[min(position, 2)]} for position, url in enumerate(tier_urls)]
    server = {"port": 0, **sections.pop("server", {})}
    return Settings.model_validate(
        {"tiers": tiers, "server": server, **sections} if tiers else {"server": server, **sections}
    )


async def start_client(settings: Settings) -> Client:
    if settings.server.port != 0:
        settings = settings.model_copy(
            update={"server": settings.server.model_copy(update={"port": 0})}
        )
    service = Service(settings)
    await service.start()
    session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{service.port}")
    return Client(service, session)


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    clients: list[Client] = []

    async def make(settings: Settings | None = None) -> Client:
        client = await start_client(settings or Settings())
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        await client.close()


@pytest.fixture
async def three_tier(
    make_client: MakeClient, clean_redis_url: str, clean_memcached_url: str, clean_postgres_url: str
) -> Client:
    return await make_client(settings_for(clean_redis_url, clean_memcached_url, clean_postgres_url))
