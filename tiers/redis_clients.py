"""Every Redis client cachesvc opens comes from here: one place knows the URL schemes, the
timeouts and the retry policy.

URLs::

    redis://[user:password@]host:port[/db][?options]           one server
    rediss://...                                                the same over TLS
    redis-sentinel://[user:password@]s1:p1[,s2:p2...]/<service name>[/<db>][?options]
    redis-cluster://[user:password@]h1:p1[,h2:p2...][?options]

A Sentinel URL names the Sentinels and the service they watch; the client talks to the
master they name (redis-py's ``Sentinel.master_for``), asks them again whenever a
connection fails, and moves its connections as soon as they name another master
(``MasterFollowingPool``), so it follows a failover without a restart. The user and
password are the data servers'; the Sentinels are reached without, and answer within the
connect timeout. A cluster URL names some of the nodes;
the rest are discovered from them (``CLUSTER SLOTS``), and redis-py follows MOVED and ASK
redirects and refreshes its slot map after a failover.

Options are redis-py's connection options. ``redis://`` takes every one redis-py reads
from a URL; Sentinel and cluster URLs take those that mean the same on every connection
(``_SHARED_OPTIONS``); neither supports TLS here. Callers may consume options of their own
(a tier's ``prefix``): they name them in ``own_options`` and the client ignores them.

Timeouts and retries: callers bound every call with their own timeout, so the client must
neither wait long for a connection nor retry with backoff. One immediate retry on a
connection error lets a pooled connection that a server restart closed be replaced
transparently (replaying a read or a versioned conditional write is harmless); on a
cluster the retry also refreshes the slot map first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

__all__ = [
    "CONNECT_TIMEOUT",
    "SCHEMES",
    "SOCKET_TIMEOUT",
    "TOPOLOGY_REFRESH_INTERVAL",
    "RedisClient",
    "RedisTarget",
    "create_client",
    "hash_tag",
    "is_cluster_url",
    "parse_redis_url",
    "validate_redis_url",
]

RedisClient = redis.asyncio.Redis | RedisCluster

SCHEMES = ("redis", "rediss", "redis-sentinel", "redis-cluster")

CONNECT_TIMEOUT = 1.0
SOCKET_TIMEOUT = 5.0
TOPOLOGY_REFRESH_INTERVAL = 0.25
# redis-py's own default is no timeout at all: a caller that waits for pub/sub messages
# passes None on purpose, so "not given" needs its own marker.
_DEFAULT: Any = object()

# What redis-py reads from a redis:// URL; anything else is a typo, not a setting.
_SERVER_OPTIONS = frozenset(
    {
        *URL_QUERY_ARGUMENT_PARSERS,
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
    }
)
# Options with the same meaning on each connection of a Sentinel-managed pool and of every
# cluster node (RedisCluster takes neither ``db`` nor ``retry_on_timeout``).
_SHARED_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_read_size",
        "max_connections",
        "health_check_interval",
        "client_name",
    }
)
_EXAMPLES = {
    "redis": "redis://127.0.0.1:6379/0",
    "rediss": "rediss://127.0.0.1:6380/0",
    "redis-sentinel": "redis-sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0",
    "redis-cluster": "redis-cluster://10.0.0.1:7000,10.0.0.2:7000",
}


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: what to connect to and how."""

    url: str  # without the caller's own options
    kind: Literal["server", "sentinel", "cluster"]
    nodes: tuple[tuple[str, int], ...]  # the server, the Sentinels, or the seed nodes
    db: int = 0
    service: str | None = None  # the Sentinels' name for the master
    username: str | None = None
    password: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # redis-py keyword arguments


def hash_tag(name: str) -> str:
    """``name`` with a hash tag, so that all keys made from one tag share a cluster slot.

    The first ``:``-separated part becomes the tag: ``cachesvc:journal`` and
    ``cachesvc:missed`` both become ``{cachesvc}:...``, one slot, so a script or MULTI
    may use both. A name that already has a tag is returned as it is. Do not tag cache
    entries: their keys must spread over the masters.
    """
    start = name.find("{")
    if start != -1 and name.find("}", start + 1) > start + 1:
        return name  # Redis hashes what is between the first { and the first } after it
    tag, colon, rest = name.partition(":")
    return f"{{{tag}}}{colon}{rest}"


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() == "redis-cluster"


def validate_redis_url(url: str, own_options: Collection[str] = ()) -> None:
    """Raise ValueError, saying what is wrong, unless ``url`` can configure a client."""
    parse_redis_url(url, own_options)


