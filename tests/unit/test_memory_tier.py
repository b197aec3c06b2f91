"""The in-process memory tier: least recently used entries go first, its byte count stays
exact through replacements, tombstones, expiries, evictions and oversized values, entries
expire on the monotonic clock, and a write never replaces a live entry of a higher
version."""

from __future__ import annotations

import random
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest

import tiers.memory
from tiers.base import TierWrite
from tiers.memory import MemoryTier, _key_of

T = TypeVar("T")


def finished(call: Coroutine[Any, Any, T]) -> T:
    """The result of an in-process tier's call, which never waits: run to its end now
    (the evictions measured without the event loop's cost)."""
    try:
        call.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    call.close()
    raise RuntimeError("a call to an in-process tier waited")


class FakeClock:
    """Stands in for the ``time`` module inside tiers.memory: a monotonic clock that
    moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(tiers.memory, "time", fake)
    return fake


def tier(query: str = "") -> MemoryTier:
    return MemoryTier("l1", urlsplit(f"memory://?{query}"), 300)


def write(key: str, payload: bytes | None, version: int = 1, ttl: float = 300) -> TierWrite:
    return TierWrite(key, payload, version, ttl)


# -- LRU bounds -------------------------------------------------------------------------------


async def test_max_items_evicts_the_least_recently_used() -> None:
    memory = tier("max_items=3")
    await memory.set_many([write(f"k{n}", b"v") for n in range(3)])
    assert await memory.get("k0") == b"v"  # k0 is now the most recently used
    await memory.set(write("k3", b"v"))
    assert len(memory) == 3
    assert await memory.get_many(["k0", "k1", "k2", "k3"]) == [b"v", None, b"v", b"v"]


async def test_get_many_refreshes_recency_too() -> None:
    memory = tier("max_items=3")
    await memory.set_many([write(f"k{n}", b"v") for n in range(3)])
    assert await memory.get_many(["k1", "k0"]) == [b"v", b"v"]  # k2 is now the oldest
    await memory.set(write("k3", b"v"))
    assert await memory.get("k2") is None
    assert await memory.get_many(["k0", "k1", "k3"]) == [b"v", b"v", b"v"]


async def test_a_replacement_counts_as_a_use() -> None:
    memory = tier("max_items=2")
    await memory.set_many([write("a", b"1"), write("b", b"1")])
    await memory.set(write("a", b"2", version=2))  # "b" is now the oldest
    await memory.set(write("c", b"1"))
    assert await memory.get_many(["a", "b", "c"]) == [b"2", None, b"1"]


async def test_max_bytes_counts_keys_and_payloads_exactly() -> None:
    memory = tier("max_bytes=100")
    await memory.set_many([write("a", b"x" * 30), write("b", b"y" * 30)])
    assert memory.size_bytes == 62
    await memory.set(write("a", b"z" * 10, version=2))  # a replacement gives bytes back
    assert memory.size_bytes == 42
    await memory.set(write("c", b"w" * 60))  # 42 + 61 > 100: "b", the oldest, goes
    assert await memory.get_many(["a", "b", "c"]) == [b"z" * 10, None, b"w" * 60]
    assert memory.size_bytes == 72
    await memory.set(write("huge", b"h" * 200))  # could never fit: not stored, nothing evicted
    assert len(memory) == 2
    assert memory.size_bytes == 72


async def test_one_large_write_evicts_as_many_entries_as_it_needs() -> None:
    memory = tier("max_bytes=100")
    await memory.set_many([write(f"k{n}", b"x" * 18) for n in range(5)])  # 5 x 20 bytes
    assert memory.size_bytes == 100
    await memory.set(write("big", b"y" * 47))  # 50 bytes: the three oldest go
    assert await memory.get_many([f"k{n}" for n in range(5)]) == [None] * 3 + [b"x" * 18] * 2
    assert (len(memory), memory.size_bytes) == (3, 90)


async def test_an_oversized_replacement_drops_the_older_value() -> None:
    memory = tier("max_bytes=100")
    await memory.set(write("a", b"old"))
    await memory.set(write("a", b"n" * 200, version=2))
    # The newer value is not kept, and the older one must not be served in its place.
    assert await memory.get("a") is None
    assert (len(memory), memory.size_bytes) == (0, 0)


async def test_a_key_longer_than_max_bytes_is_not_kept_even_as_a_tombstone() -> None:
    memory = tier("max_bytes=10")
    await memory.set(write("k" * 11, None))
    assert (len(memory), memory.size_bytes) == (0, 0)


async def test_clear_and_close_drop_everything() -> None:
    memory = tier()
    await memory.set_many([write("a", b"1"), write("b", None)])
    await memory.clear()
    assert (len(memory), memory.size_bytes) == (0, 0)
    assert await memory.get_many(["a", "b"]) == [None, None]
    await memory.set(write("a", b"again"))  # a lower version than before: nothing remains
    assert memory.size_bytes == 6
    await memory.close()
    assert (len(memory), memory.size_bytes) == (0, 0)


# -- tombstones and versions ------------------------------------------------------------------


async def test_a_tombstone_reads_as_a_miss_and_weighs_its_key() -> None:
    memory = tier()
    await memory.set(write("gone", b"x" * 50, version=1))
    await memory.set(write("gone", None, version=2))
    assert await memory.get("gone") is None
    assert await memory.get_many(["gone"]) == [None]
    assert (len(memory), memory.size_bytes) == (1, 4)


async def test_a_tombstone_keeps_lower_versions_out_until_it_expires(clock: FakeClock) -> None:
    memory = tier()
    await memory.set(write("k", None, version=5, ttl=10))
    await memory.set(write("k", b"stale", version=4))
    assert await memory.get("k") is None
    clock.now += 10
    await memory.set(write("k", b"later", version=4))  # the tombstone has expired
    assert await memory.get("k") == b"later"
    await memory.set(write("k", b"newer", version=6))
    assert await memory.get("k") == b"newer"


async def test_versions_order_writes() -> None:
    memory = tier()
    v = 1_700_000_000_000_000  # microseconds since the epoch, as the engine makes them
    await memory.set(write("k", b"second", version=v + 1))
    await memory.set(write("k", b"first", version=v))
    assert await memory.get("k") == b"second"
    await memory.set(write("k", b"same version", version=v + 1))  # equal replaces
    assert await memory.get("k") == b"same version"
    assert memory.size_bytes == 1 + len(b"same version")


async def test_in_one_batch_the_highest_version_of_a_key_wins() -> None:
    memory = tier()
    await memory.set_many([write("k", b"3", 3), write("k", b"1", 1), write("k", b"2", 2)])
    assert await memory.get("k") == b"3"
    assert (len(memory), memory.size_bytes) == (1, 2)


async def test_an_expired_entry_does_not_protect_its_version(clock: FakeClock) -> None:
    memory = tier()
    await memory.set(write("k", b"new", version=9, ttl=5))
    clock.now += 5
    await memory.set(write("k", b"old", version=1))
    assert await memory.get("k") == b"old"
    assert memory.size_bytes == 4


# -- expiry -----------------------------------------------------------------------------------


async def test_expired_entries_give_their_bytes_back_when_read() -> None:
    memory = tier("max_items=10")
    await memory.set(write("gone", b"x" * 10, ttl=0.0))
    assert memory.size_bytes == 14
    assert await memory.get("gone") is None
    assert (len(memory), memory.size_bytes) == (0, 0)


async def test_an_entry_lives_until_its_deadline_and_not_at_it(clock: FakeClock) -> None:
    memory = tier()
    await memory.set_many([write("a", b"1", ttl=10), write("b", b"2", ttl=10)])
    clock.now += 9.75  # steps that are exact in binary: the deadline is hit exactly
    assert await memory.get("a") == b"1"
    assert await memory.get_many(["b"]) == [b"2"]
    clock.now += 0.25  # exactly at the deadline: expired
    assert await memory.get("a") is None
    assert await memory.get_many(["b", "b"]) == [None, None]
    assert (len(memory), memory.size_bytes) == (0, 0)


async def test_expiry_follows_the_clock_in_fine_steps(clock: FakeClock) -> None:
    memory = tier()
    await memory.set(write("k", b"v", ttl=2**-20))  # about a microsecond
    clock.now += 2**-21
    assert await memory.get("k") == b"v"
    clock.now += 2**-21
    assert await memory.get("k") is None


@pytest.mark.parametrize("ttl", [0.0, -5.0, float("nan")])
async def test_a_ttl_of_zero_or_less_expires_at_once(clock: FakeClock, ttl: float) -> None:
    memory = tier()
    await memory.set(write("k", b"v", version=9, ttl=ttl))
    assert await memory.get_many(["k"]) == [None]
    await memory.set(write("k", b"v", version=9, ttl=ttl))
    await memory.set(write("k", b"lower", version=1))  # an expired entry protects nothing
    assert await memory.get("k") == b"lower"


async def test_long_ttls_keep_entries(clock: FakeClock) -> None:
    memory = tier()
    await memory.set_many([write("year", b"1", ttl=365 * 86400), write("inf", b"2", ttl=1e300)])
    clock.now += 364 * 86400
    assert await memory.get_many(["year", "inf"]) == [b"1", b"2"]


# -- reads ------------------------------------------------------------------------------------


async def test_get_many_keeps_order_repeats_and_misses() -> None:
    memory = tier()
    await memory.set_many([write("a", b"1"), write("b", b"2"), write("t", None)])
    assert await memory.get_many([]) == []
    assert await memory.get_many(["b", "x", "a", "t", "b"]) == [b"2", None, b"1", None, b"2"]


async def test_payloads_come_back_byte_for_byte() -> None:
    memory = tier()
    payloads = {f"k{n}": bytes(range(256))[n:] + b"\xff" * n for n in range(0, 256, 17)}
    await memory.set_many([write(key, payload) for key, payload in payloads.items()])
    assert await memory.get_many(list(payloads)) == list(payloads.values())


# -- against a reference model ----------------------------------------------------------------


def held(memory: MemoryTier) -> set[str]:
    """The keys the tier holds, read from its table."""
    return {_key_of(entry) for entry in memory._slots if entry is not None}


def weight(key: str, payload: bytes | None) -> int:
    """What an entry counts against ``max_bytes``: its key's UTF-8 bytes and its payload."""
    return len(key.encode("utf-8", "surrogatepass")) + len(payload or b"")


