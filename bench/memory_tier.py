"""The memory tier's footprint and speed: ``python -m bench.memory_tier [--entries 1000000]``.

Fills one ``MemoryTier`` the way the engine does: keys like ``user:123456``, each payload
the engine's envelope (``cachesvc.envelope.Entry(...).encode()``) of its own random
``--value-size``-byte value, written through ``set_many`` in batches of 1,000. Then:

- **bytes per entry, tracemalloc**: what the fill allocated and is still alive (the key
  strings, the payloads, the tier's tables), divided by the entries; the requested sizes,
  without the allocator's rounding;
- **bytes per entry, RSS**: how much the process's resident set grew, in a process of its
  own that does not trace (tracemalloc's bookkeeping would be counted); the allocator's
  rounding and fragmentation included;
- both again **after churn**: as many reads as entries, at random (each one reorders the
  LRU), and half as many writes of new keys (each evicts the least recently used entry),
  which is where the tables of a long-running tier end up;
- **speed**: nanoseconds per ``get(key)`` and ``get_many([key])`` hit, per ``set`` that
  replaces an entry and per ``set`` of a new key that evicts one, on a full tier of
  ``--speed-entries`` (the default ``max_items``), best of 5 ``timeit`` repeats. The calls
  run to their end as the engine runs them (``cachesvc.slot.finished``): no event loop.

Each measurement runs in a fresh Python process. To compare two revisions, run the same
command on a checkout of each. Results: a table on stdout and
``bench/results/memory-tier-<time>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import random
import subprocess
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import proc
from cachesvc.envelope import DEFAULT_CONTENT_TYPE, Entry
from cachesvc.slot import finished
from tiers.base import TierWrite
from tiers.memory import MemoryTier

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 1000
TTL = 3600.0


def key_of(i: int) -> str:
    """``user:000000`` ... ``user:999999``: keys of 11 characters."""
    return f"user:{i:06d}"


def envelope(value_size: int, version: int) -> bytes:
    return Entry(random.randbytes(value_size), DEFAULT_CONTENT_TYPE, version, None).encode()


def new_tier(entries: int) -> MemoryTier:
    # max_bytes far above what the entries need: only max_items bounds the tier.
    url = urlsplit(f"memory://?max_items={entries}&max_bytes={2**40}")
    return MemoryTier("l1", url, TTL)


def fill(tier: MemoryTier, keys: Iterator[str], count: int, value_size: int) -> None:
    version = time.time_ns() // 1000
    for start in range(0, count, BATCH):
        writes = [
            TierWrite(next(keys), envelope(value_size, version + n), version + n, TTL)
            for n in range(start, min(count, start + BATCH))
        ]
        finished(tier.set_many(writes))


def churn(tier: MemoryTier, entries: int, value_size: int, seed: int = 1) -> None:
    """A read of as many random keys as there are entries, then half as many writes of new
    keys, each of which evicts the least recently used entry: enough for the tier's
    dict to rebuild its table once (it does when its entry array fills; a million
    entries leave room for ~400,000 more), which is where a long-running tier is."""
    rng = random.Random(seed)
    for _ in range(entries):
        finished(tier.get(key_of(rng.randrange(entries))))
    writes = entries // 2
    fill(tier, (key_of(entries + i) for i in range(writes)), writes, value_size)


# -- one measurement per process --------------------------------------------------------------


def footprint(entries: int, value_size: int, traced: bool) -> dict[str, Any]:
    """Bytes per entry after the fill and after the churn, by tracemalloc or by RSS."""
    pid = os.getpid()

    def reading() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0] if traced else proc.rss_bytes(pid)

    if traced:
        tracemalloc.start()
    before = reading()
    tier = new_tier(entries)
    fill(tier, (key_of(i) for i in range(entries)), entries, value_size)
    filled = reading()
    churn(tier, entries, value_size)
    churned = reading()
    assert len(tier) == entries
    return {
        "entries": entries,
        "payload_bytes": len(envelope(value_size, time.time_ns() // 1000)),
        "key_chars": len(key_of(0)),
        "filled": (filled - before) / entries,
        "churned": (churned - before) / entries,
        "size_bytes": tier.size_bytes,
    }


def speed(entries: int, value_size: int) -> dict[str, float]:
    """Nanoseconds per call, best of 5 repeats."""
    tier = new_tier(entries)
    fill(tier, (key_of(i) for i in range(entries)), entries, value_size)
    hit = key_of(entries // 2)
    number = 200_000
    payload = envelope(value_size, 1)
    version = 2**52  # above every version of the fill: each write replaces
    replaces = iter([TierWrite(hit, payload, version + n, TTL) for n in range(5 * number)])
    news = iter([TierWrite(f"new:{n}", payload, version, TTL) for n in range(5 * number)])

    def best(call: Callable[[], object]) -> float:
        runs = timeit.repeat(call, number=number, repeat=5)
        return min(runs) / number * 1e9

    return {
        "get": best(lambda: finished(tier.get(hit))),
        "get_many": best(lambda: finished(tier.get_many([hit]))),
        "set_replace": best(lambda: finished(tier.set(next(replaces)))),
        "set_evict": best(lambda: finished(tier.set(next(news)))),
    }


# -- the run ----------------------------------------------------------------------------------


def in_child(what: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "bench.memory_tier", "--child", what,
        "--entries", str(args.entries), "--value-size", str(args.value_size),
        "--speed-entries", str(args.speed_entries),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=proc.REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stdout}{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def child(what: str, args: argparse.Namespace) -> dict[str, Any]:
    if what == "speed":
        return speed(args.speed_entries, args.value_size)
    return footprint(args.entries, args.value_size, traced=what == "tracemalloc")


def report(results: dict[str, dict[str, Any]]) -> list[str]:
    traced, rss, timing = results["tracemalloc"], results["rss"], results["speed"]
    return [
        f"{traced['entries']:,} entries, keys of {traced['key_chars']} characters, "
        f"payloads of {traced['payload_bytes']} bytes (the envelope of the value)",
        "",
        "bytes per entry   after the fill   after the churn",
        f"tracemalloc       {traced['filled']:>14.1f}   {traced['churned']:>15.1f}",
        f"RSS               {rss['filled']:>14.1f}   {rss['churned']:>15.1f}",
        "",
        "ns per call (best of 5)",
        *(f"  {name:<12} {value:8.1f}" for name, value in timing.items()),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory_tier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value")
    parser.add_argument("--speed-entries", type=int, default=100_000, help="tier size (speed)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=("tracemalloc", "rss", "speed"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    started = dt.datetime.now(dt.UTC)
    results = {}
    for what in ("tracemalloc", "rss", "speed"):
        print(f"measuring {what} ...", flush=True)
        results[what] = in_child(what, args)
    print("\n" + "\n".join(report(results)))
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"memory-tier-{started:%Y%m%dT%H%M%SZ}.json"
    document = {"date": started.isoformat(), "machine": proc.machine(), **results}
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
