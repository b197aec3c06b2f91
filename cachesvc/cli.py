"""The ``cachesvc`` command: serve, check-config, invalidate, dead-letters, audit."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import ipaddress
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cachesvc.config import (
    POSTGRES_SCHEMES,
    REDIS_SCHEMES,
    ConfigError,
    Settings,
    load_settings,
)
from cachesvc.heap import keep_for_reuse
from cachesvc.metrics import package_version

if TYPE_CHECKING:
    from cachesvc.slot import Slot, TierSlot

log = logging.getLogger("cachesvc")

DESCRIPTION = """\
cachesvc is a caching sidecar: applications call it over HTTP on localhost, and it keeps
their entries in ordered cache tiers (in-process memory, Redis, Memcached, Postgres) behind
one small API: get, set, delete, bulk and invalidate.
"""
EPILOG = """\
Run "cachesvc COMMAND --help" for a command's options. The configuration, the HTTP API and
the invalidation events are described in the docs/ directory of the source repository; a
running sidecar serves its API description at /openapi.json.
"""
SERVE_DESCRIPTION = """\
Run the sidecar until SIGTERM or SIGINT, which finish the requests under way and drain the
write-behind journal (within [server].shutdown_timeout and [write].drain_timeout), then
exit 0.

Without a config file (neither --config nor CACHESVC_CONFIG) it serves the embedded
default: one in-process memory tier named l1, on 127.0.0.1:8787, with no server needed.

Every config key can also be set from the environment: CACHESVC_ and the key's path in
capitals, with __ between levels. They apply on top of the file (or of the embedded
default), and --host and --port apply last:

  CACHESVC_SERVER__PORT=9000           [server] port
  CACHESVC_TIERS__0__TTL=60            ttl of the first [[tiers]] entry
  CACHESVC_TIERS__0__URL=redis://127.0.0.1:6379/0
                                       the first tier's url (without a file: the embedded l1's)
  CACHESVC_TIERS='[{"url": "memory://"}, {"url": "redis://127.0.0.1:6379/0"}]'
                                       the whole tier list, as JSON
  CACHESVC_AUTH_TOKEN=...              [server] auth_token
