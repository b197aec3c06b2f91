"""Durable invalidation sources: how long from the change to the sink call, and what the
Postgres slot polling costs.

``python -m bench.sources [--samples 300] [--load-seconds 10]`` starts a private
redis-server and a private Postgres with wal_level=logical, then:

- Redis Stream: for each sample, ``append`` one event and time until the listener's
  ``on_event`` and ``on_shared`` returned;
- Postgres logical decoding: for each sample, commit one UPDATE and time until
  ``originate`` returned;
- the CPU seconds per second of the slot reader's server backend and of this process,
  idle and while another connection commits small writes to an unrelated table (the
  durable tier's own writes, which the reader must decode and skip), over
  ``--load-seconds`` each.

Loopback only, bounded by --samples and --load-seconds. Figures are printed, not checked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from invalidation.events import InvalidationEvent, MalformedEvent
from invalidation.postgres_wal import PostgresWalListener, TableSpec
from invalidation.redis_stream import MaxLength, RedisStreamListener, append
from tests.servers import PostgresServer, RedisServer

_TICKS = os.sysconf("SC_CLK_TCK")


class TimingSink:
    """Resolves the future waiting for an event's first key when a call returns."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[str, str], asyncio.Future[float]] = {}

    def expect(self, kind: str, key: str) -> asyncio.Future[float]:
        future = asyncio.get_running_loop().create_future()
        self.waiting[kind, key] = future
        return future

    def _done(self, kind: str, event: InvalidationEvent) -> None:
        for key in event.keys:
            future = self.waiting.pop((kind, key), None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

    async def on_event(self, event: InvalidationEvent, source: str) -> None:
        self._done("event", event)

    async def on_shared(self, event: InvalidationEvent, source: str) -> None:
        self._done("shared", event)

    async def originate(self, event: InvalidationEvent, source: str) -> None:
        self._done("originate", event)

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None:
        raise AssertionError(f"malformed: {raw!r}")

    async def on_gap(self, source: str, lost: bool = True) -> None:
        self.waiting.pop(("gap", source), asyncio.Future()).set_result(time.perf_counter())

    def on_disconnect(self, source: str) -> None:
        pass


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(1000 * value for value in seconds)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return (
        f"{name:<34} n={len(ms):<4} p50 {statistics.median(ms):6.2f} ms"
        f"  p99 {p99:6.2f} ms  max {ms[-1]:6.2f} ms"
    )


async def redis_stream(url: str, samples: int) -> None:
    sink = TimingSink()
    listener = RedisStreamListener(url, "bench:invalidate", "bench-sidecar")
    started = sink.expect("gap", listener.source)
    task = asyncio.create_task(listener.run(sink))
    client = Redis.from_url(url)
    try:
        await asyncio.wait_for(started, 10)
        to_event, to_shared = [], []
        for n in range(samples):
            key = f"k{n}"
            event, shared = sink.expect("event", key), sink.expect("shared", key)
            appended = time.perf_counter()
            await append(
                client, "bench:invalidate", InvalidationEvent(keys=(key,)), MaxLength(10_000)
            )
            to_event.append(await asyncio.wait_for(event, 5) - appended)
            to_shared.append(await asyncio.wait_for(shared, 5) - appended)
        print(summary("redis stream: XADD -> on_event", to_event))
        print(summary("redis stream: XADD -> on_shared", to_shared))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


async def postgres_wal(
    url: str, pgbench: Path, samples: int, load_seconds: float, poll_interval: float
) -> None:
    db = await asyncpg.connect(url)
    await db.execute(
        "CREATE TABLE IF NOT EXISTS bench_users (id int PRIMARY KEY, v int);"
        "CREATE TABLE IF NOT EXISTS bench_other (id int PRIMARY KEY, v text);"
        "INSERT INTO bench_users SELECT i, 0 FROM generate_series(0, 9999) i ON CONFLICT DO NOTHING"
    )
    sink = TimingSink()
    listener = PostgresWalListener(
        url,
        [TableSpec.parse("bench_users", ["user:{id}"])],
        slot="bench_slot",
        publication="bench_pub",
        poll_interval=poll_interval,
    )
    started = sink.expect("gap", listener.source)
    task = asyncio.create_task(listener.run(sink))
    try:
        await asyncio.wait_for(started, 30)
        latencies = []
        for n in range(samples):
            # At a random moment of the poll cycle, as changes come: not right after a poll.
            await asyncio.sleep(random.uniform(0, poll_interval))
            done = sink.expect("originate", f"user:{n}")
            committed = time.perf_counter()
            await db.execute("UPDATE bench_users SET v = v + 1 WHERE id = $1", n)
            latencies.append(await asyncio.wait_for(done, 5) - committed)
        print(summary(f"postgres wal (poll {poll_interval}s): commit -> originate", latencies))
        backend = await db.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
        for load in (False, True):
            writes = write_load(pgbench, url, load_seconds) if load else None
            server_before, own_before = cpu_seconds(backend), time.process_time()
            await asyncio.sleep(load_seconds)
            server = (cpu_seconds(backend) - server_before) / load_seconds
            own = (time.process_time() - own_before) / load_seconds
            commits = ""
            if writes is not None:
                assert writes.stdout is not None
                out = await asyncio.to_thread(writes.stdout.read)
                writes.wait()
                commits = f", {_transactions(out)} unrelated commits"
            print(
                f"  {'unrelated writes' if load else 'idle'}: slot reader backend"
                f" {server * 100:5.1f} % of a core, this process {own * 100:5.1f} %{commits}"
            )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # The reader's backend ends a moment after its connection: wait for the slot.
        for _ in range(500):
            if not await db.fetchval(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'bench_slot'"
            ):
                break
            await asyncio.sleep(0.01)
        await db.execute(
            "SELECT pg_drop_replication_slot('bench_slot') FROM pg_replication_slots"
            " WHERE slot_name = 'bench_slot'"
        )
        await db.close()


WRITE_SCRIPT = (
    "\\set id random(1, 10000)\n"
    "INSERT INTO bench_other VALUES (:id, repeat('x', 200))"
    " ON CONFLICT (id) DO UPDATE SET v = excluded.v;\n"
)


def write_load(pgbench: Path, url: str, seconds: float) -> subprocess.Popen[str]:
    """Small commits to a table nobody publishes, from one pgbench client (another
    process, so that its CPU is not counted as this one's); the script comes on stdin."""
    writer = subprocess.Popen(
        [str(pgbench), "-n", "-c", "1", "-T", str(max(1, round(seconds))), "-f", "/dev/stdin", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert writer.stdin is not None
    writer.stdin.write(WRITE_SCRIPT)
    writer.stdin.close()
    return writer


def _transactions(pgbench_output: str) -> str:
    for line in pgbench_output.splitlines():
        if line.startswith("number of transactions actually processed"):
            return line.rpartition(":")[2].strip()
    return "? (pgbench: " + pgbench_output.strip()[-200:] + ")"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sources", description=__doc__)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    args = parser.parse_args(argv)
    with RedisServer() as redis_server, PostgresServer(logical_decoding=True) as postgres:
        asyncio.run(redis_stream(redis_server.url, args.samples))
        pgbench = postgres.bindir / "pgbench"
        asyncio.run(
            postgres_wal(postgres.url, pgbench, args.samples, args.load_seconds, args.poll_interval)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