def parse_redis_url(
    url: str, own_options: Collection[str] = (), server_options: frozenset[str] | None = None
) -> RedisTarget:
    """Parse and check ``url``; ``own_options`` are the caller's and are left out.
    ``server_options``: what a ``redis://`` URL may set, when the caller's client takes
    fewer than redis-py's."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        *others, last = (f"{known}://" for known in SCHEMES)
        raise ValueError(f"must be a {', '.join(others)} or {last} URL")
    query = [(name, value) for name, value in parse_qsl(parts.query) if name not in own_options]
    driver_url = urlunsplit(parts._replace(query=urlencode(query), fragment=""))
    if scheme in ("redis", "rediss"):
        return _server_target(driver_url, own_options, server_options or _SERVER_OPTIONS)
    options = _options(query, _SHARED_OPTIONS, own_options)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, secret = userinfo.partition(":")
    username, password = unquote(user) or None, unquote(secret) or None
    nodes = _nodes(scheme, hosts)
    segments = [unquote(segment) for segment in parts.path.split("/")[1:]]
    if scheme == "redis-cluster":
        if any(segments) and segments != ["0"]:
            raise ValueError("a Redis Cluster has only database 0: give no path")
        return RedisTarget(driver_url, "cluster", nodes, 0, None, username, password, options)
    if not segments or not segments[0]:
        raise ValueError(
            "redis-sentinel:// needs the service name of the master after the Sentinels, "
            f"e.g. {_EXAMPLES[scheme]}"
        )
    if len(segments) > 2 or (len(segments) == 2 and not _is_number(segments[1])):
        raise ValueError(
            f"only a database number may follow the service name {segments[0]!r}, e.g. /0"
        )
    db = int(segments[1]) if len(segments) == 2 else 0
    return RedisTarget(driver_url, "sentinel", nodes, db, segments[0], username, password, options)


def create_client(
    url: str | RedisTarget,
    *,
    own_options: Collection[str] = (),
    socket_timeout: float | None = _DEFAULT,
    connect_timeout: float = CONNECT_TIMEOUT,
    decode_responses: bool = False,
) -> RedisClient:
    """A redis-py asyncio client for ``url``; opens no connection yet.

    The client connects on first use, so a server that is down does not make this fail:
    the caller's first command does. Options in the URL win over the keyword arguments.
    ``socket_timeout=None`` waits for answers forever (a pub/sub reader waiting with its
    own timeout). Close it with ``aclose()``; for Sentinel that also closes the
    connections to the Sentinels.
    """
    target = url if isinstance(url, RedisTarget) else parse_redis_url(url, own_options)
    settings: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": SOCKET_TIMEOUT if socket_timeout is _DEFAULT else socket_timeout,
        "decode_responses": decode_responses,
    }
    if target.kind == "server":
        # The URL's own options (and its user, password and database) win over these.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        return redis.asyncio.Redis.from_url(target.url, retry=retry, **settings)
    settings |= {"username": target.username, "password": target.password, **target.options}
    if target.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            # Attempts after the first. On a cluster a retry also follows a timeout or a
            # CLUSTERDOWN, and it refreshes the slot map first.
            retry=Retry(NoBackoff(), 1),
            # How soon after a failover the client may read the new slot map (each call
            # that fails on a dead master asks for a refresh; they run at most this often).
            topology_refresh_min_interval=TOPOLOGY_REFRESH_INTERVAL,
            **settings,
        )
    assert target.service is not None
    sentinel = SerializedSentinel(
        target.nodes,
        # Not the data servers' credentials, and never an unbounded wait (a pub/sub
        # reader has no socket timeout): a Sentinel's answer is small and immediate.
        sentinel_kwargs={
            "socket_connect_timeout": connect_timeout,
            "socket_timeout": connect_timeout,
        },
        **settings,
    )
    client = sentinel.master_for(
        target.service,
        redis_class=SentinelMasterClient,
        connection_pool_class=MasterFollowingPool,
        db=target.db,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
    )
    return cast(SentinelMasterClient, client)


class SerializedSentinel(Sentinel):
    """redis-py's ``Sentinel``, asking the Sentinels one discovery at a time.

    ``discover_master`` moves the Sentinel that answered to the front of its list with a
    swap by index made after an ``await``: concurrent discoveries (every connection the
    pool opens makes one, so a burst of them after a failover) can write one Sentinel
    over another, which then is neither asked again nor closed (its connections leak).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._discovering = asyncio.Lock()

    async def discover_master(self, service_name: str) -> Any:
        async with self._discovering:
            return await super().discover_master(service_name)


