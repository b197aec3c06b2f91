r"""Memcached tier: ``memcached://h1:p1[,h2:p2...][?prefix=cachesvc:&pool_size=4&gutter=h3:p3&gutter_ttl=10]``.

Keys are spread over the nodes by consistent hashing (a ketama-style ring), so adding or
removing a node moves only about 1/N of them. Each node is its own failure domain: the
tier exposes one ``Tier`` per node (``nodes()``, ``node_for()``), so that the engine can
give each its own timeout, circuit breaker and record of missed keys, and a node that fails
affects only the keys it holds. The tier's own ``get_many``/``set_many`` spread a batch over
its nodes (asked concurrently) and fail when any node fails.

``gutter=host:port`` names a spare memcached (``gutter()``): while a node is down, the
engine serves its keys from the gutter and fills them into it, each value living at most
``gutter_ttl`` seconds (default 10) there, however long the tier would keep it.

Each entry is ``pack_versioned(version, payload)``. A write reads the entry with its CAS
token (``gets``) and stores with ``add`` when it is missing or ``cas`` when its version is
not higher (a batch: one multi-get and one pipeline of stores per node); memcached refuses
the store when another writer got there first, and the write starts over. That keeps an
older version from replacing a newer one across sidecars without any lock.

Memcached's own rules stay here (https://github.com/memcached/memcached/blob/master/doc/protocol.txt):

- "the key must not include control characters or whitespace" and is at most 250 bytes:
  other cache keys are stored under a hash of the key (``_memcached_key``);
- an expiration time is whole seconds, 0 means "never expires", and one over 30 days
  (2592000 s) is read as an absolute unix time (``_exptime``). Memcached's clock ticks once
  a second, so an entry given N seconds lives between N-1 and N seconds;
- an item over the server's size limit (``-I``, 1 MiB by default) is refused with
  "SERVER_ERROR object too large for cache": a tombstone of its version is stored instead;
- a connection's commands are executed one after the other and answered in order: they
  are pipelined, each reply matched to the oldest command still waiting for one.

The client is tiers/pipelined.py's (a pool of pipelined connections, each call a future
completed from the connection's read callback, a call given up closing its connection, one
retry on a fresh connection), speaking the text protocol: each call parses its own reply
(``_Reply``). Its exceptions are all ``TierError``\s (see that module); an error answer
(e.g. "SERVER_ERROR out of memory") is a malformed reply there: the call fails and its
connection closes.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import SplitResult, urlsplit

from tiers.base import (
    Payload,
    Tier,
    TierError,
    TierWrite,
    pack_versioned,
    unpack_payload,
    unpack_version,
    url_options,
)
from tiers.pipelined import Address, BadReply, Call, Client, Connection

_OPTIONS: dict[str, type] = {"prefix": str, "pool_size": int, "gutter": str, "gutter_ttl": int}
_DEFAULT_PREFIX = "cachesvc:"
_DEFAULT_POOL_SIZE = 4
_DEFAULT_GUTTER_TTL = 10
_MAX_KEY_BYTES = 250
_MAX_RELATIVE_EXPTIME = 30 * 24 * 3600
_RING_POINTS_PER_NODE = 160
# Each lost race means another writer stored the key meanwhile, so a write only starts over
# while others keep winning; past this many rounds the caller gets an error to retry.
_MAX_CAS_ROUNDS = 10
# A memcached answers a connect in well under a millisecond; one that does not within a
# second is not reachable, and an attempt left to the kernel's SYN retries (minutes) would
# hold up the node's next connection long after the server is back.
_CONNECT_TIMEOUT = 1.0

_T = TypeVar("_T")


class MemcachedTier(Tier):
    schemes = ("memcached",)

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        self.addresses = _parse_nodes(url)
        options = _options(url, self.addresses)
        self.prefix: str = options.get("prefix", _DEFAULT_PREFIX)
        self.pool_size: int = options.get("pool_size", _DEFAULT_POOL_SIZE)
        self._ring = _Ring([_address_text(address) for address in self.addresses])
        self._nodes = [
            MemcachedNode(
                f"{name}/{_address_text(address)}", address, ttl, self.prefix, self.pool_size
            )
            for address in self.addresses
        ]
        self._gutter: MemcachedNode | None = None
        if "gutter" in options:
            self._gutter = MemcachedNode(
                f"{name}/gutter",
                _parse_address(options["gutter"]),
                float(options.get("gutter_ttl", _DEFAULT_GUTTER_TTL)),
                self.prefix,
                self.pool_size,
                cap_ttl=True,
            )

    @classmethod
    def validate_url(cls, url: SplitResult) -> None:
        _options(url, _parse_nodes(url))
        if url.path not in ("", "/"):
            raise ValueError(f"memcached:// takes no path (got {url.path!r})")

    # -- the nodes -------------------------------------------------------------------------

    def nodes(self) -> Sequence[MemcachedNode]:
        return self._nodes

    def node_for(self, key: str) -> int:
        return self._ring.node_for(_memcached_key(self.prefix, key))

    def gutter(self) -> MemcachedNode | None:
        return self._gutter

    # -- the whole tier: the same calls, spread over the nodes -----------------------------

    def get_many_soon(self, keys: Sequence[str]) -> asyncio.Future[list[Payload | None]]:
        if len(self._nodes) == 1:
            return self._nodes[0].get_many_soon(keys)
        return super().get_many_soon(keys)

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]:
        if len(self._nodes) == 1:
            return await self._nodes[0].get_many(keys)
        mkeys = [_memcached_key(self.prefix, key) for key in keys]
        by_node: dict[int, list[bytes]] = {}
        for mkey in dict.fromkeys(mkeys):
            by_node.setdefault(self._ring.node_for(mkey), []).append(mkey)
        found: dict[bytes, bytes] = {}
        for values in await _all(
            self._nodes[index].fetch(group) for index, group in by_node.items()
        ):
            found.update(values)
        return [unpack_payload(found.get(mkey)) for mkey in mkeys]

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        if len(self._nodes) == 1:
            await self._nodes[0].set_many(writes)
            return
        by_node: dict[int, list[TierWrite]] = {}
        for write in writes:
            by_node.setdefault(self.node_for(write.key), []).append(write)
        await _all(self._nodes[index].set_many(group) for index, group in by_node.items())

    async def ping(self) -> None:
        await _all(node.ping() for node in self._nodes)

    async def close(self) -> None:
        for node in self._nodes:
            await node.close()
        if self._gutter is not None:
            await self._gutter.close()


class MemcachedNode(Tier):
    """One memcached server of a ``MemcachedTier`` (one of its nodes, or its gutter), as a
    full tier of its own. Built by the tier, never from a URL.

    With ``cap_ttl`` (the gutter) no value lives longer than this node's ``ttl``, whatever
    the write asks; tombstones keep their lifetime, since they only ever hide data.
    """

    schemes = ()

    def __init__(
        self,
        name: str,
        address: Address,
        ttl: float,
        prefix: str,
        pool_size: int,
        *,
        cap_ttl: bool = False,
    ) -> None:
        super().__init__(name, urlsplit(f"memcached://{_address_text(address)}"), ttl)
        self.address = address
        self.prefix = prefix
        self._cap_ttl = cap_ttl
        self._client = Client(
            f"memcached tier {name!r} ({_address_text(address)})",
            address,
            pool_size,
            _Connection,
            connect_timeout=_CONNECT_TIMEOUT,
        )

    def get_many_soon(self, keys: Sequence[str]) -> asyncio.Future[list[Payload | None]]:
        mkeys = [_memcached_key(self.prefix, key) for key in keys]
        client = self._client
        request = b"get %s\r\n" % b" ".join(dict.fromkeys(mkeys))

        def payloads(found: _Found) -> list[Payload | None]:
            return [unpack_payload(found[0].get(mkey)) for mkey in mkeys]

        return client.submit(_Values(client.loop, request, payloads, with_cas=False))

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]:
        if not keys:
            return []
        return await self.get_many_soon(keys)

    async def fetch(self, mkeys: list[bytes]) -> dict[bytes, bytes]:
        """The stored blobs of those of ``mkeys`` (memcached keys, distinct) present."""
        client = self._client
        request = b"get %s\r\n" % b" ".join(mkeys)
        return await client.submit(_Values(client.loop, request, _values, with_cas=False))

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        # One write per key, the highest version (the last of equal ones) winning.
        latest: dict[bytes, TierWrite] = {}
        for write in writes:
            mkey = _memcached_key(self.prefix, write.key)
            if mkey not in latest or write.version >= latest[mkey].version:
                latest[mkey] = write
        pending = list(latest.items())
        for _ in range(_MAX_CAS_ROUNDS):
            if not pending:
                return
            pending = await self._store_round(pending)
        if pending:
            raise TierError(
                f"memcached tier {self.name!r}: {len(pending)} write(s) kept losing "
                f"races with other writers after {_MAX_CAS_ROUNDS} rounds"
            )

    async def ping(self) -> None:
        client = self._client
        await client.submit(_Lines(client.loop, b"version\r\n", 1, _version_answer))

    async def close(self) -> None:
        self._client.close()

    async def _store_round(
        self, items: list[tuple[bytes, TierWrite]]
    ) -> list[tuple[bytes, TierWrite]]:
        """One gets + add/cas pass over ``items``; returns those that lost a race."""
        client = self._client
        request = b"gets %s\r\n" % b" ".join(mkey for mkey, _ in items)
        values, tokens = await client.submit(_Values(client.loop, request, _found, with_cas=True))
        todo: list[tuple[bytes, TierWrite]] = []
        stores: list[_Store] = []
        for mkey, write in items:
            current = values.get(mkey)
            if current is not None and _stored_version(current) > write.version:
                continue  # a newer entry is there: nothing to do
            ttl = write.ttl
            if self._cap_ttl and write.payload is not None:
                ttl = min(ttl, self.ttl)
            token = None if current is None else tokens[mkey]
            todo.append((mkey, write))
            stores.append(_Store(mkey, pack_versioned(write.version, write.payload), ttl, token))
        answers = await self._store_many(stores)
        # Over memcached's item size limit (-I, 1 MiB by default): store a tombstone of that
        # version instead, so that the value it replaces is not served any more. The lower
        # tiers hold the new value.
        too_large = [i for i, answer in enumerate(answers) if answer is None]
        if too_large:
            retried = await self._store_many(
                [
                    stores[i]._replace(value=pack_versioned(todo[i][1].version, None))
                    for i in too_large
                ]
            )
            for i, answer in zip(too_large, retried, strict=True):
                answers[i] = bool(answer)
        return [item for item, stored in zip(todo, answers, strict=True) if not stored]

    async def _store_many(self, stores: list[_Store]) -> list[bool | None]:
        """Pipelined ``add``/``cas`` commands, sent in one write. Per command: True when
        stored, False when memcached refused it (another writer got there first), None when
        the item is too large for it."""
        if not stores:
            return []
        client = self._client
        request = b"".join(map(_store_command, stores))
        return await client.submit(_Lines(client.loop, request, len(stores), _store_answer))


class _Store(NamedTuple):
    key: bytes
    value: bytes
    ttl: float
    cas: int | None  # None: add (the key is missing); else cas with this token


def _store_command(store: _Store) -> bytes:
    exptime = _exptime(store.ttl)
    if store.cas is None:
        return b"add %s 0 %d %d\r\n%s\r\n" % (store.key, exptime, len(store.value), store.value)
    return b"cas %s 0 %d %d %d\r\n%s\r\n" % (
        store.key,
        exptime,
        len(store.value),
        store.cas,
        store.value,
    )


# -- the client: tiers/pipelined.py, with memcached's replies -------------------------------


class _Connection(Connection):
    """A connection to memcached: each call is the parser of its own reply (``_Reply``),
    fed the data as it comes."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        # An incomplete reply's bytes, kept until ``_need`` bytes are there to parse.
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._need = 0

    def data_received(self, data: bytes) -> None:
        if self._chunks:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered < self._need:
                return  # e.g. a large value still coming in: nothing to parse yet
            data = b"".join(self._chunks)
            self._chunks = []
        pending = cast(collections.deque[_Reply[Any]], self.pending)
        pos = 0
        try:
            while pending:
                reply = pending[0]
                pos = reply.feed(data, pos)
                if reply.need:
                    break
                pending.popleft()
            else:
                if pos < len(data):
                    raise BadReply(f"unexpected data {data[pos : pos + 80]!r}")
                self.replied()
                return
        except (BadReply, ValueError, IndexError) as exc:  # ValueError: int() of a non-number
            self.malformed(exc)
            return
        if pos < len(data):
            self._chunks = [data[pos:]]
            self._buffered = len(data) - pos
            self._need = reply.need


