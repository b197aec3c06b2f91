"""Redis tier: ``redis://[user:password@]host:port/db?prefix=cachesvc:`` (or ``rediss://``).

Each entry is one string, ``pack_versioned(version, payload)``, under ``prefix + key``, with
the tier's TTL as a PX expiry, so Redis expires entries by itself. Reads are one MGET per
batch. A write is a Lua script that compares the 16-hex-digit version header of the stored
value with the new one and only then SETs: Redis runs a script atomically, so concurrent
sidecars can never let an older version replace a newer one. A batch of writes is one
pipeline of EVALSHA calls.

Query options other than ``prefix`` are redis-py's own (``socket_timeout``,
``max_connections``, ...) and are passed on to it.

Driver exceptions, mapped once in ``_mapped_errors``::

    redis.TimeoutError, TimeoutError             -> TierTimeout
    redis.ConnectionError (refused, reset, auth), -> TierUnavailable
    other OSError
    any other redis.RedisError (WRONGTYPE, OOM)  -> TierError
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, cast
from urllib.parse import SplitResult

import redis.asyncio
import redis.exceptions
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tiers.base import (
    Marker,
    Tier,
    TierError,
    TierTimeout,
    TierUnavailable,
    TierWrite,
    driver_url,
    pack_versioned,
    unpack_payload,
    url_options,
)

_OWN_OPTIONS: dict[str, type] = {"prefix": str}
# What redis-py itself reads from a URL query; anything else is a typo, not a setting.
_DRIVER_OPTIONS: dict[str, type] = {
    **dict.fromkeys(URL_QUERY_ARGUMENT_PARSERS, str),
    **dict.fromkeys(
        ("client_name", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile"), str
    ),
}
_DEFAULT_PREFIX = "cachesvc:"
_MARKERS = "\x1fmarkers"  # after the prefix: a control character, so no entry's key

# KEYS: the entries. ARGV[2i-1], ARGV[2i]: KEYS[i]'s new versioned blob and its lifetime in
# milliseconds. One call stores a whole batch (one command for redis-py to pack and parse,
# instead of one per key); keys repeated in it are stored in order, so the highest version
# still wins. Versions are compared as their fixed-width hex headers, whose string order is
# their numeric order. A stored value without a version header (some other program's key)
# is replaced.
_CONDITIONAL_SET = b"""
for i, key in ipairs(KEYS) do
  local blob = ARGV[2 * i - 1]
  local current = redis.call('GET', key)
  local stored = current and string.match(current, '^%x+', 1)
  if not (stored and #stored >= 16 and string.sub(current, 1, 16) > string.sub(blob, 1, 16)) then
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
_KEYS_PER_CALL = 200
_CONDITIONAL_SET_SHA = hashlib.sha1(_CONDITIONAL_SET, usedforsecurity=False).hexdigest()

# The engine bounds every call with its own timeout, so the driver must neither wait long for
# a connection nor retry with backoff. One immediate retry on a connection error lets a pooled
# connection that a Redis restart closed be replaced transparently; replaying a MGET or the
# conditional SET is harmless.
_CONNECT_TIMEOUT = 1.0
_SOCKET_TIMEOUT = 5.0
_RETRY = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))


