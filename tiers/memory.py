"""In-process tier: the embedded default and the fastest L1.

Bounded by item count and by bytes (``memory://?max_items=N&max_bytes=B``; the bytes are
each entry's key, in UTF-8, plus its payload); when a bound is passed, entries of the
oldest recency mark held go first: an LRU whose clock ticks once per 64th of the entries
written (see _evict). Expiry uses the monotonic clock, so a wall-clock step never revives
or kills entries. It lives and dies with the process: with several workers each has its
own.

Why this structure (``python -m bench.memory_tier``: a million 100-byte values, 139-byte
envelopes, keys of 11 characters; bytes per entry by tracemalloc / RSS):

- Before, an ``OrderedDict`` of key string to ``bytes`` (16-byte header and payload):
  328 / 338 after the fill, 376 / 386 after churn. A dict of string keys cannot get under
  250 whatever it holds: the key string is 64 bytes, the value ``bytes`` 192, the dict's
  table 31 to 61 (it grows with churn), 287 or more before any LRU order (the
  ``OrderedDict``'s list adds about 50).
- Now each entry is one ``bytes`` object, key included (200 bytes asked, 208 allocated),
  in a table of our own: open addressing with linear probing over a plain ``list`` (8
  bytes a slot) and a ``bytearray`` of recency marks beside it (1 byte a slot), at most
  half full: 2^21 slots for a million entries, 19 bytes an entry. 219 / 231-234 after
  the fill and 219 / 231-234 after churn: a removal shifts the entries after it back, so there
  are no deleted-slot markers and the table does not grow while the tier is full.
- No linked list and no per-entry object for recency: a mark is the tick of the entry's
  last read or write. An eviction takes, from a hand that goes round the table, the first
  entry whose mark is the oldest held (``bytearray.find``: memchr, in C), so an entry read
  since another was last used never goes before it (at a tick's resolution), and the
  cost of an eviction does not grow with churn (tests/unit/test_memory_tier.py). Its hit
  ratio is the exact LRU's to three digits: 300,000 reads of Zipf-distributed keys (s 0.8
  and 1.0) over 100,000, each miss written, in tiers of 1,000 and 10,000: 0.2050, 0.4617,
  0.5054, 0.7287 against the ``OrderedDict``'s 0.2050, 0.4618, 0.5053, 0.7286. Random
  sampling (Redis) was tried first in its local form, the oldest of 64 slots after the
  hand: it evicted recently read entries once the cold ones of a window were gone.
- A plain dict reordered by pop and re-insert was rejected earlier: finding its oldest
  entry walks every slot emptied since its table was last rebuilt, tens of microseconds
  per eviction from a full tier of a million.
- The price is paid in Python: a read encodes its key, hashes it and compares (one chain,
  see _live_after), where the ``OrderedDict`` did it in C. Same machine, interleaved runs,
  best of each: ``get`` of one hit 834-989 ns before, 924-1,199 after (the slower figures
  when the key sits one slot past its own, about one key in five); ``get_many`` of one
  954-1,196 before, 1,054-1,331 after; a ``set`` that replaces 1,832-2,042 before,
  1,744-1,916 after; a ``set`` of a new key into a full tier, which evicts, 1,957-2,530
  before, 3,649-5,434 after.
- Growing the table rehashes every entry in Python: 367 ms for 524,288 entries. So the
  table is made for ``max_items`` at once, up to 2^20 items (18 MiB); only a tier
  configured for more grows, and stalls then.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from urllib.parse import SplitResult

from tiers.base import VIEWED_SIZE, Marker, Payload, Tier, TierWrite, url_options

_OPTIONS: dict[str, type] = {"max_items": int, "max_bytes": int}

# An entry is one ``bytes``: the key in UTF-8, 0xFF, the header (deadline, version), then
# the payload; a tombstone stops after the header. 0xFF never occurs in UTF-8 (nor in the
# "surrogatepass" bytes of a lone surrogate), so it ends the key unambiguously, and every
# entry of a key lies between ``key + b"\xff"`` and ``key + b"\xff\x80"``: the deadline is
# a non-negative double, whose big-endian first byte is below 0x80. Non-negative doubles
# also sort as their big-endian bytes do, so an entry of ``key`` is live exactly when it
# compares greater than ``key + _live_after(0xFF, now, 0xFF)``: one comparison chain
# finds the key and checks its deadline, with nothing decoded. Times are seconds of the
# monotonic clock since the tier was made, never negative, and so are deadlines (see
# set_many); versions are never negative (cachesvc.versions), so the byte after the
# deadline is never 0xFF, and an entry whose deadline equals ``now`` compares lower:
# expired, as ``deadline <= now``.
_HEADER = struct.Struct(">dq")  # deadline, version
_live_after = struct.Struct(">BdB").pack
_END = b"\xff"
_PAST_END = b"\xff\x80"
_OVERHEAD = 1 + _HEADER.size  # bytes of an entry that are neither key nor payload
_TAIL_TO_PAYLOAD = _OVERHEAD - len(_live_after(0, 0.0, 0))  # from the end of ``live`` on

# Recency: one byte per slot (``_marks``), the tick of the entry's last read or write;
# _EMPTY marks an empty slot. The tick counts writes (one tick per ``_period`` of them, a
# 64th of the entries held: a full turnover spans 64 ticks), and when it reaches _EMPTY
# every mark is halved at once (``bytes.translate``, C), which keeps their order and frees
# the upper half again.
_EMPTY = 255
_HALVE = bytes([mark >> 1 for mark in range(_EMPTY)] + [_EMPTY])
# The table is made for max_items at once, up to this many (2^21 slots, 18 MiB): growing
# it rehashes every entry in Python, an event-loop stall of about 0.7 µs per entry.
_PRESIZED_ITEMS = 1 << 20


def _encoded(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


def _key_of(entry: bytes) -> str:
    return entry[: entry.index(_END)].decode("utf-8", "surrogatepass")


class MemoryTier(Tier):
    schemes = ("memory",)
    in_process = True
    keeps_markers = True

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        options = url_options(url, _OPTIONS)
        self.max_items = int(options.get("max_items", 100_000))
        self.max_bytes = int(options.get("max_bytes", 256 * 1024 * 1024))
        self._started = time.monotonic()  # the origin of deadlines: see _HEADER
        # At most half the slots are used (see set_many).
        self._initial_size = 1 << (2 * min(self.max_items, _PRESIZED_ITEMS) - 1).bit_length()
        self._reset(self._initial_size)
        # name -> (version, monotonic deadline): markers are kept apart from the entries,
        # never evicted, and outlive clear() (it drops cached values, not invalidations).
        self._markers: dict[str, tuple[int, float]] = {}

    def _reset(self, size: int) -> None:
        # Open addressing with linear probing over a list: slot ``hash(key) & _mask`` or
        # the first one after it, before an empty slot. No more than half the slots are
        # used (see set_many), and a removal shifts the entries after it back (_remove):
        # there are no deleted-slot markers, so probes stay short whatever the churn.
        self._slots: list[bytes | None] = [None] * size
        self._marks = bytearray(b"\xff") * size
        self._mask = size - 1
        self._count = 0
        self._bytes = 0
        self._hand = 0  # where the next eviction starts looking
        self._oldest = 0  # no held entry has a lower mark
        self._tick = 0
        self._writes = 0  # since the tick last moved
        self._period = 1  # writes per tick: a 64th of the entries held (see _advance)

    @classmethod
    def validate_url(cls, url: SplitResult) -> None:
        options = url_options(url, _OPTIONS)
        for name, value in options.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"option {name} must be a positive integer")
        if url.netloc or url.path not in ("", "/"):
            raise ValueError("memory:// takes no host or path, only ?max_items=&max_bytes=")

    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        """Key bytes plus payload bytes of every entry held: what ``max_bytes`` bounds."""
        return self._bytes

    async def get(self, key: str) -> Payload | None:
        return self.get_now(key)

    def get_now(self, key: str) -> Payload | None:
        # get_many's loop for one key, without a coroutine or a list: every L1 hit comes
        # here, most of them at the first slot they look at.
        try:
            name = key.encode()
        except UnicodeEncodeError:
            name = _encoded(key)
        slots = self._slots
        mask = self._mask
        i = hash(key) & mask
        entry = slots[i]
        if entry is None:
            return None
        live = name + _live_after(0xFF, time.monotonic() - self._started, 0xFF)
        past = name + _PAST_END
        while not live < entry < past:
            if entry < past and entry > name + _END:  # this key's, expired
                self._remove(i)
                return None
            i = (i + 1) & mask
            entry = slots[i]
            if entry is None:
                return None
        self._marks[i] = self._tick
        return _payload(entry, len(live) + _TAIL_TO_PAYLOAD)

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]:
        tail = _live_after(0xFF, time.monotonic() - self._started, 0xFF)
        slots = self._slots
        mask = self._mask
        marks = self._marks
        tick = self._tick
        found: list[Payload | None] = []
        for key in keys:
            try:
                name = key.encode()
            except UnicodeEncodeError:
                name = _encoded(key)
            i = hash(key) & mask
            entry = slots[i]
            if entry is not None:
                live = name + tail
                past = name + _PAST_END
                while not live < entry < past:
                    if entry < past and entry > name + _END:
                        self._remove(i)  # expired; moves entries, never the table
                        found.append(None)
                        break
                    i = (i + 1) & mask
                    entry = slots[i]
                    if entry is None:
                        found.append(None)
                        break
                else:
                    marks[i] = tick
                    found.append(_payload(entry, len(live) + _TAIL_TO_PAYLOAD))
            else:
                found.append(None)
        return found

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        now = time.monotonic() - self._started
        for key, payload, version, ttl, _tags in writes:
            try:
                name = key.encode()
            except UnicodeEncodeError:
                name = _encoded(key)
            start = name + _END
            past = name + _PAST_END
            slots = self._slots
            mask = self._mask
            hashed = hash(key)
            i = hashed & mask
            while (entry := slots[i]) is not None:
                if start < entry < past:
                    break
                i = (i + 1) & mask
            size = len(name) + (len(payload) if payload else 0)
            if entry is not None:
                deadline, current_version = _HEADER.unpack_from(entry, len(start))
                if deadline > now and current_version > version:
                    continue  # a live entry of a higher version stays
                if size > self.max_bytes:
                    self._remove(i)  # the newer value cannot be kept: nor can the older
                    continue
                self._bytes += size - (len(entry) - _OVERHEAD)
            else:
                if size > self.max_bytes:
                    continue  # could never fit; the lower tiers still hold it
                if (self._count + 1) * 2 > len(slots):
                    self._resize(len(slots) * 2)
                    slots = self._slots
                    mask = self._mask
                    i = hashed & mask
                    while slots[i] is not None:
                        i = (i + 1) & mask
                self._count += 1
                self._bytes += size
            # A ttl of zero or less (or NaN) is expired at once, and keeps the deadline
            # out of the negative doubles, which would sort as bytes above every positive.
            header = _HEADER.pack(now + ttl if ttl > 0 else 0.0, version)
            slots[i] = start + header + payload if payload else start + header
            self._marks[i] = self._tick
            # The tick moves after the write it marks: the reads that follow are more recent.
            self._writes += 1
            if self._writes >= self._period:
                self._advance()
            if self._count > self.max_items or self._bytes > self.max_bytes:
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
        self._reset(self._initial_size)

    # -- the table ---------------------------------------------------------------------------

    def _advance(self) -> None:
        self._writes = 0
        self._period = max(1, self._count >> 6)
        self._tick += 1
        if self._tick == _EMPTY:
            self._marks = self._marks.translate(_HALVE)
            self._tick = (_EMPTY >> 1) + 1
            self._oldest >>= 1

    def _remove(self, i: int) -> None:
        """Empty slot ``i`` and move back each entry after it that may be found there."""
        slots = self._slots
        marks = self._marks
        mask = self._mask
        entry = slots[i]
        assert entry is not None
        self._count -= 1
        self._bytes -= len(entry) - _OVERHEAD
        j = i
        while (moving := slots[j := (j + 1) & mask]) is not None:
            # ``moving`` may go to i unless its home slot lies cyclically in (i, j].
            if (j - hash(_key_of(moving))) & mask >= (j - i) & mask:
                slots[i] = moving
                marks[i] = marks[j]
                i = j
        slots[i] = None
        marks[i] = _EMPTY

    def _resize(self, size: int) -> None:
        slots, marks = self._slots, self._marks
        kept = self._tick, self._writes, self._period, self._count, self._bytes, self._oldest
        self._reset(size)
        self._tick, self._writes, self._period, self._count, self._bytes, self._oldest = kept
        new_slots, new_marks, mask = self._slots, self._marks, self._mask
        for j, entry in enumerate(slots):
            if entry is not None:
                i = hash(_key_of(entry)) & mask
                while new_slots[i] is not None:
                    i = (i + 1) & mask
                new_slots[i] = entry
                new_marks[i] = marks[j]

    def _evict(self) -> None:
        """While a bound is passed, remove an entry of the oldest mark held: the first one
        after the hand (memchr finds it), so that each mark's entries go in slot order,
        which is no order of keys or of use."""
        while self._count > self.max_items or self._bytes > self.max_bytes:
            marks = self._marks
            oldest = self._oldest
            while (i := marks.find(oldest, self._hand)) < 0 and (i := marks.find(oldest)) < 0:
                oldest += 1  # no entry has that mark any more
            self._oldest = oldest
            self._hand = i
            self._remove(i)


def _payload(entry: bytes, start: int) -> Payload | None:
    """The payload ``entry`` holds from ``start``: past ``VIEWED_SIZE`` a view of it (an
    entry's bytes never change), else a copy; None for a tombstone (it ends there)."""
    if len(entry) - start > VIEWED_SIZE:
        return memoryview(entry)[start:]
    return entry[start:] or None
