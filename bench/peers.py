"""The two reference servers the bench compares cachesvc with, each a standalone process.

``python -m bench.peers minimal --port P [--value-size N]``
    The floor: aiohttp on uvloop answering ``GET /v1/cache/{key}`` (the same route as
    cachesvc's) with a fixed body of N bytes, with no I/O, no middleware, no headers of
    its own. A service built on aiohttp's web framework cannot beat it.

``python -m bench.peers naive --port P --redis URL``
    What a team would write first: aiohttp on uvloop, one redis-py asyncio GET per request
    (hiredis parser, redis-py's default connection pool), 404 on a miss.

Both answer ``/healthz``, serve ``GET /v1/cache/{key}`` like cachesvc, and log no
access lines (cachesvc does not either).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

import redis.asyncio
import uvloop
from aiohttp import web

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