class RedisTier(Tier):
    schemes = ("redis", "rediss")
    keeps_markers = True

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        self.prefix: str = self._own_options(url).get("prefix", _DEFAULT_PREFIX)
        self._driver_url = driver_url(url, _OWN_OPTIONS)
        self._client: redis.asyncio.Redis | None = None

    @classmethod
    def validate_url(cls, url: SplitResult) -> None:
        cls._own_options(url)
        if not url.hostname:
            raise ValueError(f"{url.scheme}:// needs a host, e.g. {url.scheme}://127.0.0.1:6379/0")
        url.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        database = url.path.lstrip("/")
        if database and not (database.isascii() and database.isdigit()):
            raise ValueError(f"database {database!r} is not a number, e.g. /0")
        try:
            parse_url(driver_url(url, _OWN_OPTIONS))
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @staticmethod
    def _own_options(url: SplitResult) -> dict[str, Any]:
        options = url_options(url, {**_OWN_OPTIONS, **_DRIVER_OPTIONS})
        prefix = options.get("prefix", _DEFAULT_PREFIX)
        if any(ch.isspace() or not ch.isprintable() for ch in prefix):
            raise ValueError("option prefix must not contain whitespace or control characters")
        return {name: options[name] for name in _OWN_OPTIONS if name in options}

    async def start(self) -> None:
        # No I/O here: the pool connects on first use, so a Redis that is down does not stop
        # the sidecar from starting, and the tier works as soon as Redis is back.
        self._client = redis.asyncio.Redis.from_url(
            self._driver_url,
            decode_responses=False,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=_SOCKET_TIMEOUT,
            retry=_RETRY,
        )

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        client = self._started()
        with self._mapped_errors():
            stored = await client.mget([self.prefix + key for key in keys])
        # decode_responses=False: values arrive as bytes, never str.
        return [unpack_payload(cast(bytes | None, value)) for value in stored]

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        if not writes:
            return
        chunks = [writes[i : i + _KEYS_PER_CALL] for i in range(0, len(writes), _KEYS_PER_CALL)]
        with self._mapped_errors():
            results = await self._run_scripts(chunks)
            unknown = [c for c, r in zip(chunks, results, strict=True) if _no_script(r)]
            if unknown:
                await self._started().script_load(_CONDITIONAL_SET)
                results = [r for r in results if not _no_script(r)]
                results += await self._run_scripts(unknown)
            for result in results:
                if isinstance(result, Exception):
                    raise result

    async def ping(self) -> None:
        client = self._started()
        with self._mapped_errors():
            await client.ping()

    async def save_markers(self, markers: Sequence[Marker], ttl: float) -> None:
        if not markers:
            return
        with self._mapped_errors():
            await save_markers(self._started(), self.prefix + _MARKERS, markers, ttl)

    async def load_markers(self) -> list[Marker]:
        with self._mapped_errors():
            return await load_markers(self._started(), self.prefix + _MARKERS)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with self._mapped_errors():
                await client.aclose()

    async def _run_scripts(self, chunks: Sequence[Sequence[TierWrite]]) -> list[Any]:
        """One script call per chunk; what each answered or raised."""
        calls = [self._script_arguments(chunk) for chunk in chunks]
        client = self._started()
        if len(calls) == 1:  # the common case: redis-py's pipeline machinery costs more
            try:
                return [await client.evalsha(_CONDITIONAL_SET_SHA, len(chunks[0]), *calls[0])]
            except redis.exceptions.ResponseError as exc:
                return [exc]
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

    def _started(self) -> redis.asyncio.Redis:
        if self._client is None:
            raise TierError(f"redis tier {self.name!r} is not started")
        return self._client

    @contextlib.contextmanager
    def _mapped_errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.TimeoutError, TimeoutError) as exc:
            raise TierTimeout(f"redis tier {self.name!r}: {exc}") from exc
        except (redis.exceptions.ConnectionError, OSError) as exc:
            raise TierUnavailable(f"redis tier {self.name!r}: {exc}") from exc
        except redis.exceptions.RedisError as exc:
            raise TierError(f"redis tier {self.name!r}: {exc}") from exc


async def save_markers(
    client: redis.asyncio.Redis, key: str, markers: Sequence[Marker], ttl: float
) -> None:
    """Keep ``markers`` in the hash ``key`` (see ``_SAVE_MARKERS``)."""
    arguments: list[str | int] = []
    for name, version in markers:
        arguments += [name, f"{version:016x}"]
    arguments.append(max(1, math.ceil(ttl * 1000)))
    await client.eval(_SAVE_MARKERS, 1, key, *arguments)


async def load_markers(client: redis.asyncio.Redis, key: str) -> list[Marker]:
    """The markers kept in the hash ``key``."""
    stored = await client.hgetall(key)
    return [Marker(_text(name), int(_text(version), 16)) for name, version in stored.items()]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _no_script(result: object) -> bool:
    return isinstance(result, redis.exceptions.NoScriptError)
