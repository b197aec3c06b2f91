"""In-process LRU tier: the embedded default and the fastest L1.

Bounded by item count and by payload bytes (``memory://?max_items=N&max_bytes=B``);
the least recently used entries go first. Expiry uses the monotonic clock, so a wall-clock
step never revives or kills entries. It lives and dies with the process: with several
workers each has its own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import SplitResult

from tiers.base import Marker, Tier, TierWrite, url_options

_OPTIONS: dict[str, type] = {"max_items": int, "max_bytes": int}


class _Slot(NamedTuple):
    payload: bytes | None  # None: tombstone
    version: int
    deadline: float  # time.monotonic()


class MemoryTier(Tier):
    schemes = ("memory",)
    in_process = True
    keeps_markers = True

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        options = url_options(url, _OPTIONS)
        self.max_items = int(options.get("max_items", 100_000))
        self.max_bytes = int(options.get("max_bytes", 256 * 1024 * 1024))
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._bytes = 0
        # name -> (version, monotonic deadline): markers are kept apart from the entries,
        # never evicted, and outlive clear() (it drops cached values, not invalidations).
        self._markers: dict[str, tuple[int, float]] = {}

    @classmethod
    def validate_url(cls, url: SplitResult) -> None:
        options = url_options(url, _OPTIONS)
        for name, value in options.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"option {name} must be a positive integer")
        if url.netloc or url.path not in ("", "/"):
            raise ValueError("memory:// takes no host or path, only ?max_items=&max_bytes=")

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        found: list[bytes | None] = []
        for key in keys:
            slot = self._slots.get(key)
            if slot is None:
                found.append(None)
            elif slot.deadline <= now:
                self._drop(key)
                found.append(None)
            else:
                self._slots.move_to_end(key)
                found.append(slot.payload)
        return found

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        now = time.monotonic()
        for write in writes:
            current = self._slots.get(write.key)
            if current is not None and current.deadline > now and current.version > write.version:
                continue
            if current is not None:
                self._drop(write.key)
            size = len(write.payload or b"") + len(write.key)
            if size > self.max_bytes:
                continue  # could never fit; the lower tiers still hold it
            self._slots[write.key] = _Slot(write.payload, write.version, now + write.ttl)
            self._bytes += size
        self._evict()

    async def ping(self) -> None:
        return None

    async def save_markers(self, markers: Sequence[Marker], ttl: float) -> None:
        now = time.monotonic()
        for name, version in markers:
            held = self._markers.get(name)
            if held is None or held[0] < version or held[1] <= now:
                self._markers[name] = (version, now + ttl)

    async def load_markers(self) -> list[Marker]:
        now = time.monotonic()
        for name in [name for name, (_, deadline) in self._markers.items() if deadline <= now]:
            del self._markers[name]
        return [Marker(name, version) for name, (version, _) in self._markers.items()]

    async def close(self) -> None:
        await self.clear()

    async def clear(self) -> None:
        self._slots.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        slot = self._slots.pop(key)
        self._bytes -= len(slot.payload or b"") + len(key)

    def _evict(self) -> None:
        while len(self._slots) > self.max_items or self._bytes > self.max_bytes:
            self._drop(next(iter(self._slots)))  # the least recently used
