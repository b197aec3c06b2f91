"""This checkout against another, side by side: ``python -m bench.ab OTHER [--scenario put-wb]``.

What it is for: telling whether a change makes a path cheaper when the machine's own speed
drifts by more than the change. Two runs of ``bench.run`` one after the other measure each
version in a different minute; here both sidecars run at once over the same backends and
the load alternates between them (A B, then B A), so that drift falls on both alike, and
each round gives a ratio of its own.

OTHER is a checkout of the version to compare with (``git worktree add /tmp/base HEAD~1``);
its sidecar runs from there with this checkout's Python and packages. Both are three-tier
sidecars (tiers [redis, memcached, postgres], bench/stack.py's) on private servers, each
with its own Redis database (its own keys and write-behind journal), pinned to the last
CPU (only one is under load at a time); the load generator and the servers share the
others.

Each round, for each sidecar: a closed loop at ``--connections`` for ``--duration`` seconds
(requests/s, and the sidecar's CPU per request, the write-behind journal's drain
included), then an open loop at ``--rate`` requests/s for ``--duration`` seconds (CPU per
request: what a pod's sidecar pays). It prints each round and, last, the medians and the
ratio this/other of each round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen, proc
from bench.run import keys_within_budget, pinned, wait_journal_drained
from bench.stack import three_tier_config
from tests.servers import MemcachedServer, PostgresServer, RedisServer
from tests.sidecar import Sidecar

# scenario -> (method, query): every one reads or writes values of --value-size bytes (256
# by default) of 10,000 keys (fewer for large values: FILL_BUDGET bytes in all), on the
# three-tier sidecar but "get-memory", an L1 hit of the embedded default (memory://).
SCENARIOS = {
    "get-l1": ("GET", ""),
    "get-memory": ("GET", ""),
    "put-wt": ("PUT", "strategy=write-through"),
    "put-wb": ("PUT", "strategy=write-behind"),
}
KEYS = 10_000


@dataclass
class Round:
    rate: float  # requests/s in the closed loop
    busy_cpu_us: float  # CPU per request in the closed loop (drain included)
    steady_cpu_us: float  # CPU per request in the open loop
    failed: int


async def measure(
    sidecar: Sidecar, name: str, scenario: str, args: argparse.Namespace, turn: int
) -> Round:
    method, query = SCENARIOS[scenario]
    requests = loadgen.key_requests(
        f"{sidecar.url}/v1/cache/{name}:",
        keys_within_budget(KEYS, args.value_size),
        method,
        b"v" * args.value_size if method == "PUT" else None,
        query,
        offset=turn * 997,  # each round from another key on
    )

    def cpu_since(before: float, answered: int) -> float:
        """CPU per request since ``before``, a write-behind journal's drain included."""
        if scenario == "put-wb" and wait_journal_drained(sidecar.url, timeout=60) is None:
            raise RuntimeError(f"{name}: the write-behind journal did not drain in 60 s")
        return (proc.cpu_seconds(sidecar.pid) - before) / max(1, answered) * 1e6

    before = proc.cpu_seconds(sidecar.pid)
    busy = await loadgen.closed_loop(
        "127.0.0.1", sidecar.port, requests, args.connections, args.duration
    )
    busy_cpu = cpu_since(before, busy.requests)
    pool = loadgen.HttpPool("127.0.0.1", sidecar.port)
    try:
        before = proc.cpu_seconds(sidecar.pid)
        steady = await loadgen.open_loop(
            lambda i: pool.request(requests[i % len(requests)]), args.rate, args.duration
        )
        steady_cpu = cpu_since(before, steady.requests)
    finally:
        pool.close()
    return Round(busy.rps, busy_cpu, steady_cpu, busy.errors + steady.errors)


def report(name: str, rounds: Sequence[Round]) -> str:
    return (
        f"{name}: {statistics.median(r.rate for r in rounds):,.0f} req/s, "
        f"{statistics.median(r.busy_cpu_us for r in rounds):.1f} us CPU per request at "
        f"saturation, {statistics.median(r.steady_cpu_us for r in rounds):.1f} us at the "
        f"fixed rate (medians of {len(rounds)} rounds)"
    )


def ratios(this: Sequence[Round], other: Sequence[Round], field: str) -> str:
    per_round = [getattr(a, field) / getattr(b, field) for a, b in zip(this, other, strict=True)]
    listed = " ".join(f"{ratio:.2f}" for ratio in per_round)
    return f"{statistics.median(per_round):.2f}x (rounds: {listed})"


async def compare(other: Path, args: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        pin = stack.enter_context(pinned(proc.split_cpus()))
        redis = stack.enter_context(RedisServer())
        memcached = stack.enter_context(MemcachedServer())
        postgres = stack.enter_context(PostgresServer())
        sidecars = {
            name: stack.enter_context(
                Sidecar(
                    None
                    if args.scenario == "get-memory"
                    else three_tier_config(
                        f"redis://127.0.0.1:{redis.port}/{db}", memcached.url, postgres.url
                    ),
                    cwd=tree,
                )
            )
            for name, db, tree in (("this", 1, None), ("other", 2, other))
        }
        for sidecar in sidecars.values():
            pin(sidecar.pid)
        if SCENARIOS[args.scenario][0] == "GET":  # every key there to be read
            keys, value = keys_within_budget(KEYS, args.value_size), b"v" * args.value_size
            for name, sidecar in sidecars.items():
                fill = loadgen.key_requests(f"{sidecar.url}/v1/cache/{name}:", keys, "PUT", value)
                await loadgen.closed_loop("127.0.0.1", sidecar.port, fill, 32, total=keys)
        rounds: dict[str, list[Round]] = {"this": [], "other": []}
        for turn in range(args.rounds):
            order = ("this", "other") if turn % 2 == 0 else ("other", "this")
            for name in order:
                done = await measure(sidecars[name], name, args.scenario, args, turn)
                rounds[name].append(done)
                print(
                    f"round {turn + 1} {name:5}: {done.rate:8,.0f} req/s  "
                    f"{done.busy_cpu_us:6.1f} us/request busy  "
                    f"{done.steady_cpu_us:6.1f} us/request at {args.rate:,.0f}/s  "
                    f"errors {done.failed}",
                    flush=True,
                )
    print(report("this ", rounds["this"]))
    print(report("other", rounds["other"]))
    print("this/other req/s:           ", ratios(rounds["this"], rounds["other"], "rate"))
    print("this/other CPU, saturation: ", ratios(rounds["this"], rounds["other"], "busy_cpu_us"))
    print("this/other CPU, fixed rate: ", ratios(rounds["this"], rounds["other"], "steady_cpu_us"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("other", type=Path, help="a checkout of the version to compare with")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="put-wb")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per loop")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop requests/s")
    parser.add_argument("--value-size", type=int, default=256, help="bytes per value")
    args = parser.parse_args(argv)
    if not (args.other / "cachesvc" / "__main__.py").exists():
        parser.error(f"{args.other} is not a checkout of cachesvc")
    asyncio.run(compare(args.other.resolve(), args))
    return 0


if __name__ == "__main__":
    loadgen._install_uvloop()  # as the sidecars run: the load generator's own cost down
    sys.exit(main())
