"""The reference servers the bench compares cachesvc with, each a standalone process.

``python -m bench.peers minimal --port P [--value-size N]``
    The floor: aiohttp on uvloop answering ``GET /v1/cache/{key}`` (the same route as
    cachesvc's) with a fixed body of N bytes, with no I/O, no middleware, no headers of
    its own. A service built on aiohttp's web framework cannot beat it.

``python -m bench.peers naive --port P --redis URL``
    What a team would write first: aiohttp on uvloop, one redis-py asyncio GET per request
    (hiredis parser, redis-py's default connection pool), 404 on a miss.

Both answer ``/healthz``, serve ``GET /v1/cache/{key}`` like cachesvc, and log no
access lines (cachesvc does not either).

``Webdis(redis_port)``
    webdis (https://github.com/nicolasff/webdis, Debian's ``webdis`` package), a C HTTP
    front for Redis on libevent and hiredis, in front of the bench's Redis: what a
    Redis read over HTTP costs without Python. ``GET /GET/<key>?type=...`` answers the
    raw value with that content type (``.txt`` or no suffix would answer JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import redis.asyncio
import uvloop
from aiohttp import web

from tests.servers import LOOPBACK, Server, ServerError

CLIENT = web.AppKey("client", redis.asyncio.Redis)


def minimal_app(value_size: int) -> web.Application:
    body = b"x" * value_size

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/v1/cache/{key}", handler)
    app.router.add_get("/healthz", handler)
    return app


def naive_app(redis_url: str) -> web.Application:
    async def get(request: web.Request) -> web.Response:
        value = await request.app[CLIENT].get(request.match_info["key"])
        if value is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.Response(body=value)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def client(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = redis.asyncio.Redis.from_url(redis_url)
        yield
        await app[CLIENT].aclose()

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_get("/v1/cache/{key}", get)
    app.router.add_get("/healthz", healthz)
    return app


def webdis_config(
    redis_port: int, http_port: int, log_path: Path, threads: int = 1
) -> dict[str, object]:
    """webdis.json for a private webdis in front of the Redis on ``redis_port`` (database
    0), in the foreground, logging errors only (cachesvc logs no access lines either).
    One worker thread: like every server under test it is pinned to one CPU, where more
    threads would only take turns."""
    return {
        "redis_host": LOOPBACK,
        "redis_port": redis_port,
        "http_host": LOOPBACK,
        "http_port": http_port,
        "threads": threads,
        "database": 0,
        "daemonize": False,
        "verbosity": 0,
        "logfile": str(log_path),
    }


class Webdis(Server):
    """webdis on a free loopback port, started and cleaned up like tests/servers.py's."""

    name = "webdis"

    def __init__(self, redis_port: int, threads: int = 1) -> None:
        super().__init__()
        self.redis_port = redis_port
        self.threads = threads
        self.config_path = self.dir / "webdis.json"

    @staticmethod
    def available() -> str | None:
        return shutil.which("webdis")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        binary = self.available()
        if binary is None:
            raise ServerError("webdis not found: apt-get install webdis")
        # Written here, not in _prepare: a start retried on another port rewrites it.
        config = webdis_config(self.redis_port, self.port, self.log_path, self.threads)
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        return [binary, str(self.config_path)]

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/PING", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("kind", choices=("minimal", "naive"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--value-size", type=int, default=256, help="minimal: body bytes")
    parser.add_argument("--redis", help="naive: redis://host:port/db")
    args = parser.parse_args(argv)
    if args.kind == "naive":
        if not args.redis:
            parser.error("naive needs --redis URL")
        app = naive_app(args.redis)
    else:
        app = minimal_app(args.value_size)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
