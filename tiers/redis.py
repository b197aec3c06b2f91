"""Redis tier: ``redis://[user:password@]host:port/db?prefix=cachesvc:`` (or ``rediss://``),
and ``redis-sentinel://s1:p1,s2:p2/<service name>[/<db>]?prefix=...`` for the master that
the Sentinels name, followed through a failover (see tiers/redis_clients.py).

A single server is spoken to by the lean pipelined client of tiers/resp.py, whose calls are
futures completed in the connection's read callback (``get_many_soon``: a read costs the
engine no task); Sentinel and Cluster URLs by redis-py, which follows failovers and slot
maps.

Each entry is one string, ``pack_versioned(version, payload)``, under ``prefix + key``, with
the tier's TTL as a PX expiry, so Redis expires entries by itself. Reads are one MGET per
batch. A write is a Lua script that compares the 16-hex-digit version header of the stored
value with the new one and only then SETs: Redis runs a script atomically, so concurrent
sidecars can never let an older version replace a newer one. A batch of writes is one
pipeline of EVALSHA calls.

``RedisTier`` is also the base of the Redis Cluster tier (tiers/redis_cluster.py), which
changes only how a batch is split into commands (``_read``, ``_script_calls``) and what
``ping`` asks; the script, the option parsing and the error mapping are this module's.

Query options other than ``prefix`` are the client's: tiers/resp.py names those of a
single server; Sentinel and Cluster URLs take redis-py's (tiers/redis_clients.py).

Driver exceptions, mapped once in ``mapped_errors``::

    redis.TimeoutError, TimeoutError              -> TierTimeout
    redis.ConnectionError (refused, reset, auth,  -> TierUnavailable
    no master found), other OSError, CLUSTERDOWN,
    no node reachable, a slot no node serves
    any other redis.RedisError (WRONGTYPE, OOM),  -> TierError
    any other RedisClusterException
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol, cast
from urllib.parse import SplitResult, parse_qsl

import redis.exceptions

from tiers.base import (
    Marker,
    Payload,
    Tier,
    TierError,
    TierTimeout,
    TierUnavailable,
    TierWrite,
    pack_versioned,
    unpack_payload,
)
from tiers.redis_clients import RedisClient, RedisTarget, create_client, parse_redis_url
from tiers.resp import OPTIONS, RespClient, check_cert_reqs

_OWN_OPTIONS = ("prefix",)
_DEFAULT_PREFIX = "cachesvc:"
_MARKERS = "\x1fmarkers"  # after the prefix: a control character, so no entry's key

# KEYS: the entries. ARGV[2i-1], ARGV[2i]: KEYS[i]'s new versioned blob and its lifetime in
# milliseconds. One call stores a whole batch (one command for redis-py to pack and parse,
# instead of one per key); keys repeated in it are stored in order, so the highest version
# still wins. Versions are compared as their fixed-width hex headers, whose string order is
# their numeric order: only the stored header is read (GETRANGE), never the whole value,
# which a GET would copy into Lua (3 ms per batch of 16 KiB values, against 10 us for an
# XADD of the same, measured). A stored value without a version header (some other
# program's key; "" when there is none) is replaced.
_CONDITIONAL_SET = b"""
for i, key in ipairs(KEYS) do
  local blob = ARGV[2 * i - 1]
  local header = redis.call('GETRANGE', key, 0, 15)
  local stored = string.match(header, '^%x+', 1)
  if not (stored and #stored >= 16 and header > string.sub(blob, 1, 16)) then
    redis.call('SET', key, blob, 'PX', ARGV[2 * i])
  end
end
return 0
"""
# KEYS[1]: the hash of markers. ARGV: name, 16-hex-digit version pairs, then the lifetime in
# milliseconds. A marker is kept unless its name is held at a higher version; the hash lives
# as long as its newest marker (a marker outlives nothing it could hide).
_SAVE_MARKERS = """
local last = #ARGV
for i = 1, last - 1, 2 do
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  if not held or held < ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[last])
return 0
"""
# Keys per script call: a script blocks Redis while it runs, so a huge batch is split.
KEYS_PER_CALL = 200
_CONDITIONAL_SET_SHA = hashlib.sha1(_CONDITIONAL_SET, usedforsecurity=False).hexdigest()


class RedisTier(Tier):
    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "redis-sentinel")
    keeps_markers = True

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        self.prefix = self._prefix(url)
        self._target = _target(url)
        self._client: RedisClient | RespClient | None = None

    @classmethod
    def validate_url(cls, url: SplitResult) -> None:
        cls._prefix(url)
        _target(url)

    @staticmethod
    def _prefix(url: SplitResult) -> str:
        prefix = dict(parse_qsl(url.query, keep_blank_values=True)).get("prefix", _DEFAULT_PREFIX)
        if any(ch.isspace() or not ch.isprintable() for ch in prefix):
            raise ValueError("option prefix must not contain whitespace or control characters")
        return prefix

    async def start(self) -> None:
        # No I/O here: the client connects on first use, so a Redis that is down does not
        # stop the sidecar from starting, and the tier works as soon as Redis is back.
        target = self._target
        if target.kind == "server":
            self._client = RespClient.for_server(target)
        else:
            self._client = create_client(target)

    def get_many_soon(self, keys: Sequence[str]) -> asyncio.Future[list[Payload | None]]:
        client = self._started()
        if not isinstance(client, RespClient):
            return super().get_many_soon(keys)
        prefix = self.prefix
        return client.command("MGET", *[prefix + key for key in keys], convert=_payloads)

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]:
        if not keys:
            return []
        client = self._started()
        if isinstance(client, RespClient):
            return await self.get_many_soon(keys)
        with self.mapped_errors():
            stored = await self._read(client, [self.prefix + key for key in keys])
        return _payloads(stored)

    def set_many_soon(self, writes: Sequence[TierWrite]) -> asyncio.Future[None]:
        client = self._started()
        if not isinstance(client, RespClient) or not 0 < len(writes) <= KEYS_PER_CALL:
            return super().set_many_soon(writes)
        return client.run_script(
            _CONDITIONAL_SET, _CONDITIONAL_SET_SHA, len(writes), *self._script_arguments(writes)
        )

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        if not writes:
            return
        client = self._started()
        chunks = self._script_calls(client, writes)
        with self.mapped_errors():
            if isinstance(client, RespClient):
                # Pipelined as they are made; a server without the script gets it from
                # the call itself (RespClient.run_script).
                results = await asyncio.gather(
                    *(self.set_many_soon(chunk) for chunk in chunks), return_exceptions=True
                )
            else:
                results = await self._run_scripts(client, chunks)
                unknown = [c for c, r in zip(chunks, results, strict=True) if _no_script(r)]
                if unknown:  # a new or restarted server (or a promoted replica)
                    await client.script_load(_CONDITIONAL_SET)
                    results = [r for r in results if not _no_script(r)]
                    results += await self._run_scripts(client, unknown)
            for result in results:
                if isinstance(result, Exception):
                    raise result

    async def ping(self) -> None:
        client = self._started()
        with self.mapped_errors():
            await client.ping()

    async def save_markers(self, markers: Sequence[Marker], ttl: float) -> None:
        if not markers:
            return
        with self.mapped_errors():
            await save_markers(self._started(), self.prefix + _MARKERS, markers, ttl)

    async def load_markers(self, newer_than: int = 0) -> list[Marker]:
        with self.mapped_errors():
            markers = await load_markers(self._started(), self.prefix + _MARKERS)
        return [marker for marker in markers if marker.version > newer_than]

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with self.mapped_errors():
                await client.aclose()

    # -- what a cluster does differently ---------------------------------------------------

    async def _read(self, client: RedisClient, keys: list[str]) -> list[Any]:
        """The stored values of ``keys``, in order."""
        return list(await client.mget(keys))

    def _script_calls(
        self, client: RedisClient | RespClient, writes: Sequence[TierWrite]
    ) -> list[Sequence[TierWrite]]:
        """``writes`` cut into the batches of one script call each."""
        return [writes[i : i + KEYS_PER_CALL] for i in range(0, len(writes), KEYS_PER_CALL)]

    # -- shared ----------------------------------------------------------------------------

    async def _run_scripts(
        self, client: RedisClient, chunks: Sequence[Sequence[TierWrite]]
    ) -> list[Any]:
        """One script call per chunk through redis-py; what each answered or raised."""
        calls = [self._script_arguments(chunk) for chunk in chunks]
        if len(calls) == 1:  # the common case: redis-py's pipeline machinery costs more
            try:
                return [await client.evalsha(_CONDITIONAL_SET_SHA, len(chunks[0]), *calls[0])]
            except redis.exceptions.ResponseError as exc:
                return [exc]
        # A cluster's pipeline sends each node its calls, to all nodes at once.
        pipe = client.pipeline(transaction=False)
        for chunk, arguments in zip(chunks, calls, strict=True):
            pipe.evalsha(_CONDITIONAL_SET_SHA, len(chunk), *arguments)
        return list(await pipe.execute(raise_on_error=False))

    def _script_arguments(self, chunk: Sequence[TierWrite]) -> list[bytes | str | int]:
        """KEYS, then ARGV, of the script call for ``chunk``."""
        arguments: list[bytes | str | int] = [self.prefix + write.key for write in chunk]
        for write in chunk:
            arguments.append(pack_versioned(write.version, write.payload))
            arguments.append(max(1, math.ceil(write.ttl * 1000)))
        return arguments

    def _started(self) -> RedisClient | RespClient:
        if self._client is None:
            raise TierError(f"redis tier {self.name!r} is not started")
        return self._client

    @contextlib.contextmanager
    def mapped_errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.TimeoutError, TimeoutError) as exc:
            raise TierTimeout(f"redis tier {self.name!r}: {exc}") from exc
        except (
            redis.exceptions.ConnectionError,
            OSError,
            # The cluster cannot serve the slot now: a master failed and no replica has
            # taken over yet, or no node answered the client's refresh of its slot map.
            redis.exceptions.ClusterDownError,
            redis.exceptions.RedisClusterUnreachableError,
            redis.exceptions.SlotNotCoveredError,
        ) as exc:
            raise TierUnavailable(f"redis tier {self.name!r}: {exc}") from exc
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise TierError(f"redis tier {self.name!r}: {exc}") from exc


class _MarkerCommands(Protocol):
    """What the markers need of a client: redis-py's, or tiers/resp.py's."""

    def eval(self, script: str, numkeys: int, *args: str | int) -> Any: ...

    def hgetall(self, key: str) -> Any: ...


async def save_markers(
    client: _MarkerCommands, key: str, markers: Sequence[Marker], ttl: float
) -> None:
    """Keep ``markers`` in the hash ``key`` (see ``_SAVE_MARKERS``)."""
    arguments: list[str | int] = []
    for name, version in markers:
        arguments += [name, f"{version:016x}"]
    arguments.append(max(1, math.ceil(ttl * 1000)))
    await client.eval(_SAVE_MARKERS, 1, key, *arguments)


async def load_markers(client: _MarkerCommands, key: str) -> list[Marker]:
    """The markers kept in the hash ``key``."""
    stored: dict[bytes | str, bytes | str] = await client.hgetall(key)
    return [Marker(_text(name), int(_text(version), 16)) for name, version in stored.items()]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _no_script(result: object) -> bool:
    return isinstance(result, redis.exceptions.NoScriptError)


def _payloads(stored: list[Any]) -> list[Payload | None]:
    # Values arrive as bytes (decode_responses=False; hiredis gives bytes), never str.
    return [unpack_payload(cast(bytes | None, value)) for value in stored]


def _target(url: SplitResult) -> RedisTarget:
    """The parsed URL; a single server takes tiers/resp.py's options only."""
    query = dict(parse_qsl(url.query))
    if "socket_timeout" in query and url.scheme.lower() in ("redis", "rediss"):
        raise ValueError(
            "option socket_timeout: a call waits as long as the tier's timeout "
            "setting lets it ([[tiers]] timeout)"
        )
    target = parse_redis_url(url.geturl(), _OWN_OPTIONS, server_options=OPTIONS)
    if target.kind == "server" and "ssl_cert_reqs" in query:
        check_cert_reqs(query["ssl_cert_reqs"])
    return target