# -- replies ---------------------------------------------------------------------------------


class _Reply(Call[_T]):
    """A call that parses its own reply, fed the connection's data as it comes.

    ``feed(data, pos)`` consumes what it can of ``data[pos:]`` and returns the position
    after it; then ``need`` is 0 and the call has its result when the reply is complete,
    else how many bytes from that position it needs before it can go on.
    """

    __slots__ = ("need",)

    def restart(self) -> None:
        self.need = 0

    def feed(self, data: bytes, pos: int) -> int:
        raise NotImplementedError


_Found = tuple[dict[bytes, bytes], dict[bytes, int]]  # the values and CAS tokens by key


def _found(found: _Found) -> _Found:
    return found


def _values(found: _Found) -> dict[bytes, bytes]:
    return found[0]


class _Values(_Reply[_T]):
    """The reply to ``get``/``gets``: per value found ``VALUE <key> <flags> <bytes> [<cas>]``
    and its data on the next line, then ``END``; the call's result is ``convert`` of what
    was found."""

    __slots__ = ("fields", "tokens", "values")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: bytes,
        convert: Callable[[_Found], _T],
        *,
        with_cas: bool,
    ) -> None:
        super().__init__(loop, request, convert)
        self.fields = 5 if with_cas else 4  # of a VALUE line
        self.restart()

    def restart(self) -> None:
        super().restart()
        self.values: dict[bytes, bytes] = {}
        self.tokens: dict[bytes, int] = {}

    def feed(self, data: bytes, pos: int) -> int:
        # The hot loop of every read: locals, one split per line, no slicing to compare.
        values, find, size, fields = self.values, data.find, len(data), self.fields
        while True:
            eol = find(b"\r\n", pos)
            if eol < 0:
                self.need = size - pos + 1
                return pos
            line = data[pos:eol].split(b" ")
            if line[0] == b"VALUE" and len(line) == fields:
                start = eol + 2
                end = start + int(line[3])
                if end < start:
                    raise BadReply(f"negative length in {data[pos:eol][:300]!r}")
                if size < end + 2:
                    self.need = end + 2 - pos
                    return pos
                if data[end] != 13 or data[end + 1] != 10:
                    raise BadReply("value not followed by CRLF")
                values[line[1]] = data[start:end]
                if fields == 5:
                    self.tokens[line[1]] = int(line[4])
                pos = end + 2
            elif line == [b"END"]:
                self.need = 0
                self.finish((values, self.tokens))
                return eol + 2
            else:
                raise BadReply(f"answered {data[pos:eol][:300]!r}")


