"""The ``cachesvc`` command: serve, check-config, invalidate (SPEC §1)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from collections.abc import Sequence

from cachesvc.config import ConfigError, Settings, load_settings

log = logging.getLogger("cachesvc")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cachesvc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the sidecar")
    serve.add_argument("--config", help="TOML config file (default: $CACHESVC_CONFIG)")
    serve.add_argument("--host", help="address to bind (overrides [server].host)")
    serve.add_argument("--port", type=int, help="port to bind (overrides [server].port)")

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path")

    invalidate = commands.add_parser("invalidate", help="publish an invalidation event")
    invalidate.add_argument("--config", help="TOML config file (default: $CACHESVC_CONFIG)")
    invalidate.add_argument("--key", action="append", default=[], dest="keys")
    invalidate.add_argument("--prefix", action="append", default=[], dest="prefixes")
    invalidate.add_argument("--tag", action="append", default=[], dest="tags")

    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            settings = load_settings(args.path)
            print(f"{args.path}: ok ({len(settings.tiers)} tiers)")
            return 0
        if args.command == "serve":
            settings = load_settings(
                args.config, overrides={"server.host": args.host, "server.port": args.port}
            )
            return serve_forever(settings)
        settings = load_settings(args.config)
        return publish_invalidation(settings, args.keys, args.prefixes, args.tags)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configure_logging(settings: Settings) -> None:
    level = getattr(logging, settings.server.log_level.upper())
    handler = logging.StreamHandler()
    if settings.server.log_format == "json":
        from cachesvc.logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def serve_forever(settings: Settings) -> int:
    from aiohttp import web

    from cachesvc.app import create_app, describe_tiers

    configure_logging(settings)
    server = settings.server
    if not is_loopback(server.host) and server.auth_token is None:
        print(
            f"refusing to bind {server.host}: a non-loopback address needs an auth token "
            "(set CACHESVC_AUTH_TOKEN or [server].auth_token), see SPEC §5",
            file=sys.stderr,
        )
        return 2
    kind = "embedded default" if settings.is_embedded_default else "configured"
    log.info("tiers (%s): %s", kind, describe_tiers(settings.tiers))
    loop = _new_event_loop()
    web.run_app(
        create_app(settings),
        host=server.host,
        port=server.port,
        access_log=logging.getLogger("cachesvc.access") if server.access_log else None,
        shutdown_timeout=server.shutdown_timeout,
        print=lambda message: log.info("%s", message.strip()),
        loop=loop,
    )
    return 0


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows); asyncio's loop works
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def publish_invalidation(
    settings: Settings, keys: list[str], prefixes: list[str], tags: list[str]
) -> int:
    if not (keys or prefixes or tags):
        print("nothing to invalidate: give --key, --prefix or --tag", file=sys.stderr)
        return 2
    if settings.invalidation.url is None:
        print("no [invalidation].url configured to publish to", file=sys.stderr)
        return 2
    import time

    from invalidation.events import InvalidationEvent
    from invalidation.redis_pubsub import publish

    event = InvalidationEvent(tuple(keys), tuple(prefixes), tuple(tags), sent_at=time.time())
    receivers = asyncio.run(
        publish(settings.invalidation.url, settings.invalidation.channel, event.to_json())
    )
    print(f"published to {settings.invalidation.channel} ({receivers} subscribers)")
    return 0
