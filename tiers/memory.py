"""In-process LRU tier: the embedded default and the fastest L1.

Bounded by item count and by bytes (``memory://?max_items=N&max_bytes=B``; the bytes are
each entry's key characters plus its payload); the least recently used entries go first.
Expiry uses the monotonic clock, so a wall-clock step never revives or kills entries. It
lives and dies with the process: with several workers each has its own.

Each entry is one ``bytes`` object: a 16-byte header (deadline, version) and the payload
after it; a tombstone is the header alone. One object instead of a tuple of payload,
version and deadline (four objects) brings a million 100-byte values (139-byte
envelopes) from 484 to 338 bytes each in RSS, key strings and tables included, and from
532 to 386 once churn has grown the tables (``python -m bench.memory_tier``). The
entries live in one ``OrderedDict``, least recently used first:
``move_to_end`` and ``popitem(last=False)`` keep a read and an eviction O(1). A plain
dict reordered by pop and re-insert is smaller, but finding its oldest entry walks every
slot emptied since its table was last rebuilt: evicting from a full tier of a million
took tens of microseconds per entry, growing with the churn.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from urllib.parse import SplitResult

from tiers.base import Marker, Tier, TierWrite, url_options

_OPTIONS: dict[str, type] = {"max_items": int, "max_bytes": int}

# Big-endian, deadline first, so that a read decodes nothing: non-negative doubles sort
# as their big-endian bytes do, so an entry is live exactly when it compares greater than
# _live_above(now, 0xFF). Times are seconds of the monotonic clock since the tier was
# made, never negative, and so are deadlines (see set_many); versions are never negative
# (cachesvc.versions), so the byte after the deadline is never 0xFF, and an
# entry whose deadline equals ``now`` compares lower: expired, as ``deadline <= now``.
_HEADER = struct.Struct(">dq")  # deadline, version
_HEADER_LEN = _HEADER.size
_live_above = struct.Struct(">dB").pack


class MemoryTier(Tier):
    schemes = ("memory",)
    in_process = True
    keeps_markers = True

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        options = url_options(url, _OPTIONS)
        self.max_items = int(options.get("max_items", 100_000))
        self.max_bytes = int(options.get("max_bytes", 256 * 1024 * 1024))
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._started = time.monotonic()  # the origin of deadlines: see _HEADER
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
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """Key characters plus payload bytes of every entry held: what ``max_bytes`` bounds."""
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        # get_many's loop for one key, without the default's second coroutine and list:
        # every L1 hit comes here.
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            return None
        if entry > _live_above(time.monotonic() - self._started, 0xFF):
            entries.move_to_end(key)
            return entry[_HEADER_LEN:] or None  # nothing after the header: a tombstone
        self._drop(key)
        return None

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        live_above = _live_above(time.monotonic() - self._started, 0xFF)
        entries = self._entries
        found: list[bytes | None] = []
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                found.append(None)
            elif entry > live_above:
                entries.move_to_end(key)
                found.append(entry[_HEADER_LEN:] or None)
            else:
                self._drop(key)
                found.append(None)
        return found

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        now = time.monotonic() - self._started
        entries = self._entries
        for key, payload, version, ttl, _tags in writes:
            current = entries.get(key)
            if current is not None:
                deadline, current_version = _HEADER.unpack_from(current)
                if deadline > now and current_version > version:
                    continue
                self._drop(key)
            size = len(key) + (len(payload) if payload else 0)
            if size > self.max_bytes:
                continue  # could never fit; the lower tiers still hold it
            # A ttl of zero or less (or NaN) is expired at once, and keeps the deadline
            # out of the negative doubles, which would sort as bytes above every positive.
            header = _HEADER.pack(now + ttl if ttl > 0 else 0.0, version)
            entries[key] = header + payload if payload else header
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

    async def load_markers(self, newer_than: int = 0) -> list[Marker]:
        now = time.monotonic()
        for name in [name for name, (_, deadline) in self._markers.items() if deadline <= now]:
            del self._markers[name]
        return [
            Marker(name, version)
            for name, (version, _) in self._markers.items()
            if version > newer_than
        ]

    async def close(self) -> None:
        await self.clear()

    async def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        self._forget(key, self._entries.pop(key))

    def _evict(self) -> None:
        entries = self._entries
        while len(entries) > self.max_items or self._bytes > self.max_bytes:
            self._forget(*entries.popitem(last=False))  # the least recently used

    def _forget(self, key: str, entry: bytes) -> None:
        """Give back the bytes of an entry just taken out."""
        self._bytes -= len(key) + len(entry) - _HEADER_LEN
