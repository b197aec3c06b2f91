"""The soak: ``python -m bench.soak [--duration 300] [--interval 5]``.

Starts private Redis, memcached and Postgres and one sidecar with four tiers, the memory
tier capped (``memory://?max_items=10000``), then drives a mixed load over many more
distinct keys than the cap (default 200,000, half of them written beforehand: the memory
tier evicts all the time) for ``--duration`` seconds: GETs of keys that may or may not
exist, PUTs write-through and write-behind with random sizes, and DELETEs. Every
``--interval`` seconds it samples the sidecar's RSS (VmRSS) and open file descriptors
(/proc/<pid>/fd).

Verdict: the first third of the run is warm-up (caches, pools and allocator arenas
fill); the run is **flat** when the mean RSS of the last third is within
``max(3 %, 4 MiB)`` of the middle third's, and the mean fd count within 3. A leak of a
few hundred bytes per request would be far outside that; allocator noise is not.

Writes a table to stdout and ``bench/results/soak-<time>.{json,png}``. Load comes from
bench.loadgen (exact status counts: a 404 is a miss, anything 5xx is an error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import loadgen, proc
from bench.run import bulk_set
from tests.servers import MemcachedServer, PostgresServer, RedisServer
from tests.sidecar import Sidecar

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20
# Entries per bulk-set request when filling: 200 x 2 KiB stays under the default 1 MiB
# body limit.
FILL_BATCH = 200

# Verdict tolerances (see the module docstring).
RSS_TOLERANCE_SHARE = 0.03
RSS_TOLERANCE_BYTES = 4 * MiB
FD_TOLERANCE = 3


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss: int  # bytes
    fds: int
    requests: int  # answered since the previous sample
    errors: int  # 5xx and socket errors since the previous sample


def config(redis_url: str, memcached_url: str, postgres_url: str, max_items: int) -> str:
    return f"""
[[tiers]]
name = "l1"
url = "memory://?max_items={max_items}"
ttl = 300

[[tiers]]
name = "l2"
url = "{redis_url}"
ttl = 600

[[tiers]]
name = "l3"
url = "{memcached_url}"
ttl = 900

[[tiers]]
name = "l4"
url = "{postgres_url}"
ttl = 3600

