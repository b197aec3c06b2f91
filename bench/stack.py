"""A three-tier sidecar to point Locust at: ``python -m bench.stack [--port 8787]``.

Starts private redis-server, memcached and Postgres on free loopback ports (the classes of
tests/servers.py) and ``cachesvc serve`` in front of them with tiers [redis, memcached,
postgres], prints its URL, and runs until Ctrl-C (or ``--duration`` seconds), then stops
everything and deletes its files.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Sequence

from tests.servers import MemcachedServer, PostgresServer, RedisServer
from tests.sidecar import Sidecar


def three_tier_config(redis_url: str, memcached_url: str, postgres_url: str) -> str:
    return f"""
[[tiers]]
name = "l1"
url = "{redis_url}"
ttl = 300

[[tiers]]
name = "l2"
url = "{memcached_url}"
ttl = 3600

[[tiers]]
name = "l3"
url = "{postgres_url}"
ttl = 86400
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stack", description=__doc__)
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    args = parser.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C, so the servers are stopped either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with socket.socket() as probe:
        # As aiohttp binds: connections of an earlier run in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as exc:
            print(f"port {args.port} is taken ({exc.strerror}); pick another with --port")
            return 2
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        memcached = stack.enter_context(MemcachedServer())
        postgres = stack.enter_context(PostgresServer())
        sidecar = Sidecar(three_tier_config(redis_server.url, memcached.url, postgres.url))
        # Sidecar picks a free port; the one asked for is passed as --port instead.
        sidecar.port, sidecar.url = args.port, f"http://127.0.0.1:{args.port}"
        stack.enter_context(sidecar)
        print(f"three-tier sidecar on {sidecar.url} (pid {sidecar.pid}); log {sidecar.log_path}")
        print(f"  l1 {redis_server.url}\n  l2 {memcached.url}\n  l3 {postgres.url}", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        with contextlib.suppress(KeyboardInterrupt):
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
