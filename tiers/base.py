"""The contract every cache tier implements.

A tier stores opaque payloads (the engine's encoded envelopes) under string keys, and hands
them out as bytes or as a view of the reply they arrived in (``Payload``: a large value is
not copied to drop what the tier stored beside it). The contract is batch-first: the
engine coalesces concurrent requests into one call per tier, so ``get_many``/``set_many``
are the primitives and a tier maps them onto its server's multi-key commands (MGET,
multi-get, ``= ANY($1)``).

Every write carries a *version*. A tier never replaces a stored entry (value or tombstone)
with one of a lower version, atomically on its server; that is what keeps a later
acknowledged write from being overwritten by an earlier one, whatever the order in which
writes, promotions and write-behind flushes arrive. A delete is a write of a *tombstone*:
a version with no payload that lives for a short time so that a fill racing the delete
loses.

A tier made of servers that fail independently (memcached's ring) exposes them: ``nodes()``
gives one full ``Tier`` per server, ``node_for(key)`` the one that holds a key, and
``gutter()`` an optional spare server for the keys of a node that is down. The engine can
then guard each node on its own (timeout, circuit breaker, missed keys), so that a node
that fails costs only the keys it holds. A tier that is one failure domain returns ``()``
and ``None`` (the defaults), and the engine uses it whole.

Exceptions (drivers' own exceptions never leave a tier)::

    TierError                 the tier could not do what was asked
    ├── TierUnavailable       connection refused/reset, server gone
    └── TierTimeout           the server did not answer in time
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple, TypeAlias
from urllib.parse import SplitResult, parse_qsl, urlencode, urlunsplit


class TierError(Exception):
    """A tier failed to serve a request."""


class TierUnavailable(TierError):
    """The tier's server cannot be reached."""


class TierTimeout(TierError):
    """The tier's server did not answer in time."""


class Marker(NamedTuple):
    """An invalidation of everything not newer than ``version`` under ``name``: ``t:<tag>``,
    ``p:<key prefix>`` or ``k:<key>`` (see cachesvc.markers)."""

    name: str
    version: int


# A payload as a tier hands it out: bytes, or a view of the reply it arrived in, so that a
# large value is not copied (and a megabyte allocated) to strip the version header.
Payload: TypeAlias = bytes | memoryview
# Past this size a payload, and the value in it, is handed on as a view of what holds it
# rather than copied; below it, making the view costs more than the copy it saves.
VIEWED_SIZE = 64 * 1024


class TierWrite(NamedTuple):
    key: str
    payload: Payload | None  # None writes a tombstone
    version: int
    ttl: float  # seconds, > 0: how long the tier keeps it
    # The entry's tags, in clear beside the opaque payload, for a tier that erases by tag
    # (``erases``); the others ignore them. The engine fills them on the writes to the
    # durable tier: a tier never decodes a payload (it may even be sealed).
    tags: tuple[str, ...] = ()


# Versions are non-negative 63-bit integers (cachesvc.versions). Written as 16 lowercase hex
# digits, their order is the order of the strings, which is how Redis' Lua compares them
# (a Lua number, a double, is exact only to 2^53).
VERSION_HEADER_LEN = 16


def pack_versioned(version: int, payload: Payload | None) -> bytes:
    """Prefix a payload with its version, for servers that store one opaque blob per key.

    An empty remainder marks a tombstone (real payloads are never empty: they are
    envelopes). Fixed-width hex keeps the header comparable in Lua and readable in
    redis-cli.
    """
    return b"%016x" % version + (payload or b"")


def unpack_version(stored: bytes) -> int:
    return int(stored[:VERSION_HEADER_LEN], 16)


def unpack_payload(stored: bytes | None) -> Payload | None:
    """The payload of a versioned blob, a view of it; None for a miss or a tombstone."""
    if stored is None or len(stored) <= VERSION_HEADER_LEN:
        return None
    return memoryview(stored)[VERSION_HEADER_LEN:]


def url_options(url: SplitResult, allowed: dict[str, type]) -> dict[str, Any]:
    """Typed query options of a tier URL; unknown or malformed options raise ValueError."""
    options: dict[str, Any] = {}
    for name, raw in parse_qsl(url.query, keep_blank_values=True, strict_parsing=False):
        kind = allowed.get(name)
        if kind is None:
            known = ", ".join(sorted(allowed)) or "none"
            raise ValueError(f"unknown option {name!r} (known: {known})")
        try:
            options[name] = kind(raw)
        except ValueError:
            raise ValueError(f"option {name}={raw!r} is not a valid {kind.__name__}") from None
    return options


def driver_url(url: SplitResult, own_options: Iterable[str]) -> str:
    """``url`` for the driver: cachesvc's own query options removed, the driver's kept."""
    own = set(own_options)
    query = [
        (name, value)
        for name, value in parse_qsl(url.query, keep_blank_values=True)
        if name not in own
    ]
    return urlunsplit(url._replace(query=urlencode(query), fragment=""))


