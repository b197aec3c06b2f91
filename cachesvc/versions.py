"""Versions: what orders the writes of every sidecar sharing the tiers, and names one value.

A version is a 63-bit integer: microseconds since 2025-01-01 UTC in the high bits, the
writing process's *node number* in the low ``NODE_BITS``::

    version = (microseconds since EPOCH) << NODE_BITS | node

- Ordered by time: versions from sidecars sharing L2/L3 order writes by when they happened
  (as well as the hosts' clocks agree; NTP keeps them to milliseconds).
- Unique: two processes never share a node number while both hold it (``NodeLease``), and
  one process never issues a version twice (``VersionClock``), so one ETag names one value
  even for writes of one key in the same microsecond on two sidecars.
- Exact everywhere: Postgres keeps it in a ``bigint``, the Redis tier compares its fixed
  16-hex-digit form as a string, memcached's and the memory tier's in Python. It fits 63
  bits until 2096.

Versions of events from publishers outside the sidecars come from the event's ``sent_at``
with every node bit set: the invalidation covers every write of that microsecond.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Sequence
from typing import Protocol

from tiers.base import Payload, TierError, TierWrite

log = logging.getLogger(__name__)

NODE_BITS = 12
NODES = 1 << NODE_BITS
ANY_NODE = NODES - 1
EPOCH_US = 1_735_689_600_000_000  # 2025-01-01T00:00:00Z


def version_at(seconds: float, node: int = ANY_NODE) -> int:
    """The version of wall-clock time ``seconds`` (epoch seconds) on ``node``."""
    return (int(seconds * 1_000_000) - EPOCH_US) << NODE_BITS | node


def version_time(version: int) -> float:
    """The wall-clock time (epoch seconds) a version was issued at."""
    return ((version >> NODE_BITS) + EPOCH_US) / 1_000_000


class VersionClock:
    """Strictly increasing versions of one process, bumped past the last one issued or
    witnessed (a hybrid logical clock), so they never repeat or go back, even when the
    wall clock steps backwards."""

    def __init__(self, node: int = 0) -> None:
        self.node = node
        self._last = 0

    def next(self) -> int:
        now = version_at(time.time(), self.node)
        following = ((self._last >> NODE_BITS) + 1) << NODE_BITS | self.node
        self._last = max(now, following)
        return self._last

    def witness(self, version: int) -> None:
        """A peer's version was seen: later versions here must be newer."""
        self._last = max(self._last, version)


class _Store(Protocol):
    """What a lease needs of the durable tier (a ``TierSlot``)."""

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]: ...

    async def set_many(self, writes: Sequence[TierWrite]) -> None: ...


class NodeLease:
    """This process's node number, leased in the durable tier, which every sidecar sharing
    the tiers shares too.

    A lease is an entry ``\\x1fcachesvc-node:<n>`` holding the holder's identity, written
    with a version and a lifetime of ``LEASE_TTL`` and renewed every ``LEASE_TTL / 3``. To
    take a number a process writes its identity there when the entry is absent, expired or
    its own, then reads it back: the tier keeps the higher version of two racing writes,
    so both racers read the same holder and exactly one goes on to the next number.
    Numbers are tried from a hash of the sidecar's identity; a restarted process takes the
    next free one while its predecessor's lease runs out. Until a lease is held (the
    durable tier down at start) the clock uses a random number: unique with high
    probability only, which the log says.
    """

    LEASE_TTL = 60.0
    TRIES = 64

    def __init__(self, clock: VersionClock, identity: str) -> None:
        self.clock = clock
        # The holder's name: the sidecar's identity, which the first number tried comes
        # from, made unique to this process (two live processes of one identity, a
        # misconfiguration, must still not share a number).
        self.identity = f"{identity}/{uuid.uuid4().hex}".encode()
        self._start = identity.encode()
        self.held: int | None = None
        self._renewed_at = 0.0
        clock.node = random.randrange(NODES)

    def _key(self, node: int) -> str:
        return f"\x1fcachesvc-node:{node}"

    def _candidates(self) -> Sequence[int]:
        start = int.from_bytes(hashlib.blake2b(self._start, digest_size=4).digest(), "big")
        return [(start + step) % NODES for step in range(self.TRIES)]

    async def keep(self, durable: _Store) -> None:
        """Take a number, or renew the one held when it is due; TierError when the durable
        tier cannot be asked."""
        if self.held is not None:
            if time.monotonic() - self._renewed_at < self.LEASE_TTL / 3:
                return
            if await self._claim(durable, self.held):
                return
            log.warning("node number %d was taken over; taking another", self.held)
            self.held = None
        for node in self._candidates():
            if await self._claim(durable, node):
                self.held = self.clock.node = node
                log.info("versions carry node number %d", node)
                return
        log.warning("no free node number among %d tried; versions stay on a random one", self.TRIES)

    async def _claim(self, durable: _Store, node: int) -> bool:
        key = self._key(node)
        [holder] = await durable.get_many([key])
        if holder is not None and holder != self.identity:
            return False
        write = TierWrite(key, self.identity, self.clock.next(), self.LEASE_TTL)
        await durable.set_many([write])
        [holder] = await durable.get_many([key])
        if holder == self.identity:
            self._renewed_at = time.monotonic()
            return True
        return False

    async def release(self, durable: _Store) -> None:
        if self.held is None:
            return
        key = self._key(self.held)
        with contextlib.suppress(TierError):  # else it expires by itself
            await durable.set_many([TierWrite(key, None, self.clock.next(), 1.0)])
        self.held = None
