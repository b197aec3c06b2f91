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

from tiers.base import Tier, TierWrite, url_options

_OPTIONS: dict[str, type] = {"max_items": int, "max_bytes": int}


class _Slot(NamedTuple):
    payload: bytes | None  # None: tombstone
    version: int
    deadline: float  # time.monotonic()


class MemoryTier(Tier):
    schemes = ("memory",)
    in_process = True

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        options = url_options(url, _OPTIONS)
        self.max_items = int(options.get("max_items", 100_000))
        self.max_bytes = int(options.get("max_bytes", 256 * 1024 * 1024))
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._bytes = 0

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
