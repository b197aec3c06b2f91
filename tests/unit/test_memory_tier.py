"""The in-process memory tier's bounds: least recently used entries go first, and its
byte count stays exact through replacements, expiries and evictions."""

from __future__ import annotations

from urllib.parse import urlsplit

from tiers.base import TierWrite
from tiers.memory import MemoryTier


def tier(query: str) -> MemoryTier:
    return MemoryTier("l1", urlsplit(f"memory://?{query}"), 300)


def write(key: str, payload: bytes, version: int = 1, ttl: float = 300) -> TierWrite:
    return TierWrite(key, payload, version, ttl)


async def test_max_items_evicts_the_least_recently_used() -> None:
    memory = tier("max_items=3")
    await memory.set_many([write(f"k{n}", b"v") for n in range(3)])
    assert await memory.get("k0") == b"v"  # k0 is now the most recently used
    await memory.set(write("k3", b"v"))
    assert len(memory) == 3
    assert await memory.get_many(["k0", "k1", "k2", "k3"]) == [b"v", None, b"v", b"v"]


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


async def test_expired_entries_give_their_bytes_back_when_read() -> None:
    memory = tier("max_items=10")
    await memory.set(write("gone", b"x" * 10, ttl=0.0))
    assert memory.size_bytes == 14
    assert await memory.get("gone") is None
    assert (len(memory), memory.size_bytes) == (0, 0)