class _Lines(_Reply[list[_T]]):
    """``count`` one-line answers, each read by ``parse`` (which raises BadReply)."""

    __slots__ = ("answers", "count", "parse")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: bytes,
        count: int,
        parse: Callable[[bytes], _T],
    ) -> None:
        super().__init__(loop, request)
        self.count = count
        self.parse = parse
        self.restart()

    def restart(self) -> None:
        super().restart()
        self.answers: list[_T] = []

    def feed(self, data: bytes, pos: int) -> int:
        answers = self.answers
        while len(answers) < self.count:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                self.need = len(data) - pos + 1
                return pos
            answers.append(self.parse(data[pos:eol]))
            pos = eol + 2
        self.need = 0
        self.finish(answers)
        return pos


def _store_answer(line: bytes) -> bool | None:
    if line == b"STORED":
        return True
    if line in (b"NOT_STORED", b"EXISTS", b"NOT_FOUND"):
        return False  # another writer got there first
    if line.startswith(b"SERVER_ERROR object too large"):
        return None  # memcached skipped the data and goes on
    raise BadReply(f"answered {line[:300]!r}")


def _version_answer(line: bytes) -> bytes:
    if not line.startswith(b"VERSION "):
        raise BadReply(f"answered {line[:300]!r} to version")
    return line


