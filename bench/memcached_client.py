"""Client CPU per memcached call: the tier's own client against other asyncio clients.

    python -m bench.memcached_client                  # every candidate installed
    python -m bench.memcached_client --rounds 3 --ops 3000 --candidates tier,emcache

Each candidate does what the memcached tier does, through that client's public API only:
a read is one multi-get of versioned blobs, a store batch is one ``gets`` of its keys then
``add``/``cas`` per key (pipelined in one write where the client can; otherwise one command
per key, the batch's commands run concurrently). Measured against a private memcached
(``tests/servers.py``) on uvloop, for batches of 1, 14 and 100 keys of 200-byte payloads:

- ``cpu_us``: this process' CPU time per call (memcached runs in its own process), one call
  at a time and with ``--concurrency`` callers at once;
- ``wall_us``: elapsed time per call, one at a time (noisy on a shared machine).

Candidates: ``tier`` (tiers.memcached, always), ``aiomcache`` and ``emcache`` when installed
(``pip install aiomcache emcache``). Results print as a table and go to
``bench/results/memcached-client-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import itertools
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import uvloop

from tests.servers import MemcachedServer
from tiers.base import TierWrite, pack_versioned, unpack_payload, unpack_version
from tiers.memcached import MemcachedTier, _memcached_key

SIZES = (1, 14, 100)
PAYLOAD = b"p" * 200
PREFIX = "bench:"
VERSION = 1_700_000_000_000_000
TTL = 300.0


class Candidate(Protocol):
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, writes: Sequence[TierWrite]) -> None: ...


def _mkey(key: str) -> bytes:
    # The tier's own key rule (prefix, hashed long keys), so every candidate pays it.
    return _memcached_key(PREFIX, key)


def _version(stored: bytes | None) -> int:
    return -1 if stored is None else unpack_version(stored)


@contextlib.asynccontextmanager
async def tier_candidate(url: str) -> AsyncIterator[Candidate]:
    tier = MemcachedTier("bench", urlsplit(f"{url}?prefix={PREFIX}"), TTL)
    await tier.start()
    try:
        yield tier
    finally:
        await tier.close()


class AiomcacheCandidate:
    """aiomcache's public API: ``multi_get`` reads; ``gets``, ``add`` and ``cas`` are one
    command (one round trip) per key."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        values = await self.client.multi_get(*map(_mkey, keys))
        return [unpack_payload(value) for value in values]

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        pending = list(writes)
        while pending:  # again for those that lost a race with another writer
            done = await asyncio.gather(*map(self._store, pending))
            pending = [write for write, stored in zip(pending, done, strict=True) if not stored]

    async def _store(self, write: TierWrite) -> bool:
        mkey = _mkey(write.key)
        current, token = await self.client.gets(mkey)
        if _version(current) > write.version:
            return True
        blob = pack_versioned(write.version, write.payload)
        if current is None:
            stored: bool = await self.client.add(mkey, blob, exptime=int(write.ttl))
        else:
            stored = await self.client.cas(mkey, blob, token, exptime=int(write.ttl))
        return stored


@contextlib.asynccontextmanager
async def aiomcache_candidate(url: str) -> AsyncIterator[Candidate]:
    import aiomcache

    parsed = urlsplit(url)
    client = aiomcache.Client(parsed.hostname, parsed.port, pool_size=4, pool_minsize=4)
    try:
        yield AiomcacheCandidate(client)
    finally:
        await client.close()


