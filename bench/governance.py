"""What governance costs: sealing and opening a value, writing the audit trail, verifying it.

``python -m bench.governance [--records 100000] [--rounds 5]`` measures, on a private
Postgres (``tests/servers.py``):

- seal and open of a 100 B and a 16 KiB value (AES-256-GCM, ``cachesvc.crypto``), in
  microseconds per call: the median of ``--rounds`` rounds;
- the audit trail's batch writing: records queued at once, written 500 a batch, records
  per second until the last one committed; and ``record_now`` (one record durable before
  it returns), its median time;
- ``verify`` of a chain of ``--records`` records, in seconds.

Everything stays on this machine and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

import asyncpg

from cachesvc.audit import AuditTrail, verify
from cachesvc.crypto import Cipher, Key
from tests.servers import PostgresServer

SIZES = (100, 16 * 1024)


def seal_and_open(rounds: int) -> dict[str, float]:
    cipher = Cipher([Key("k1", os.urandom(32))])
    found: dict[str, float] = {}
    for size in SIZES:
        value = os.urandom(size)
        sealed = cipher.seal("patients", "patient:1", value)
        calls = 20_000 if size < 1024 else 5_000
        seal_times, open_times = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(calls):
                cipher.seal("patients", "patient:1", value)
            seal_times.append((time.perf_counter() - started) / calls)
            started = time.perf_counter()
            for _ in range(calls):
                cipher.open("patients", "patient:1", sealed)
            open_times.append((time.perf_counter() - started) / calls)
        found[f"seal_{size}_bytes_us"] = statistics.median(seal_times) * 1e6
        found[f"open_{size}_bytes_us"] = statistics.median(open_times) * 1e6
    return found


async def audit_costs(url: str, records: int) -> dict[str, float]:
    found: dict[str, float] = {}
    trail = AuditTrail(url, batch=500)
    await trail.start()
    try:
        await trail.record_now("start", actor="bench")  # the table exists, the pool connected
        queued = 20_000
        started = time.perf_counter()
        for n in range(queued):
            trail.record("invalidate", actor="orders-api", namespace="orders", target=f"k:{n}")
        await trail.record_now("invalidate", actor="orders-api", target="last")
        found["audit_batched_records_per_s"] = (queued + 1) / (time.perf_counter() - started)
        waits = []
        for _ in range(200):
            started = time.perf_counter()
            await trail.record_now("erase", actor="admin", target="p:1")
            waits.append(time.perf_counter() - started)
        found["audit_record_now_ms"] = statistics.median(waits) * 1e3
        written = queued + 202
        for n in range(max(0, records - written)):
            trail.record("invalidate", actor="orders-api", target=f"k:{n}")
    finally:
        await trail.close()
    connection = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        verdict = await verify(connection)
        found["verify_seconds"] = time.perf_counter() - started
        found["verified_records"] = verdict.records
        if not verdict.whole:
            raise AssertionError(verdict.message)
    finally:
        await connection.close()
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.governance", description=__doc__)
    parser.add_argument("--records", type=int, default=100_000, help="chain length to verify")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of seal/open timing")
    args = parser.parse_args(argv)
    results = seal_and_open(args.rounds)
    with PostgresServer() as postgres:
        results.update(asyncio.run(audit_costs(postgres.url, args.records)))
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:,.2f}")
    print(json.dumps(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