[invalidation]
url = "{redis_url}"
"""


class MixedRequests:
    """Request i of the soak: 80 % GET, 10 % PUT write-through, 8 % PUT write-behind,
    2 % DELETE, over ``keys`` keys, values of 32..2048 bytes."""

    def __init__(self, host: str, keys: int, seed: int = 1) -> None:
        self.host = host
        self.keys = keys
        self.rng = random.Random(seed)
        self.buffer = self.rng.randbytes(2048)

    def __call__(self, i: int) -> bytes:
        rng = self.rng
        path = f"/v1/cache/soak:{rng.randrange(self.keys)}"
        roll = rng.random()
        if roll < 0.80:
            return loadgen.build_request("GET", path, self.host)
        if roll < 0.98:
            strategy = "write-through" if roll < 0.90 else "write-behind"
            body = self.buffer[: rng.randint(32, 2048)]
            return loadgen.build_request("PUT", f"{path}?strategy={strategy}", self.host, body)
        return loadgen.build_request("DELETE", path, self.host)


def fill(url: str, keys: int, seed: int = 2) -> None:
    """Write keys 0..keys-1 with the sizes the load writes (32..2048 bytes), so that what
    the memory tier holds does not drift in size as the load overwrites the fill."""
    rng = random.Random(seed)
    for start in range(0, keys, FILL_BATCH):
        entries = [
            {"key": f"soak:{i}", "value": "x" * rng.randint(32, 2048)}
            for i in range(start, min(keys, start + FILL_BATCH))
        ]
        bulk_set(url + "/v1", entries)


async def drive(
    base: str, pid: int, keys: int, connections: int, duration: float, interval: float
) -> tuple[list[Sample], loadgen.LoadResult]:
    """The load, with a sampler beside it on the same event loop."""
    host, port = base.removeprefix("http://").split(":")
    result = loadgen.LoadResult()
    requests = MixedRequests(f"{host}:{port}", keys)
    load = asyncio.ensure_future(
        loadgen.closed_loop(host, int(port), requests, connections, duration, result=result)
    )
    samples: list[Sample] = []
    started = time.monotonic()
    answered = failed = 0
    while not load.done():
        await asyncio.wait([load], timeout=interval)
        if load.done():
            break  # its connections are closing: not a sample of the load
        now_answered = result.requests
        now_failed = result.socket_errors + sum(
            n for status, n in result.statuses.items() if status >= 500
        )
        sample = Sample(
            t=time.monotonic() - started,
            rss=proc.rss_bytes(pid),
            fds=proc.open_fds(pid),
            requests=now_answered - answered,
            errors=now_failed - failed,
        )
        answered, failed = now_answered, now_failed
        samples.append(sample)
        print(
            f"  {sample.t:6.0f} s  RSS {sample.rss / MiB:7.1f} MiB  fds {sample.fds:4d}  "
            f"{sample.requests:7d} requests  {sample.errors} errors",
            flush=True,
        )
    return samples, load.result()


@dataclass
class Verdict:
    flat: bool
    rss_middle: float
    rss_last: float
    rss_growth: float  # bytes, last third minus middle third
    fds_middle: float
    fds_last: float
    rss_slope_mib_per_min: float  # least squares over the samples after warm-up
    reason: str


def verdict(samples: Sequence[Sample]) -> Verdict:
    """Flat after warm-up: compare the last third of the samples with the middle third."""
    if len(samples) < 6:
        raise ValueError("need at least 6 samples for a verdict; run longer or sample more")
    third = len(samples) // 3
    middle, last = samples[third : 2 * third], samples[2 * third :]
    rss_middle = statistics.fmean(s.rss for s in middle)
    rss_last = statistics.fmean(s.rss for s in last)
    fds_middle = statistics.fmean(s.fds for s in middle)
    fds_last = statistics.fmean(s.fds for s in last)
    growth = rss_last - rss_middle
    allowed = max(RSS_TOLERANCE_SHARE * rss_middle, RSS_TOLERANCE_BYTES)
    after = samples[third:]
    slope = statistics.linear_regression([s.t for s in after], [s.rss for s in after]).slope
    problems = []
    if growth > allowed:
        problems.append(f"RSS grew {growth / MiB:.1f} MiB (allowed {allowed / MiB:.1f})")
    if fds_last - fds_middle > FD_TOLERANCE:
        problems.append(f"fds grew {fds_last - fds_middle:.1f} (allowed {FD_TOLERANCE})")
    return Verdict(
        flat=not problems,
        rss_middle=rss_middle,
        rss_last=rss_last,
        rss_growth=growth,
        fds_middle=fds_middle,
        fds_last=fds_last,
        rss_slope_mib_per_min=slope * 60 / MiB,
        reason="; ".join(problems)
        or (
            f"RSS {growth / MiB:+.1f} MiB (allowed {allowed / MiB:.1f}), "
            f"fds {fds_last - fds_middle:+.1f} (allowed {FD_TOLERANCE})"
        ),
    )


def plot(samples: Sequence[Sample], path: Path, title: str) -> bool:
    plt = proc.pyplot()
    if plt is None:
        return False
    t = [s.t for s in samples]
    warmup_end = samples[len(samples) // 3].t if len(samples) >= 3 else 0
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [s.rss / MiB for s in samples], marker=".", color="tab:blue")
    top.set_ylabel("RSS (MiB)")
    top.set_ylim(0, max(s.rss for s in samples) / MiB * 1.15)
    bottom.plot(t, [s.fds for s in samples], marker=".", color="tab:orange")
    bottom.set_ylabel("open fds")
    bottom.set_ylim(0, max(s.fds for s in samples) * 1.15)
    bottom.set_xlabel("seconds")
    for axis in (top, bottom):
        axis.axvspan(0, warmup_end, color="grey", alpha=0.15, label="warm-up")
    top.legend(loc="lower right")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--keys", type=int, default=200_000, help="distinct keys")
    parser.add_argument("--max-items", type=int, default=10_000, help="memory tier cap")
    parser.add_argument(
        "--fill", type=int, default=100_000, help="keys written before the load (0: none)"
    )
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true", help="do not pin CPUs")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    loadgen._install_uvloop()
    started = dt.datetime.now(dt.UTC)
    cpus = None if args.no_pin else proc.split_cpus()

    with contextlib.ExitStack() as stack:
        if cpus is not None:
            proc.pin(os.getpid(), cpus[0])  # this process and the servers it starts
        redis_server = stack.enter_context(RedisServer())
        memcached = stack.enter_context(MemcachedServer())
        postgres = stack.enter_context(PostgresServer())
        sidecar = stack.enter_context(
            Sidecar(config(redis_server.url, memcached.url, postgres.url, args.max_items))
        )
        if args.fill:
            print(f"filling {args.fill} of the {args.keys} keys ...", flush=True)
            fill(sidecar.url, min(args.fill, args.keys))
        if cpus is not None:
            proc.pin(sidecar.pid, cpus[1])
        print(
            f"soak: {args.duration:g} s of mixed load over {args.keys} keys, memory tier "
            f"capped at {args.max_items} items, sidecar pid {sidecar.pid}",
            flush=True,
        )
        samples, load = asyncio.run(
            drive(
                sidecar.url,
                sidecar.pid,
                args.keys,
                args.connections,
                args.duration,
                args.interval,
            )
        )
        peak = proc.peak_rss_bytes(sidecar.pid)

    result = verdict(samples)
    server_errors = sum(n for status, n in load.statuses.items() if status >= 500)
    machine = proc.machine()
    title = (
        f"soak {started:%Y-%m-%d %H:%M} UTC, {args.duration:g} s, {args.keys} keys, "
        f"memory tier max_items={args.max_items}, {machine['nproc']} x {machine['cpu_model']}"
    )
    print(f"\n{title}\n")
    print(f"{'t (s)':>7}  {'RSS (MiB)':>9}  {'fds':>4}  {'req/s':>7}  {'errors':>6}")
    previous = 0.0
    for sample in samples:
        rate = sample.requests / (sample.t - previous) if sample.t > previous else 0.0
        previous = sample.t
        print(
            f"{sample.t:7.0f}  {sample.rss / MiB:9.1f}  {sample.fds:4d}  {rate:7.0f}  "
            f"{sample.errors:6d}"
        )
    statuses = dict(sorted(load.statuses.items()))
    print(
        f"\nrequests {load.requests:,} ({load.rps:,.0f}/s), statuses {statuses}, "
        f"5xx {server_errors}, socket errors {load.socket_errors}, "
        f"peak RSS {peak / MiB:.1f} MiB"
    )
    print(
        f"RSS middle third {result.rss_middle / MiB:.1f} MiB, last third "
        f"{result.rss_last / MiB:.1f} MiB, slope after warm-up "
        f"{result.rss_slope_mib_per_min:+.2f} MiB/min; fds {result.fds_middle:.1f} -> "
        f"{result.fds_last:.1f}"
    )
    print(f"verdict: {'flat after warm-up' if result.flat else 'NOT flat'} ({result.reason})")

    args.results.mkdir(parents=True, exist_ok=True)
    base = args.results / f"soak-{started:%Y%m%dT%H%M%SZ}"
    document: dict[str, Any] = {
        "date": started.isoformat(),
        "machine": machine,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "samples": [asdict(s) for s in samples],
        "requests": load.requests,
        "rps": load.rps,
        "statuses": {str(k): v for k, v in load.statuses.items()},
        "socket_errors": load.socket_errors,
        "peak_rss_bytes": peak,
        "verdict": asdict(result),
    }
    base.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
    written = [base.with_suffix(".json")]
    if plot(samples, base.with_suffix(".png"), title):
        written.append(base.with_suffix(".png"))
    print("written: " + ", ".join(str(p) for p in written))
    return 0 if result.flat and server_errors == 0 and load.socket_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
