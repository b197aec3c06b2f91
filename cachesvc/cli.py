"""The ``cachesvc`` command: serve, check-config, invalidate, dead-letters (SPEC §1)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from cachesvc.config import ConfigError, Settings, load_settings

log = logging.getLogger("cachesvc")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cachesvc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serving = commands.add_parser("serve", help="run the sidecar")
    serving.add_argument("--config", help="TOML config file (default: $CACHESVC_CONFIG)")
    serving.add_argument("--host", help="address to bind (overrides [server].host)")
    serving.add_argument("--port", type=int, help="port to bind (overrides [server].port)")
    serving.add_argument(
        "--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path")

    invalidate = commands.add_parser("invalidate", help="publish an invalidation event")
    invalidate.add_argument("--config", help="TOML config file (default: $CACHESVC_CONFIG)")
    invalidate.add_argument("--key", action="append", default=[], dest="keys")
    invalidate.add_argument("--prefix", action="append", default=[], dest="prefixes")
    invalidate.add_argument("--tag", action="append", default=[], dest="tags")

    dead = commands.add_parser(
        "dead-letters", help="list (or --replay) write-behind writes that could not be applied"
    )
    dead.add_argument("--config", help="TOML config file (default: $CACHESVC_CONFIG)")
    dead.add_argument("--replay", action="store_true", help="move them back into the journal")

    args = parser.parse_args(argv)
    try:
        if args.command == "check-config":
            settings = load_settings(args.path)
            print(f"{args.path}: ok ({len(settings.tiers)} tiers)")
            return 0
        if args.command == "serve":
            if args.workers < 1:
                parser.error("--workers must be at least 1")
            settings = load_settings(
                args.config, overrides={"server.host": args.host, "server.port": args.port}
            )
            return serve(settings, args.workers)
        settings = load_settings(args.config)
        if args.command == "invalidate":
            return publish_invalidation(settings, args.keys, args.prefixes, args.tags)
        return asyncio.run(dead_letters(settings, args.replay))
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
    from cachesvc.logs import JsonFormatter, RequestIdFilter, TextFormatter

    level = getattr(logging, settings.server.log_level.upper())
    handler = logging.StreamHandler()
    json_lines = settings.server.log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def serve(settings: Settings, workers: int) -> int:
    from cachesvc.app import describe_tiers

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
    if workers > 1 and all(tier.is_in_process for tier in settings.tiers):
        print(
            "refusing --workers with in-process tiers only: each worker would hold its own "
            "copy of every entry; add a shared tier (with [invalidation].url) or use one worker",
            file=sys.stderr,
        )
        return 2
    if workers == 1:
        return serve_worker(settings, worker=0)
    return supervise(settings, workers)


def serve_worker(settings: Settings, worker: int) -> int:
    """One event loop serving the app; returns 0 after a graceful SIGTERM/SIGINT."""
    if worker:
        configure_logging(settings)
    loop = _new_event_loop()
    try:
        loop.run_until_complete(_serve(settings, worker))
    finally:
        loop.run_until_complete(_cancel_leftovers())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


async def _cancel_leftovers() -> None:
    """Cancel and await what still runs (a listener's reconnect wait, say), as aiohttp's
    run_app does, so that no task is destroyed pending."""
    leftovers = asyncio.all_tasks() - {asyncio.current_task()}
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


async def _serve(settings: Settings, worker: int) -> None:
    from cachesvc.app import Service

    service = Service(settings, worker)
    await service.start()
    try:
        if worker <= 1:
            server = settings.server
            log.info("serving on http://%s:%d", server.host, service.port)
            if service.ops_port is not None:
                log.info("operations (health, readiness, metrics) on port %d", service.ops_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info(
            "stopping: finishing requests under way (at most %g s)",
            settings.server.shutdown_timeout,
        )
    finally:
        await service.stop()


def supervise(settings: Settings, workers: int) -> int:
    """Run ``workers`` processes on one port (SO_REUSEPORT lets the kernel spread the
    connections); forward SIGTERM/SIGINT to them and exit 0 when they all did."""
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_worker_main, args=(settings, index), name=f"cachesvc-{index}")
        for index in range(1, workers + 1)
    ]
    for child in children:
        child.start()
    stopping = False

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while any(child.is_alive() for child in children):
        for child in children:
            child.join(timeout=0.5)
            if not stopping and child.exitcode not in (None, 0):
                log.error(
                    "worker %s exited with %s; stopping the others", child.name, child.exitcode
                )
                forward(signal.SIGTERM, None)
    return 0 if all(child.exitcode == 0 for child in children) else 1


def _worker_main(settings: Settings, worker: int) -> None:
    # A stop that arrives before the app installed its own handlers finds nothing to
    # finish yet: leave at once, successfully.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(serve_worker(settings, worker))


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
    from invalidation.events import InvalidationEvent
    from invalidation.redis_pubsub import publish

    event = InvalidationEvent(tuple(keys), tuple(prefixes), tuple(tags), sent_at=time.time())
    receivers = asyncio.run(
        publish(settings.invalidation.url, settings.invalidation.channel, event.to_json())
    )
    print(f"published to {settings.invalidation.channel} ({receivers} subscribers)")
    return 0


async def dead_letters(settings: Settings, replay: bool) -> int:
    from cachesvc.app import build_journal
    from cachesvc.metrics import Metrics

    journal = build_journal(settings, Metrics(), worker=0)
    if journal is None:
        print("no write-behind journal configured", file=sys.stderr)
        return 2
    try:
        if replay:
            moved = await journal.replay_dead_letters()
            print(f"replayed {moved} dead letters into {journal.stream}")
            return 0
        entries = await journal.dead_letters(count=1000)
        for entry_id, fields in entries:
            key = fields.get(b"k", b"?").decode(errors="replace")
            reason = fields.get(b"reason", b"").decode(errors="replace")
            print(f"{entry_id.decode()}\t{key}\t{reason}")
        print(f"{len(entries)} dead letters in {journal.dead_stream}", file=sys.stderr)
        return 0
    finally:
        await journal.close()