# -- keys, expiry, the ring ------------------------------------------------------------------


def _memcached_key(prefix: str, key: str) -> bytes:
    """``prefix + key`` when memcached accepts it as is, else ``prefix + "#" + hash``.

    Plain keys never start with "#", so the two namespaces cannot collide.
    """
    plain = prefix + key
    if (
        key.isascii()
        and key.isprintable()
        and " " not in key
        and not key.startswith("#")
        and len(plain) <= _MAX_KEY_BYTES
    ):
        return plain.encode()
    digest = hashlib.blake2b(key.encode(), digest_size=20).hexdigest()
    return f"{prefix}#{digest}".encode()


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


# -- the URL ---------------------------------------------------------------------------------


def _options(url: SplitResult, nodes: list[Address]) -> dict[str, Any]:
    options = url_options(url, _OPTIONS)
    prefix = options.get("prefix", _DEFAULT_PREFIX)
    if not (prefix.isascii() and prefix.isprintable() and " " not in prefix):
        raise ValueError("option prefix must be printable ASCII without spaces")
    if len(prefix) > _MAX_KEY_BYTES - 41:  # room for "#" + a 40-hex-digit hash
        raise ValueError(f"option prefix is longer than {_MAX_KEY_BYTES - 41} characters")
    if options.get("pool_size", _DEFAULT_POOL_SIZE) <= 0:
        raise ValueError("option pool_size must be a positive integer")
    if "gutter" in options:
        try:
            gutter = _parse_address(options["gutter"])
        except ValueError as exc:
            raise ValueError(f"option gutter: {exc}") from None
        if gutter in nodes:
            raise ValueError(
                f"option gutter: {options['gutter']} is also a node of the ring; the gutter "
                "must be a server of its own"
            )
    elif "gutter_ttl" in options:
        raise ValueError("option gutter_ttl needs option gutter (the gutter node's host:port)")
    # Whole seconds, memcached's granularity: a value then lives at most gutter_ttl there.
    if not 0 < options.get("gutter_ttl", _DEFAULT_GUTTER_TTL) <= _MAX_RELATIVE_EXPTIME:
        raise ValueError(f"option gutter_ttl must be whole seconds in 1-{_MAX_RELATIVE_EXPTIME}")
    return options


def _parse_nodes(url: SplitResult) -> list[Address]:
    """``host:port`` pairs of ``memcached://h1:p1,h2:p2`` (IPv6 as ``[::1]:11211``)."""
    if not url.netloc:
        raise ValueError("memcached:// needs at least one node, e.g. memcached://127.0.0.1:11211")
    if "@" in url.netloc:
        raise ValueError("memcached:// takes no user or password")
    nodes = [_parse_address(node) for node in url.netloc.split(",")]
    if len(set(nodes)) != len(nodes):
        raise ValueError("memcached:// lists the same node twice")
    return nodes


def _parse_address(node: str) -> Address:
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
    return host, int(port)


def _address_text(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
