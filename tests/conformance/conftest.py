"""Fixtures of the tier conformance suite: one ``tier`` fixture for every backend.

Every test in ``test_tier_contract.py`` that takes ``tier`` runs once per backend (memory,
Redis, Redis Cluster, Redis behind Sentinel, Memcached with one node and with two,
Postgres), against the session servers of ``tests/conftest.py``. Tests do not share keys:
each gets its own namespace (``key``), so they never see each other's entries, whatever
server they run against and whatever an earlier run left there.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import SplitResult, urlencode, urlsplit

import pytest

from tests.servers import MemcachedServer, ServerError, free_port
from tiers.base import Tier
from tiers.registry import tier_class

# "memcached-ring": the session memcached plus a second node, keys spread over both.
# NETWORK_BACKENDS: those the TcpProxy can stand in front of (a cluster and Sentinel hand
# out their servers' own addresses, which no proxy sits in front of).
BACKENDS = (
    "memory",
    "redis",
    "redis-cluster",
    "redis-sentinel",
    "memcached",
    "memcached-ring",
    "postgres",
)
NETWORK_BACKENDS = ("redis", "memcached", "postgres")
_URL_FIXTURES = {
    "redis": "redis_url",
    "redis-cluster": "redis_cluster_url",
    "redis-sentinel": "redis_sentinel_url",
    "memcached": "memcached_url",
    "memcached-ring": "memcached_ring_url",
    "postgres": "postgres_url",
}
# A table of its own, so the suite never touches the data of a service using the default.
_OPTIONS = {"postgres": {"table": "cachesvc_conformance"}}
TIER_TTL = 30.0
_DEFAULT_PORTS = {"redis": 6379, "memcached": 11211, "postgres": 5432}

MakeTier = Callable[..., Awaitable[Tier]]


def backend_url(request: pytest.FixtureRequest, backend: str) -> SplitResult:
    """The session server's URL for ``backend`` (memory needs none)."""
    if backend == "memory":
        return urlsplit("memory://")
    url: str = request.getfixturevalue(_URL_FIXTURES[backend])
    return urlsplit(url)


def with_options(url: SplitResult, **options: object) -> SplitResult:
    query = "&".join(filter(None, [url.query, urlencode(options)]))
    return url._replace(query=query)


def with_port(url: SplitResult, port: int) -> SplitResult:
    """``url`` pointing at 127.0.0.1:``port``, user and the rest kept."""
    userinfo, at, _ = url.netloc.rpartition("@")
    return url._replace(netloc=f"{userinfo}{at}127.0.0.1:{port}")


@pytest.fixture(scope="session")
def memcached_ring_url(memcached_url: str) -> Iterator[str]:
    """``memcached_url`` with a second, private node added."""
    server = MemcachedServer()
    try:
        server.start()
    except ServerError as exc:
        server.close()
        pytest.skip(f"no second memcached node: {exc}")
    try:
        yield f"{memcached_url},{urlsplit(server.url).netloc}"
    finally:
        server.close()


@pytest.fixture
async def make_tier() -> AsyncIterator[MakeTier]:
    """Build, validate and start a tier for a URL; every tier built is closed afterwards."""
    built: list[Tier] = []

    async def make(url: SplitResult, name: str = "conformance") -> Tier:
        cls = tier_class(url.scheme)
        cls.validate_url(url)
        tier = cls(name, url, TIER_TTL)
        built.append(tier)
        await tier.start()
        return tier

    yield make
    for tier in reversed(built):
        await tier.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def tier_url(request: pytest.FixtureRequest, backend: str) -> SplitResult:
    return with_options(backend_url(request, backend), **_OPTIONS.get(backend, {}))


@pytest.fixture
async def tier(make_tier: MakeTier, tier_url: SplitResult, backend: str) -> Tier:
    return await make_tier(tier_url, name=f"conformance-{backend}")


@pytest.fixture
def key() -> Callable[[str], str]:
    """``key(name)``: a cache key unique to this test."""
    namespace = uuid.uuid4().hex[:12]
    return lambda name: f"t{namespace}:{name}"


class TcpProxy:
    """A loopback TCP proxy in front of a server, to cut, refuse and stall connections
    without touching the server (which may be a shared one given by environment variable).

    ``start()`` listens (always on the same port), ``stop()`` stops listening and resets
    (or, ``graceful``, closes) every proxied connection, ``stall()`` holds back everything
    the server sends until ``release()``. ``forwarded`` counts the bytes sent to the server.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.forwarded = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self, *, graceful: bool = False) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for transport in self._transports:
            if graceful:
                transport.close()  # FIN: the client reads EOF
            else:
                transport.abort()  # RST: the client gets ECONNRESET
        self._transports.clear()
        self._flowing.set()  # let the pipes see the aborted sockets and end
        if self._tasks:
            await asyncio.wait(self._tasks)

    def stall(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.transport.abort()
                return
            self._transports |= {writer.transport, up_writer.transport}
            await asyncio.gather(
                self._pipe(reader, up_writer, upstream=True),
                self._pipe(up_reader, writer, upstream=False),
            )
            for transport in (writer.transport, up_writer.transport):
                self._transports.discard(transport)
                transport.abort()
        finally:
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if upstream:
                    self.forwarded += len(data)
                else:
                    await self._flowing.wait()
                if writer.transport.is_closing():
                    return
                writer.write(data)
                await writer.drain()
        # One side closed: close the other, which ends the opposite pipe too.
        writer.transport.abort()


@pytest.fixture
async def proxy(request: pytest.FixtureRequest, backend: str) -> AsyncIterator[TcpProxy]:
    """A stopped ``TcpProxy`` in front of the backend's session server."""
    if backend == "memory":
        pytest.skip("the memory tier has no server")
    # The first node only, for a memcached URL that lists several.
    first = backend_url(request, backend).netloc.split(",")[0]
    url = urlsplit(f"//{first}")
    tcp_proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or _DEFAULT_PORTS[backend])
    yield tcp_proxy
    await tcp_proxy.stop()