"""
CHECK_DESCRIPTION = """\
Validate a config file, with the CACHESVC_ environment variables applied on top of it as
"serve" would. Exit 0 when it is valid; otherwise print one line per problem, naming the
field (e.g. "tiers[1].url: unknown scheme 'bogus'"), and exit 2. No server is contacted.
"""
INVALIDATE_DESCRIPTION = """\
Publish an invalidation event on [invalidation].url and channel, as a publisher service
would: every sidecar subscribed to the channel removes the matching entries from every
tier. --key, --prefix and --tag may each be given several times; at least one is needed.
"""
DEAD_LETTERS_DESCRIPTION = """\
Write-behind writes that the durable tier refused [write].max_attempts times (or that
could not be read) are moved from the journal to a dead-letter stream,
<journal_stream>:dead. This command lists them, one a line: journal entry id, key, why it
was refused. With --replay it moves them back into the journal, to be applied again once
the cause is fixed.
"""
AUDIT_DESCRIPTION = """\
The audit trail: invalidations, erasures, refused requests (401 and 403, one record per
token and minute), and the sidecars' starts and stops, in the table cachesvc_audit of the
durable tier's Postgres database. Each record is chained to the one before it by a
SHA-256 hash, so that a record changed or removed is found.
"""
AUDIT_LIST_DESCRIPTION = """\
Print the audit records in their order, one JSON object a line.
"""
AUDIT_VERIFY_DESCRIPTION = """\
Check the audit trail's hash chain from its oldest record. Exit 0 when it is whole (and
print its head's hash: keep it elsewhere, since removing the newest records leaves no
trace in the chain itself); exit 1 naming the first record that was changed or removed;
exit 2 when it cannot be read.
"""
SERVE_CONFIG_HELP = "TOML config file (default: $CACHESVC_CONFIG; neither: the embedded default)"
CONFIG_HELP = "TOML config file (default: $CACHESVC_CONFIG)"


class CannotListen(Exception):
    """The sidecar cannot open its listening socket; the message says why in one line."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
            return publish_invalidation(
                settings, args.keys, args.prefixes, args.tags, args.namespace
            )
        if args.command == "audit":
            return asyncio.run(audit(settings, args))
        return asyncio.run(dead_letters(settings, args.replay))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"cachesvc: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="cachesvc", description=DESCRIPTION, epilog=EPILOG, formatter_class=formatter
    )
    parser.add_argument("--version", action="version", version=f"cachesvc {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serving = commands.add_parser(
        "serve", help="run the sidecar", description=SERVE_DESCRIPTION, formatter_class=formatter
    )
    serving.add_argument("--config", metavar="PATH", help=SERVE_CONFIG_HELP)
    serving.add_argument("--host", help="address to bind (overrides [server].host)")
    serving.add_argument("--port", type=int, help="port to bind (overrides [server].port)")
    serving.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes serving the same port (SO_REUSEPORT), each with its own memory "
        "tier (default: 1)",
    )

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description=CHECK_DESCRIPTION,
        formatter_class=formatter,
    )
    check.add_argument("path", metavar="PATH", help="the TOML config file")

    invalidate = commands.add_parser(
        "invalidate",
        help="publish an invalidation event to every sidecar",
        usage="cachesvc invalidate [-h] [--config PATH] [--namespace NS] [--key K]... "
        "[--prefix P]... [--tag T]...",
        description=INVALIDATE_DESCRIPTION,
        formatter_class=formatter,
    )
    invalidate.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    invalidate.add_argument(
        "--namespace",
        default="default",
        metavar="NS",
        help="the namespace of the keys, prefixes and tags (default: default)",
    )
    repeatable = (
        ("--key", "keys", "K", "remove the key K (repeat for more keys)"),
        ("--prefix", "prefixes", "P", "remove every key that starts with P (repeat for more)"),
        ("--tag", "tags", "T", "remove every entry stored with the tag T (repeat for more)"),
    )
    for flag, dest, metavar, text in repeatable:
        invalidate.add_argument(
            flag, action="append", default=[], dest=dest, metavar=metavar, help=text
        )

    dead = commands.add_parser(
        "dead-letters",
        help="list, or replay, the write-behind writes the durable tier kept refusing",
        description=DEAD_LETTERS_DESCRIPTION,
        formatter_class=formatter,
    )
    dead.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    dead.add_argument(
        "--replay", action="store_true", help="move every dead letter back into the journal"
    )
    trail = commands.add_parser(
        "audit",
        help="list or verify the audit trail",
        description=AUDIT_DESCRIPTION,
        formatter_class=formatter,
    )
    actions = trail.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="print the records, one JSON object a line",
        description=AUDIT_LIST_DESCRIPTION,
        formatter_class=formatter,
    )
    listing.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    listing.add_argument(
        "--since",
        metavar="ISO-TIME",
        type=iso_time,
        help="only records at or after this time (e.g. 2025-06-01T00:00:00Z; without a zone: UTC)",
    )
    listing.add_argument("--namespace", metavar="NS", help="only the records of namespace NS")
    checking = actions.add_parser(
        "verify",
        help="check that no record was changed or removed",
        description=AUDIT_VERIFY_DESCRIPTION,
        formatter_class=formatter,
    )
    checking.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    return parser


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
    from cachesvc.access import build_access
    from cachesvc.app import describe_tiers
    from cachesvc.namespaces import build_ciphers

    configure_logging(settings)
    server = settings.server
    # Every token's secret is at hand (ConfigError names a secret_env that is not set).
    access = build_access(settings, os.environ, time.perf_counter())
    # And every encrypted namespace's keys (ConfigError names an encryption_keys_env).
    build_ciphers(settings, os.environ)
    if not is_loopback(server.host) and access is None:
        print(
            f"refusing to bind {server.host}: a non-loopback address needs an auth token "
            "(set CACHESVC_AUTH_TOKEN or [server].auth_token, or configure [[tokens]])",
            file=sys.stderr,
        )
        return 2
    # Before anything starts: a sidecar that cannot serve must not connect to its tiers,
    # nor take up the journal entries a predecessor left.
    check_can_listen(server.host, server.port, reuse_port=workers > 1)
    if settings.is_embedded_default:
        kind = "embedded default"
    elif settings.config_path is not None:
        kind = f"from {settings.config_path}"
    else:
        kind = "from the environment"
    log.info("tiers (%s): %s", kind, describe_tiers(settings.tiers))
    if settings.write.journal_url is not None and len(settings.tiers) > 1:
        log.info("write-behind journal: %s", describe_journal(settings))
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


