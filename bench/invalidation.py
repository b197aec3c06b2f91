"""Invalidation latency: publish an event, time until a GET answers 404.

``python -m bench.invalidation [--samples 300]`` starts a private redis-server and
Postgres, a sidecar with tiers [memory, postgres] subscribed to the Redis channel, then
for each sample: PUT a key, GET it (now cached in the in-process tier), PUBLISH
``{"keys": [key]}`` from a separate client and GET in a tight loop until the answer is
404. The time from PUBLISH to that 404 is what an application sees; the sidecar's own
``cachesvc_invalidation_latency_seconds`` (publish timestamp to applied) is printed
beside it. Loopback only, bounded by --samples.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence

import aiohttp
from redis.asyncio import Redis

from tests.servers import PostgresServer, RedisServer
from tests.sidecar import Sidecar, tiers_config


async def measure(sidecar_url: str, redis_url: str, samples: int) -> list[float]:
    latencies = []
    redis = Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:
        for n in range(samples):
            url = f"{sidecar_url}/v1/cache/inv-{n}"
            async with session.put(url, data=b"v") as response:
                assert response.status == 204
            async with session.get(url) as response:
                assert response.status == 200
            started = time.perf_counter()
            event = {"keys": [f"inv-{n}"], "sent_at": time.time()}
            await redis.publish("cachesvc:invalidate", json.dumps(event))
            while True:
                async with session.get(url) as response:
                    if response.status == 404:
                        break
                if time.perf_counter() - started > 1.0:
                    raise AssertionError(f"inv-{n} still served 1 s after the event")
            latencies.append(time.perf_counter() - started)
    await redis.aclose()
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.invalidation", description=__doc__)
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args(argv)
    with RedisServer() as redis_server, PostgresServer() as postgres:
        config = tiers_config("memory://", postgres.url) + (
            f'[invalidation]\nurl = "{redis_server.url}"\n'
        )
        with Sidecar(config) as sidecar:
            latencies = asyncio.run(measure(sidecar.url, redis_server.url, args.samples))
            metrics = asyncio.run(scrape(sidecar.url))
    ms = [1000 * latency for latency in latencies]
    print(f"publish -> GET 404, {len(ms)} samples (ms):")
    print(
        f"  p50 {percentile(ms, 0.5):.2f}  p90 {percentile(ms, 0.9):.2f}  "
        f"p99 {percentile(ms, 0.99):.2f}  max {max(ms):.2f}  mean {statistics.mean(ms):.2f}"
    )
    print("sidecar's own histogram (sent_at -> applied):")
    for line in metrics.splitlines():
        if line.startswith("cachesvc_invalidation_latency_seconds_bucket"):
            print("  " + line)
    return 0


async def scrape(sidecar_url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{sidecar_url}/metrics") as r:
        return await r.text()


if __name__ == "__main__":
    sys.exit(main())