class Model:
    """The tier's rules written plainly, eviction aside: a dict of (payload, version,
    deadline). Which entries an eviction takes is the tier's choice (an approximate LRU,
    tested on its own below); the model drops those the tier dropped, once it has checked
    that a bound was passed."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self.entries: dict[str, tuple[bytes | None, int, float]] = {}

    def size(self) -> int:
        return sum(weight(k, p) for k, (p, _, _) in self.entries.items())

    def get(self, key: str, now: float) -> bytes | None:
        if key not in self.entries:
            return None
        payload, _, deadline = self.entries[key]
        if deadline <= now:
            del self.entries[key]
            return None
        return payload

    def set(self, w: TierWrite, now: float) -> None:
        if w.key in self.entries:
            _, version, deadline = self.entries[w.key]
            if deadline > now and version > w.version:
                return
            del self.entries[w.key]
        if weight(w.key, w.payload) <= self.max_bytes:
            self.entries[w.key] = (w.payload, w.version, now + w.ttl)

    def evicted(self, kept: set[str]) -> None:
        gone = set(self.entries) - kept
        if gone:
            assert len(self.entries) > self.max_items or self.size() > self.max_bytes
        for key in gone:
            del self.entries[key]
        assert len(self.entries) <= self.max_items and self.size() <= self.max_bytes


@pytest.mark.parametrize("seed", range(5))
async def test_random_operations_match_the_model(clock: FakeClock, seed: int) -> None:
    rng = random.Random(seed)
    memory, model = tier("max_items=12&max_bytes=400"), Model(12, 400)
    keys = [f"key{n}" for n in range(20)] + ["ключ", "k\udc80"]  # UTF-8, a lone surrogate
    for _ in range(2000):
        roll = rng.random()
        if roll < 0.45:
            payload = None if rng.random() < 0.2 else rng.randbytes(rng.choice([1, 30, 90, 500]))
            w = write(rng.choice(keys), payload, rng.randrange(5), rng.choice([0.5, 3, 50]))
            await memory.set(w)
            model.set(w, clock.now)
            model.evicted(held(memory))
        elif roll < 0.7:
            key = rng.choice(keys)
            assert await memory.get(key) == model.get(key, clock.now)
        elif roll < 0.9:
            asked = rng.sample(keys, 3)
            assert await memory.get_many(asked) == [model.get(k, clock.now) for k in asked]
        else:
            clock.now += rng.choice([0.25, 1.0, 2.5])
        assert held(memory) == set(model.entries)
        assert len(memory) == len(model.entries)
        assert memory.size_bytes == model.size()


# -- eviction in a large table ---------------------------------------------------------------


async def test_bounds_hold_after_every_write_of_a_long_churn() -> None:
    rng = random.Random(7)
    memory = tier("max_items=500&max_bytes=20000")
    for n in range(20_000):
        payload = rng.randbytes(rng.choice([5, 20, 60, 300]))
        await memory.set(write(f"k{rng.randrange(3000)}", payload, version=n))
        assert len(memory) <= 500 and memory.size_bytes <= 20000
    assert memory.size_bytes == sum(len(e) - 17 for e in memory._slots if e is not None)


async def test_recently_read_entries_survive_eviction_over_cold_ones() -> None:
    memory = tier("max_items=2000")
    await memory.set_many([write(f"old{n}", b"v" * 50) for n in range(2000)])
    read = [f"old{n}" for n in random.Random(3).sample(range(2000), 200)]
    assert await memory.get_many(read) == [b"v" * 50] * 200
    for n in range(1000):  # half the tier turns over
        await memory.set(write(f"new{n}", b"w" * 50))
    assert len(memory) == 2000
    # Every entry read since the fill outlived the 1,000 evictions; those went to entries
    # never read, and newer writes mostly outlived them too.
    assert await memory.get_many(read) == [b"v" * 50] * 200
    survivors = held(memory)
    assert sum(key.startswith("new") for key in survivors) >= 900


async def test_eviction_cost_does_not_grow_with_churn() -> None:
    memory = tier("max_items=20000")
    await memory.set_many([write(f"k{n}", b"v" * 20) for n in range(20_000)])
    slots = len(memory._slots)

    def evicting_writes(start: int) -> float:
        began = time.process_time()
        for n in range(start, start + 5000):
            finished(memory.set(write(f"k{n}", b"v" * 20)))
        return time.process_time() - began

    before = min(evicting_writes(20_000 + 5000 * r) for r in range(3))
    for n in range(100_000, 300_000):  # ten times the tier's size turns over
        finished(memory.set(write(f"k{n}", b"v" * 20)))
    after = min(evicting_writes(300_000 + 5000 * r) for r in range(3))
    # No deleted-slot markers pile up: the table keeps its size, every entry stays a short
    # probe from its slot, and an eviction costs what it did.
    assert len(memory._slots) == slots
    mask = len(memory._slots) - 1
    displacement = [
        (i - hash(_key_of(entry))) & mask for i, entry in enumerate(memory._slots) if entry
    ]
    assert sum(displacement) / len(displacement) < 2
    assert after < 3 * before
