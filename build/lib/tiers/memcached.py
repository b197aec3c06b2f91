"""Memcached tier: ``memcached://host1:port1[,host2:port2...]?prefix=cachesvc:&pool_size=4``.

Keys are spread over the nodes by consistent hashing (a ketama-style ring), so adding or
removing a node moves only about 1/N of them. Each entry is ``pack_versioned(version,
payload)``. Reads are one multi-get per node, the nodes asked concurrently. A write reads the
entry with its CAS token (``gets``) and stores with ``add`` when it is missing or ``cas`` when
its version is not higher (a batch: one multi-get and one pipeline of stores per node);
memcached refuses the store when another writer got there first, and the write starts over.
That keeps an older version from replacing a newer one across sidecars without any lock.

Memcached's own rules stay here (https://github.com/memcached/memcached/blob/master/doc/protocol.txt):

- "the key must not include control characters or whitespace" and is at most 250 bytes:
  other cache keys are stored under a hash of the key (``_memcached_key``);
- an expiration time is whole seconds, 0 means "never expires", and one over 30 days
  (2592000 s) is read as an absolute unix time (``_exptime``). Memcached's clock ticks once
  a second, so an entry given N seconds lives between N-1 and N seconds;
- an item over the server's size limit (``-I``, 1 MiB by default) is refused with
  "SERVER_ERROR object too large for cache": a tombstone of its version is stored instead.

A node that does not answer fails the whole call, for reads as for writes: a write that
skipped a node would let that node serve the old value once it is back.

Driver exceptions, mapped once in ``_Node._connection``::

    TimeoutError                                      -> TierTimeout
    OSError, EOF mid-reply (server gone)              -> TierUnavailable (after one retry
                                                         on a fresh connection)
    aiomcache.ClientException, any other unexpected   -> TierError
    answer (e.g. "SERVER_ERROR out of memory")
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import SplitResult

import aiomcache
from aiomcache.pool import Connection

from tiers.base import (
    Tier,
    TierError,
    TierTimeout,
    TierUnavailable,
    TierWrite,
    pack_versioned,
    unpack_payload,
    unpack_version,
    url_options,
)

_OPTIONS: dict[str, type] = {"prefix": str, "pool_size": int}
_DEFAULT_PREFIX = "cachesvc:"
_DEFAULT_POOL_SIZE = 4
_MAX_KEY_BYTES = 250
_MAX_RELATIVE_EXPTIME = 30 * 24 * 3600
_RING_POINTS_PER_NODE = 160
# Each lost race means another writer stored the key meanwhile, so a write only starts over
# while others keep winning; past this many rounds the caller gets an error to retry.
_MAX_CAS_ROUNDS = 10

_T = TypeVar("_T")


class MemcachedTier(Tier):
    schemes = ("memcached",)

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        self.nodes = _parse_nodes(url)
        options = _options(url)
        self.prefix: str = options.get("prefix", _DEFAULT_PREFIX)
        self.pool_size: int = options.get("pool_size", _DEFAULT_POOL_SIZE)
        self._ring = _Ring([f"{host}:{port}" for host, port in self.nodes])
        self._clients: list[_Node] = []

    @classmethod
    def validate_url(cls, url: SplitResult) -> None:
        _parse_nodes(url)
        _options(url)
        if url.path not in ("", "/"):
            raise ValueError(f"memcached:// takes no path (got {url.path!r})")

    async def start(self) -> None:
        # aiomcache connects on first use: a memcached that is down does not stop the start.
        self._clients = [
            _Node(self.name, host, port, pool_size=self.pool_size) for host, port in self.nodes
        ]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        clients = self._started()
        mkeys = [self._memcached_key(key) for key in keys]
        by_node: dict[int, set[bytes]] = {}
        for mkey in mkeys:
            by_node.setdefault(self._ring.node_for(mkey), set()).add(mkey)
        found: dict[bytes, bytes] = {}
        for values, _ in await _all(
            clients[index].fetch(list(group)) for index, group in by_node.items()
        ):
            found.update(values)
        return [unpack_payload(found.get(mkey)) for mkey in mkeys]

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        clients = self._started()
        # One write per key, the highest version (the last of equal ones) winning.
        latest: dict[bytes, TierWrite] = {}
        for write in writes:
            mkey = self._memcached_key(write.key)
            if mkey not in latest or write.version >= latest[mkey].version:
                latest[mkey] = write
        pending = list(latest.items())
        for _ in range(_MAX_CAS_ROUNDS):
            if not pending:
                return
            by_node: dict[int, list[tuple[bytes, TierWrite]]] = {}
            for item in pending:
                by_node.setdefault(self._ring.node_for(item[0]), []).append(item)
            lost = await _all(
                self._store_round(clients[index], group) for index, group in by_node.items()
            )
            pending = [item for items in lost for item in items]
        if pending:
            raise TierError(
                f"memcached tier {self.name!r}: {len(pending)} write(s) kept losing "
                f"races with other writers after {_MAX_CAS_ROUNDS} rounds"
            )

    async def ping(self) -> None:
        await _all(client.ping() for client in self._started())

    async def close(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.close()

    async def _store_round(
        self, node: _Node, items: list[tuple[bytes, TierWrite]]
    ) -> list[tuple[bytes, TierWrite]]:
        """One gets + add/cas pass over ``items``; returns those that lost a race."""
        values, tokens = await node.fetch([mkey for mkey, _ in items])
        todo: list[tuple[bytes, TierWrite]] = []
        stores: list[_Store] = []
        for mkey, write in items:
            current = values.get(mkey)
            if current is not None and _stored_version(current) > write.version:
                continue  # a newer entry is there: nothing to do
            command, token = (b"add", None) if current is None else (b"cas", tokens[mkey])
            blob = pack_versioned(write.version, write.payload)
            todo.append((mkey, write))
            stores.append(_Store(command, mkey, blob, _exptime(write.ttl), token))
        answers = await node.store_many(stores)
        # Over memcached's item size limit (-I, 1 MiB by default): store a tombstone of that
        # version instead, so that the value it replaces is not served any more. The lower
        # tiers hold the new value.
        too_large = [i for i, answer in enumerate(answers) if answer is None]
        if too_large:
            retried = await node.store_many(
                [
                    stores[i]._replace(value=pack_versioned(todo[i][1].version, None))
                    for i in too_large
                ]
            )
            for i, answer in zip(too_large, retried, strict=True):
                answers[i] = bool(answer)
        return [item for item, stored in zip(todo, answers, strict=True) if not stored]

    def _memcached_key(self, key: str) -> bytes:
        """``prefix + key`` when memcached accepts it as is, else ``prefix + "#" + hash``.

        Plain keys never start with "#", so the two namespaces cannot collide.
        """
        plain = self.prefix + key
        if (
            key.isascii()
            and key.isprintable()
            and " " not in key
            and not key.startswith("#")
            and len(plain) <= _MAX_KEY_BYTES
        ):
            return plain.encode()
        digest = hashlib.blake2b(key.encode(), digest_size=20).hexdigest()
        return f"{self.prefix}#{digest}".encode()

    def _started(self) -> list[_Node]:
        if not self._clients:
            raise TierError(f"memcached tier {self.name!r} is not started")
        return self._clients


class _ConnectionLost(TierUnavailable):
    """The server closed or reset a connection in the middle of a command."""


class _Store(NamedTuple):
    command: bytes  # b"add" or b"cas"
    key: bytes
    value: bytes
    exptime: int
    cas: int | None


# What add/cas answer: stored, or refused because another writer was first.
_STORE_ANSWERS = (b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND")


class _Node(aiomcache.Client):
    """One memcached server: aiomcache's connection pool and multi-get parser, with the
    connection handling and the store commands done here.

    aiomcache 0.8's public commands are not used: their wrapper returns a connection to the
    pool after a cancellation (it only catches Exception), so the engine's per-call timeout
    would leave half a reply on the socket for the next command; its
    ``_execute_simple_command`` (behind set/add/cas/version) re-reads ``b""`` forever,
    blocking the event loop, once the server has closed the connection; and it sends one
    command per round trip, where a batch of stores is pipelined here.
    """

    def __init__(self, tier: str, host: str, port: int, *, pool_size: int) -> None:
        # aiomcache's pool only grows up to its minsize, so minsize is the concurrency.
        super().__init__(host, port, pool_size=pool_size, pool_minsize=pool_size)
        self.tier = tier
        self.address = f"{host}:{port}"

    async def fetch(self, keys: list[bytes]) -> tuple[dict[bytes, bytes], dict[bytes, int]]:
        """Values and CAS tokens of those ``keys`` that are present (keys must be distinct)."""

        async def gets(conn: Connection) -> tuple[dict[bytes, bytes], dict[bytes, int]]:
            return await self._multi_get(conn, *keys, with_cas=True)

        return await self._run(gets)

    async def store_many(self, stores: list[_Store]) -> list[bool | None]:
        """Pipelined ``add``/``cas`` commands: all sent at once, then the answers read in
        order (memcached answers a connection's commands in order). Per command: True when
        stored, False when memcached refused it (another writer got there first), None when
        the item is too large for it.
        """
        if not stores:
            return []

        async def pipeline(conn: Connection) -> list[bool | None]:
            answers: list[bool | None] = []
            commands = []
            for store in stores:
                line = b"%s %s 0 %d %d" % (
                    store.command,
                    store.key,
                    store.exptime,
                    len(store.value),
                )
                if store.cas is not None:
                    line += b" %d" % store.cas
                commands.append(b"%s\r\n%s\r\n" % (line, store.value))
            conn.writer.write(b"".join(commands))  # one send for the batch, not one per key
            await conn.writer.drain()
            for answer in await _read_lines(conn.reader, len(stores)):
                if answer in _STORE_ANSWERS:
                    answers.append(answer == b"STORED")
                elif answer.startswith(b"SERVER_ERROR object too large"):
                    answers.append(None)  # memcached skips the data and goes on
                else:
                    raise TierError(
                        f"memcached tier {self.tier!r} ({self.address}) answered {answer!r}"
                    )
            return answers

        return await self._run(pipeline)

    async def ping(self) -> None:
        async def version(conn: Connection) -> bytes:
            conn.writer.write(b"version\r\n")
            await conn.writer.drain()
            return await conn.reader.readuntil(b"\r\n")

        answer = await self._run(version)
        if not answer.startswith(b"VERSION"):
            raise TierError(f"memcached tier {self.tier!r}: {self.address} answered {answer!r}")

    async def _run(self, operation: Callable[[Connection], Awaitable[_T]]) -> _T:
        # A pooled connection the server closed (restart) fails once; a fresh one then works.
        # Replaying is harmless: a multi-get reads again, and a replayed add/cas is refused
        # or stores the same version again.
        try:
            async with self._connection() as conn:
                return await operation(conn)
        except _ConnectionLost:
            async with self._connection() as conn:
                return await operation(conn)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        where = f"memcached tier {self.tier!r} ({self.address})"
        try:
            conn = await self._pool.acquire()
        except TimeoutError as exc:
            raise TierTimeout(f"{where}: connect timed out") from exc
        except OSError as exc:
            raise TierUnavailable(f"{where}: {exc}") from exc
        try:
            yield conn
        except BaseException as exc:
            # Whatever interrupted the command, the connection may hold half a reply: mark
            # it broken so that the pool closes it instead of reusing it.
            conn.reader.set_exception(ConnectionAbortedError("interrupted mid-command"))
            if not isinstance(exc, Exception) or isinstance(exc, TierError):
                raise  # a cancellation (not the server's doing), or mapped already
            if isinstance(exc, TimeoutError):
                raise TierTimeout(f"{where}: {exc}") from exc
            if isinstance(exc, (OSError, EOFError)) or conn.reader.at_eof():
                raise _ConnectionLost(f"{where}: connection lost ({exc!r})") from exc
            # aiomcache.ClientException, or a reply it could not parse
            raise TierError(f"{where}: {exc!r}") from exc
        finally:
            self._pool.release(conn)


class _Ring:
    """Ketama-style consistent hashing: each node owns many points on a 32-bit circle and a
    key goes to the first point at or after its own hash."""

    def __init__(self, nodes: list[str]) -> None:
        points: list[tuple[int, int]] = []
        for index, node in enumerate(nodes):
            for replica in range(_RING_POINTS_PER_NODE // 4):
                digest = hashlib.md5(f"{node}-{replica}".encode(), usedforsecurity=False).digest()
                points += [
                    (int.from_bytes(digest[i : i + 4], "little"), index) for i in (0, 4, 8, 12)
                ]
        points.sort()
        self._hashes = [point for point, _ in points]
        self._owners = [owner for _, owner in points]
        self._single = len(nodes) == 1

    def node_for(self, key: bytes) -> int:
        if self._single:
            return 0
        point = int.from_bytes(hashlib.md5(key, usedforsecurity=False).digest()[:4], "little")
        return self._owners[bisect.bisect_left(self._hashes, point) % len(self._hashes)]


async def _all(aws: Iterable[Awaitable[_T]]) -> list[_T]:
    """Await all concurrently; then raise the first failure, if any.

    Unlike a plain gather, every call has finished before this returns or raises, so none is
    left running against a connection or a result nobody reads.
    """
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[_T], results)


async def _read_lines(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """The next ``count`` lines, without their CRLF: read in as few calls as the data comes
    in, not one per line. Only for answers that are all single lines (store commands)."""
    data = b""
    while data.count(b"\r\n") < count:
        chunk = await reader.read(65536)
        if not chunk:
            raise asyncio.IncompleteReadError(data, None)  # EOF: the connection is lost
        data += chunk
    return data.split(b"\r\n", count)[:count]


def _exptime(ttl: float) -> int:
    seconds = max(1, math.ceil(ttl))  # 0 would mean "never expires"
    if seconds > _MAX_RELATIVE_EXPTIME:
        return int(time.time()) + seconds  # memcached reads this as a unix time
    return seconds


def _stored_version(stored: bytes) -> int:
    try:
        return unpack_version(stored)
    except ValueError:  # not written by cachesvc: no version, so anything replaces it
        return -1


def _options(url: SplitResult) -> dict[str, Any]:
    options = url_options(url, _OPTIONS)
    prefix = options.get("prefix", _DEFAULT_PREFIX)
    if not (prefix.isascii() and prefix.isprintable() and " " not in prefix):
        raise ValueError("option prefix must be printable ASCII without spaces")
    if len(prefix) > _MAX_KEY_BYTES - 41:  # room for "#" + a 40-hex-digit hash
        raise ValueError(f"option prefix is longer than {_MAX_KEY_BYTES - 41} characters")
    if options.get("pool_size", _DEFAULT_POOL_SIZE) <= 0:
        raise ValueError("option pool_size must be a positive integer")
    return options


def _parse_nodes(url: SplitResult) -> list[tuple[str, int]]:
    """``host:port`` pairs of ``memcached://h1:p1,h2:p2`` (IPv6 as ``[::1]:11211``)."""
    if not url.netloc:
        raise ValueError("memcached:// needs at least one node, e.g. memcached://127.0.0.1:11211")
    if "@" in url.netloc:
        raise ValueError("memcached:// takes no user or password")
    nodes: list[tuple[str, int]] = []
    for node in url.netloc.split(","):
        host, sep, port = node.rpartition(":")
        if not sep or not port or node.endswith("]"):
            raise ValueError(f"memcached node {node!r} needs a port, e.g. {node or 'host'}:11211")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"memcached node {node!r}: put an IPv6 address in brackets, [::1]")
        host = host.removeprefix("[").removesuffix("]")
        if not host:
            raise ValueError(f"memcached node {node!r} has no host")
        if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"memcached node {node!r}: port {port!r} is not in 1-65535")
        nodes.append((host, int(port)))
    if len(set(nodes)) != len(nodes):
        raise ValueError("memcached:// lists the same node twice")
    return nodes