def describe_journal(settings: Settings) -> str:
    """Where the journal is, and whether a tier shares its Redis database: emptying that
    tier with FLUSHDB deletes the journal too (docs/operations.md, "The journal")."""
    from cachesvc.app import redact

    write = settings.write
    assert write.journal_url is not None
    where = f"stream {write.journal_stream} on {redact(write.journal_url)}"
    journal = _redis_database(write.journal_url)
    sharing = [tier.name for tier in settings.tiers if _redis_database(tier.url) == journal]
    if sharing:
        where += (
            f", the database of tier {sharing[0]}: a FLUSHDB of it deletes the journal too "
            "([write].journal_url can move it)"
        )
    return where


def _redis_database(url: str) -> tuple[str, int, str] | None:
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        return None
    return (parts.hostname or "", parts.port or 6379, parts.path.strip("/") or "0")


def check_can_listen(host: str, port: int, reuse_port: bool) -> None:
    """Bind (and release) ``host:port`` as the server will; CannotListen says why not."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            # The options asyncio's create_server sets: connections of an earlier run in
            # TIME_WAIT do not count, and each IPv6 address is bound on its own.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise CannotListen(cannot_listen_message(host, port, exc)) from None


def cannot_listen_message(host: str, port: int, exc: OSError) -> str:
    reasons = {
        errno.EADDRINUSE: "the port is already in use (another cachesvc, or another "
        "program: choose another with --port or [server].port)",
        errno.EADDRNOTAVAIL: "the address is not one of this machine's",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
    }
    reason = reasons.get(exc.errno or 0) or exc.strerror or str(exc)
    return f"cannot listen on {host}:{port}: {reason}"


def serve_worker(settings: Settings, worker: int) -> int:
    """One event loop serving the app; returns 0 after a graceful SIGTERM/SIGINT."""
    if worker:
        configure_logging(settings)
    keep_for_reuse()
    loop = _new_event_loop()
    # Handled by the loop from the start: a stop that arrives while the service starts
    # (a worker still connecting to its tiers) waits for the start, then stops it cleanly.
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        loop.run_until_complete(_serve(settings, worker, stop))
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


async def _serve(settings: Settings, worker: int, stop: asyncio.Event) -> None:
    from cachesvc.app import Service

    service = Service(settings, worker)
    try:
        await service.start()
    except OSError as exc:  # taken since check_can_listen
        server = settings.server
        raise CannotListen(cannot_listen_message(server.host, server.port, exc)) from None
    # What start-up made (modules, settings, clients) lives as long as the process: out of
    # the collector's sight, a full collection walks only what requests leave behind
    # instead of pausing every request for tens of milliseconds.
    gc.collect()
    gc.freeze()
    reachability: asyncio.Task[None] | None = None
    try:
        if worker <= 1:
            server = settings.server
            log.info("serving on http://%s:%d", server.host, service.port)
            if service.ops_port is not None:
                log.info("operations (health, readiness, metrics) on port %d", service.ops_port)
            reachability = asyncio.create_task(report_unreachable_tiers(service.api.engine.slots))
        await stop.wait()
        log.info(
            "stopping: finishing requests under way (at most %g s)",
            settings.server.shutdown_timeout,
        )
    finally:
        if reachability is not None:
            reachability.cancel()
        await service.stop()


async def report_unreachable_tiers(slots: Sequence[Slot]) -> None:
    """Say once, at start, which tiers do not answer and why. In the background: the
    sidecar serves meanwhile, from the tiers that do."""
    from cachesvc.slot import failure_cause
    from tiers.base import TierError

    async def check(slot: TierSlot) -> None:
        try:
            await slot.call(slot.tier.ping())
        except TierError as exc:
            log.warning(
                "tier %s is unreachable at start (%s); requests use the other tiers "
                "until it answers",
                slot.name,
                failure_cause(exc),
            )

    parts = [part for slot in slots if not slot.tier.in_process for part in slot.parts]
    await asyncio.gather(*(check(part) for part in parts))


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
    # A stop that arrives before the event loop handles it (the worker is still importing)
    # finds nothing to finish yet: leave at once, successfully.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        sys.exit(serve_worker(settings, worker))
    except CannotListen as exc:
        print(f"cachesvc worker {worker}: {exc}", file=sys.stderr)
        sys.exit(1)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows); asyncio's loop works
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def publish_invalidation(
    settings: Settings, keys: list[str], prefixes: list[str], tags: list[str], namespace: str
) -> int:
    if not (keys or prefixes or tags):
        print("nothing to invalidate: give --key, --prefix or --tag", file=sys.stderr)
        return 2
    known = ["default", *(configured.name for configured in settings.namespaces)]
    if namespace not in known:
        print(f"unknown namespace {namespace!r} (namespaces: {', '.join(known)})", file=sys.stderr)
        return 2
    if settings.invalidation.url is None:
        print("no [invalidation].url configured to publish to", file=sys.stderr)
        return 2
    from invalidation.events import InvalidationEvent
    from invalidation.redis_pubsub import publish

    config = settings.invalidation
    url = settings.invalidation.url
    event = InvalidationEvent(
        tuple(keys), tuple(prefixes), tuple(tags), namespace, sent_at=time.time()
    )
    if config.stream is not None:
        entry = asyncio.run(_append(url, config.stream, event, config.trimming()))
        print(f"appended to the stream {config.stream} as {entry}")
        return 0
    receivers = asyncio.run(publish(url, config.channel, event.to_json()))
    subscribers = "1 subscriber" if receivers == 1 else f"{receivers} subscribers"
    print(f"published to {config.channel} ({subscribers})")
    return 0


async def _append(url: str, stream: str, event: Any, trimming: Any) -> str:
    import redis.asyncio as redis

    from invalidation.redis_stream import append

    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        entry = await append(client, stream, event, trimming)
    finally:
        await client.aclose()
    return entry.decode()


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


def iso_time(text: str) -> datetime:
    """An ISO 8601 time for --since; without a zone, UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (e.g. 2025-06-01T12:00:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def audit(settings: Settings, args: argparse.Namespace) -> int:
    import asyncpg

    from cachesvc.audit import AuditUnavailable, audit_table_exists, records, verify
    from tiers.postgres import database_url

    durable = settings.tiers[-1]
    if durable.parsed_url.scheme.lower() not in POSTGRES_SCHEMES:
        print(
            f"the audit trail lives in the durable tier's Postgres database, and the durable "
            f"tier {durable.name} is not one ({durable.parsed_url.scheme}://)",
            file=sys.stderr,
        )
        return 2
    try:
        conn = await asyncpg.connect(database_url(durable.parsed_url), timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(
            f"cannot connect to the durable tier {durable.name}'s database: {exc}", file=sys.stderr
        )
        return 2
    try:
        if args.audit_command == "verify":
            verdict = await verify(conn)
            print(verdict.message, file=sys.stdout if verdict.whole else sys.stderr)
            return 0 if verdict.whole else 1
        if not await audit_table_exists(conn):
            print("no audit trail yet: nothing was recorded", file=sys.stderr)
            return 0
        async with conn.transaction(readonly=True):
            async for stored in records(conn, since=args.since, namespace=args.namespace):
                print(json.dumps(stored.document(), ensure_ascii=False))
        return 0
    except AuditUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        await conn.close()