class Tier(abc.ABC):
    """One cache backend. Subclasses register under their URL scheme(s) in the registry."""

    schemes: ClassVar[tuple[str, ...]]
    # Calls finish without I/O: the engine neither batches nor times them out.
    in_process: ClassVar[bool] = False
    # The per-call timeout when the config names none: a network cache answers in well
    # under a millisecond on localhost, a database commit can take longer.
    default_timeout: ClassVar[float] = 0.25
    # Keeps invalidation markers (save_markers/load_markers): as the durable tier, it holds
    # them for every sidecar, so that they outlive a restart of any cache server.
    keeps_markers: ClassVar[bool] = False
    # Erases entries physically, by key and by tag (erase/keys_with_tag): as the durable
    # tier it holds every entry, so it answers a data subject's erasure and access
    # requests. Other tiers are erased through the ordinary contract (tombstones).
    erases: ClassVar[bool] = False

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        self.name = name
        self.ttl = ttl

    @classmethod  # noqa: B027 - optional hook
    def validate_url(cls, url: SplitResult) -> None:
        """Raise ValueError with a clear message when ``url`` cannot configure this tier."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare clients. Must not fail because the server is down: the sidecar starts
        anyway, reports the tier as not ready and uses it once it is reachable."""

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]:
        """Payloads for ``keys`` in order; None for a miss, an expired entry or a tombstone."""

    @abc.abstractmethod
    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        """Store each write unless the tier holds that key at a higher version."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise TierError unless the server answers."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def save_markers(self, markers: Sequence[Marker], ttl: float) -> None:
        """Keep each marker for ``ttl`` seconds, unless one of its name with a higher
        version is kept already. Required of tiers that declare ``keeps_markers``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no markers")

    async def load_markers(self, newer_than: int = 0) -> list[Marker]:
        """Every marker kept and not expired, of a version above ``newer_than``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no markers")

    async def erase(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        """Remove, physically and not as tombstones, every entry whose key is one of
        ``keys`` or that carries one of ``tags``; the number of values removed (tombstones
        of those keys go too, uncounted). Required of tiers that declare ``erases``."""
        raise NotImplementedError(f"{type(self).__name__} cannot erase")

    async def keys_with_tag(self, tag: str, limit: int, after: str | None = None) -> list[str]:
        """Up to ``limit`` keys of live entries that carry ``tag``, in key order, starting
        after the key ``after`` (the last of the previous page). Required of tiers that
        declare ``erases``."""
        raise NotImplementedError(f"{type(self).__name__} cannot list keys by tag")

    async def clear(self) -> None:
        """Drop every entry. Required of in-process tiers only: the engine clears them
        when they may have missed invalidation events."""
        raise NotImplementedError(f"{type(self).__name__} cannot be cleared")

    # -- independent nodes (optional) ------------------------------------------------------

    def nodes(self) -> Sequence[Tier]:
        """The tier's independent failure domains, or ``()`` when it is one (the default).

        What the engine may rely on when this is not empty:

        - each node is a full ``Tier`` over one server: its calls touch that server only,
          so its failures, timeouts and recovery say nothing about the other nodes;
        - every key lives on exactly one node, ``nodes()[node_for(key)]``; a call for keys
          of several nodes is one call per node, and a node's calls carry only its keys;
        - the tier's own calls are the same operations spread over the nodes, failing when
          any of them fails: the engine may use the whole tier or its nodes, not both for
          one key at a time (their entries are the same entries);
        - the same nodes, in the same order, on every call, from construction on; each has
          its own stable ``name`` (for metrics and the record of missed keys) and the tier's
          ``ttl``. ``start()`` and ``close()`` of the tier start and close them; a node's
          own ``close()`` may be called too (closing is idempotent).
        """
        return ()

    def node_for(self, key: str) -> int:
        """The index in ``nodes()`` of the node that holds ``key``: a pure function of the key
        and the tier's configuration (the same answer in every sidecar)."""
        raise NotImplementedError(f"{type(self).__name__} has no nodes")

    def gutter(self) -> Tier | None:
        """A spare server that serves, and is filled with, the keys of a node while that node
        is down, or None (the default).

        It is not one of ``nodes()`` and holds no key of its own: every key may be written to
        it. Its ``ttl`` is the short lifetime of what it holds, and it keeps no value longer
        than that whatever a write asks (tombstones keep theirs). It follows the same
        contract as any tier (versions, tombstones), and the same lifecycle as the nodes.
        """
        return None

    async def get(self, key: str) -> Payload | None:
        return (await self.get_many((key,)))[0]

    def get_many_soon(self, keys: Sequence[str]) -> asyncio.Future[list[Payload | None]]:
        """``get_many`` as a future. A tier whose client completes futures from its
        connection's read callback returns one of those, so that a read costs the engine
        no task (the Redis tier's); this default runs ``get_many`` as a task."""
        return asyncio.ensure_future(self.get_many(keys))

    def set_many_soon(self, writes: Sequence[TierWrite]) -> asyncio.Future[None]:
        """``set_many`` as a future, as ``get_many_soon`` is ``get_many``: a tier whose
        client completes its calls from the read callback returns such a call, so a write
        costs the engine no task either; this default runs ``set_many`` as a task."""
        return asyncio.ensure_future(self.set_many(writes))

    def get_now(self, key: str) -> Payload | None:
        """``get`` of an ``in_process`` tier, answered without waiting: every L1 hit of
        such a tier comes here, and a plain call costs less than running a coroutine."""
        raise NotImplementedError(f"{type(self).__name__} is not an in-process tier")

    async def set(self, write: TierWrite) -> None:
        await self.set_many((write,))
