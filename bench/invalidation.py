"""Invalidation latency: publish an event, time until a GET answers 404 at every sidecar.

``python -m bench.invalidation [--samples 300] [--sidecars 8]`` starts a private
redis-server and Postgres, the sidecars with tiers [memory, postgres] subscribed to the
Redis channel, then for each sample: PUT a key, GET it from every sidecar (now cached in
each one's in-process tier), PUBLISH ``{"keys": [key]}`` from a separate client and GET
from every sidecar in tight loops until each answers 404. The time from PUBLISH to the
last sidecar's 404 is the fan-out latency; the first sidecar's own
``cachesvc_invalidation_latency_seconds`` (publish timestamp to applied) is printed beside
it. Loopback only, bounded by --samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Sequence

import aiohttp
from redis.asyncio import Redis

from tests.servers import PostgresServer, RedisServer
from tests.sidecar import Sidecar, tiers_config


async def measure(sidecar_urls: list[str], redis_url: str, samples: int) -> list[float]:
    latencies = []
    redis = Redis.from_url(redis_url)
    async with aiohttp.ClientSession() as session:

        async def until_gone(url: str, started: float) -> None:
            while True:
                async with session.get(url) as response:
                    if response.status == 404:
                        return
                if time.perf_counter() - started > 1.0:
                    raise AssertionError(f"{url} still served 1 s after the event")

        for n in range(samples):
            key = f"inv-{n}"
            async with session.put(f"{sidecar_urls[0]}/v1/cache/{key}", data=b"v") as response:
                assert response.status == 204
            for sidecar in sidecar_urls:
                async with session.get(f"{sidecar}/v1/cache/{key}") as response:
                    assert response.status == 200
            started = time.perf_counter()
            event = {"keys": [key], "sent_at": time.time()}
            await redis.publish("cachesvc:invalidate", json.dumps(event))
            await asyncio.gather(
                *(until_gone(f"{sidecar}/v1/cache/{key}", started) for sidecar in sidecar_urls)
            )
            latencies.append(time.perf_counter() - started)
    await redis.aclose()
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.invalidation", description=__doc__)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--sidecars", type=int, default=1, help="subscribed sidecars")
    args = parser.parse_args(argv)
    with RedisServer() as redis_server, PostgresServer() as postgres:
        config = tiers_config("memory://", postgres.url) + (
            f'[invalidation]\nurl = "{redis_server.url}"\n'
        )
        with contextlib.ExitStack() as stack:
            sidecars = [stack.enter_context(Sidecar(config)) for _ in range(args.sidecars)]
            urls = [sidecar.url for sidecar in sidecars]
            latencies = asyncio.run(measure(urls, redis_server.url, args.samples))
            metrics = asyncio.run(scrape(urls[0]))
    ms = [1000 * latency for latency in latencies]
    print(f"publish -> GET 404 at all {args.sidecars} sidecars, {len(ms)} samples (ms):")
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