class EmcacheCandidate:
    """emcache's public API: ``get_many``/``gets_many`` read; ``add`` and ``cas`` are one
    command (one round trip) per key. Its own timeout is off: the tier's caller has one."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        mkeys = [_mkey(key) for key in keys]
        items = await self.client.get_many(mkeys)
        return [unpack_payload(item.value) if (item := items.get(m)) else None for m in mkeys]

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        pending = list(writes)
        while pending:  # again for those that lost a race with another writer
            items = await self.client.gets_many([_mkey(w.key) for w in pending])
            done = await asyncio.gather(*(self._store(w, items.get(_mkey(w.key))) for w in pending))
            pending = [write for write, stored in zip(pending, done, strict=True) if not stored]

    async def _store(self, write: TierWrite, item: Any) -> bool:
        import emcache

        if item is not None and _version(item.value) > write.version:
            return True
        blob = pack_versioned(write.version, write.payload)
        mkey = _mkey(write.key)
        try:
            if item is None:
                await self.client.add(mkey, blob, exptime=int(write.ttl))
            else:
                await self.client.cas(mkey, blob, item.cas, exptime=int(write.ttl))
        except emcache.NotStoredStorageCommandError:
            return False
        return True


@contextlib.asynccontextmanager
async def emcache_candidate(url: str) -> AsyncIterator[Candidate]:
    import emcache

    parsed = urlsplit(url)
    assert parsed.hostname is not None and parsed.port is not None
    client = await emcache.create_client(
        [emcache.MemcachedHostAddress(parsed.hostname, parsed.port)],
        timeout=None,
        max_connections=4,
    )
    try:
        yield EmcacheCandidate(client)
    finally:
        await client.close()


CANDIDATES: dict[
    str, tuple[str | None, Callable[[str], contextlib.AbstractAsyncContextManager[Candidate]]]
] = {
    "tier": (None, tier_candidate),
    "aiomcache": ("aiomcache", aiomcache_candidate),
    "emcache": ("emcache", emcache_candidate),
}


async def per_call(
    calls: Callable[[int], Awaitable[None]], ops: int, concurrency: int
) -> tuple[float, float]:
    """(CPU µs, wall µs) per call of ``calls(i)``, ``ops`` calls by ``concurrency`` callers."""

    async def worker(start: int) -> None:
        for i in range(start, ops, concurrency):
            await calls(i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(start) for start in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / ops * 1e6, wall / ops * 1e6


async def measure(candidate: Candidate, ops: int, concurrency: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # Keys of this run only: a key an earlier run stored at a higher version would turn
    # every store into "nothing to do".
    run = uuid.uuid4().hex[:8]
    keys = {size: [f"{run}-k{size}-{i}" for i in range(size)] for size in SIZES}
    for size in SIZES:
        await candidate.set_many([TierWrite(k, PAYLOAD, VERSION, TTL) for k in keys[size]])
        assert await candidate.get_many(keys[size]) == [PAYLOAD] * size, "wrong answer"

    versions = itertools.count(VERSION + 1)  # every store newer than the last: a real cas

    for size in SIZES:
        batch = keys[size]
        scaled = max(200, ops // max(1, size // 7))  # fewer calls for the bigger batches

        async def read(_: int, batch: list[str] = batch) -> None:
            await candidate.get_many(batch)

        async def store(_: int, batch: list[str] = batch) -> None:
            version = next(versions)
            await candidate.set_many([TierWrite(k, PAYLOAD, version, TTL) for k in batch])

        for op, call in (("get", read), ("store", store)):
            await per_call(call, scaled // 10, 1)  # warm-up
            cpu1, wall1 = await per_call(call, scaled, 1)
            cpuc, _ = await per_call(call, scaled, concurrency)
            results[f"{op}-{size}"] = {"cpu_us": cpu1, "wall_us": wall1, "cpu_us_conc": cpuc}
        # The last store wrote every key: reads still answer what was written.
        assert await candidate.get_many(batch) == [PAYLOAD] * size, "wrong answer"
    return results


async def run(names: list[str], rounds: int, ops: int, concurrency: int) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {}
    with MemcachedServer() as server:
        for _ in range(rounds):
            for name in names:
                async with CANDIDATES[name][1](server.url) as candidate:
                    rows.setdefault(name, []).append(await measure(candidate, ops, concurrency))
    # The median of the rounds, per figure.
    return {
        name: {
            op: {figure: statistics.median(r[op][figure] for r in runs) for figure in runs[0][op]}
            for op in runs[0]
        }
        for name, runs in rows.items()
    }


def table(results: dict[str, Any], concurrency: int) -> str:
    ops = list(next(iter(results.values())))
    lines = [
        f"| candidate | call | CPU µs/call | wall µs/call | CPU µs/call, {concurrency} callers |",
        "|---|---|---:|---:|---:|",
    ]
    for op in ops:
        for name, figures in results.items():
            f = figures[op]
            figures_text = f"{f['cpu_us']:.0f} | {f['wall_us']:.0f} | {f['cpu_us_conc']:.0f}"
            lines.append(f"| {name} | {op} | {figures_text} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ops", type=int, default=2000, help="calls per figure (1-key batch)")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    names = []
    for name in args.candidates.split(","):
        module = CANDIDATES[name][0]
        if module is not None and importlib.util.find_spec(module) is None:
            print(f"skipping {name}: pip install {module}")
            continue
        names.append(name)
    results = uvloop.run(run(names, args.rounds, args.ops, args.concurrency))
    print(table(results, args.concurrency))
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memcached-client-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