class MasterFollowingPool(SentinelConnectionPool):
    """The connections to the master that the Sentinels name, moved when they name another.

    redis-py asks the Sentinels only when it opens a connection. After a ``SENTINEL
    FAILOVER`` the old master stays a master, with its clients connected, until Sentinel
    reconfigures it as a replica (on its next INFO, about 10 s later): pooled connections
    would go on reading and writing it, and those writes are lost when it resyncs from the
    new master; a pub/sub connection would hear nothing published on the new one. So the
    pool asks the Sentinels every ``check_interval`` seconds, in the background, and when
    they name another master it drops every connection, in use or not: each reconnects to
    the new master, and a command it interrupted fails with a connection error, which the
    retry policy retries once on a fresh connection.

    Whoever notices the new master first, the watch or a connection being opened, drops
    them all: redis-py drops only the idle ones, so a connection busy at that moment came
    back to the pool still on the old master, and stayed there. A connection that finished
    connecting to the old master after the change is reconnected when it is handed out.
    """

    check_interval = 1.0

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._watch: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        # Started here, not in __init__: the pool may be built outside an event loop.
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._follow_master())
        connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        try:
            while (connection.host, connection.port) != self.master_address:
                await connection.disconnect()
                await connection.connect()
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def get_master_address(self) -> Any:
        address = await self.sentinel_manager.discover_master(self.service_name)
        if address != self.master_address:
            self.master_address = address
            # A close that fails (times out) has let go of its socket all the same: the
            # discovery stands, and the connection asking goes on to the new master.
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self.disconnect(inuse_connections=True)
        return address

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await super().aclose()

    async def _follow_master(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self.get_master_address()
            except (redis.exceptions.RedisError, OSError):
                continue  # no Sentinel answers: the connections find out for themselves


class SentinelMasterClient(redis.asyncio.Redis):
    """The client of the master that the Sentinels name (``Sentinel.master_for``).

    Closing it also closes the connections to the Sentinels, which redis-py leaves to
    the ``Sentinel`` object, held by nothing else here.
    """

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            pool = self.connection_pool
            if isinstance(pool, SentinelConnectionPool):
                sentinels: Sentinel = pool.sentinel_manager
                await sentinels.aclose()


# -- parsing -----------------------------------------------------------------------------------


def _server_target(
    driver_url: str, own_options: Collection[str], allowed: frozenset[str]
) -> RedisTarget:
    parts = urlsplit(driver_url)
    scheme = parts.scheme.lower()
    _options(parse_qsl(parts.query), allowed, own_options)
    if not parts.hostname:
        raise ValueError(f"{scheme}:// needs a host, e.g. {_EXAMPLES[scheme]}")
    port = parts.port or 6379  # raises ValueError for a port that is not a number in range
    database = parts.path.lstrip("/")
    if database and not _is_number(database):
        raise ValueError(f"database {database!r} is not a number, e.g. /0")
    try:
        parsed = parse_url(driver_url)  # the driver's own checks of the option values
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return RedisTarget(
        driver_url,
        "server",
        ((parts.hostname, port),),
        db=int(parsed.get("db", 0)),
        username=parsed.get("username"),
        password=parsed.get("password"),
    )


def _options(
    query: list[tuple[str, str]], allowed: frozenset[str], own_options: Collection[str]
) -> dict[str, Any]:
    """Typed redis-py keyword arguments from a URL's query, by redis-py's own parsers."""
    for name, _ in query:
        if name not in allowed and name not in own_options:
            known = ", ".join(sorted({*allowed, *own_options}))
            raise ValueError(f"unknown option {name!r} (known: {known})")
    mine = [(name, value) for name, value in query if name not in own_options]
    try:
        parsed = parse_url("redis://localhost/?" + urlencode(mine))
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return {name: value for name, value in parsed.items() if name in allowed}


def _nodes(scheme: str, hosts: str) -> tuple[tuple[str, int], ...]:
    """``h1:p1,h2:p2`` (IPv6 in brackets) as (host, port) pairs."""
    what = "Sentinels" if scheme == "redis-sentinel" else "cluster nodes"
    if not hosts:
        raise ValueError(f"{scheme}:// needs a list of {what}, e.g. {_EXAMPLES[scheme]}")
    nodes: list[tuple[str, int]] = []
    for node in hosts.split(","):
        if node.startswith("["):
            host, _, rest = node[1:].partition("]")
            port = rest.removeprefix(":") if rest.startswith(":") else ""
        else:
            host, _, port = node.rpartition(":") if ":" in node else (node, "", "")
            if ":" in host:
                raise ValueError(f"node {node!r}: write an IPv6 address in brackets, [::1]:6379")
        if not host:
            raise ValueError(f"node {node!r} has no host; {what} are listed as host:port,...")
        if not port:
            raise ValueError(f"node {node!r} needs a port, e.g. {host}:6379")
        if not _is_number(port) or not 0 < int(port) < 65536:
            raise ValueError(f"node {node!r}: port {port!r} is not in 1-65535")
        if (host, int(port)) in nodes:
            raise ValueError(f"node {node!r} is listed twice")
        nodes.append((host, int(port)))
    return tuple(nodes)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()
