"""``create_app(settings)``: the application and its resources' lifecycle; ``Service``:
the application with its listeners.

The aiohttp ``Application`` owns the lifecycle: one ``cleanup_ctx`` entry per resource
(the audit trail, tiers and engine, then invalidation, then the request layer), exited in
reverse, and only those that started: the trail records the start before anything else
and the stop after everything else (the journal drained). Requests reach ``cachesvc.api``
through the front door (``cachesvc.front``), the sidecar's own HTTP/1.1 protocol, started
with ``loop.create_server`` on the API's address and, with ``[server].ops_port``, on the
operations listener's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from cachesvc import audit
from cachesvc.api import Api
from cachesvc.audit import AuditTrail
from cachesvc.config import POSTGRES_SCHEMES, Settings, TierSettings
from cachesvc.engine import Engine
from cachesvc.front import Edge
from cachesvc.invalidator import Invalidator
from cachesvc.journal import Journal
from cachesvc.metrics import Metrics
from cachesvc.nodes import NodeSlots
from cachesvc.slot import Slot, TierSlot
from invalidation.base import Listener
from invalidation.postgres_notify import PostgresNotifyListener
from invalidation.postgres_wal import PostgresWalListener, TableSpec
from invalidation.redis_pubsub import RedisPubSubListener
from invalidation.redis_stream import RedisStreamListener
from tiers.base import Tier
from tiers.postgres import database_url
from tiers.registry import tier_class

log = logging.getLogger(__name__)

API = web.AppKey("api", Api)
AUDIT = web.AppKey("audit", AuditTrail)
OPENAPI_DOCUMENT = Path(__file__).with_name("openapi.json")


def build_engine(settings: Settings, metrics: Metrics, worker: int = 0) -> Engine:
    slots: list[Slot] = []
    for tier_settings in settings.tiers:
        url = tier_settings.parsed_url
        cls = tier_class(url.scheme.lower())
        tier = cls(tier_settings.name, url, tier_settings.ttl)

        def slot_for(part: Tier, settings: TierSettings = tier_settings) -> TierSlot:
            return TierSlot(
                part,
                timeout=settings.timeout or type(part).default_timeout,
                breaker_failures=settings.breaker_failures,
                breaker_reset=settings.breaker_reset,
                metrics=metrics.for_tier(part.name),
            )

        # A tier of independent nodes: each node its own failure domain (its series are
        # labelled tier="<tier>/<node>").
        if len(tier.nodes()) > 1:
            slots.append(NodeSlots(tier, slot_for, metrics.for_tier(tier.name)))
        else:
            slots.append(slot_for(tier))
    journal = build_journal(settings, metrics, worker) if len(slots) > 1 else None
    return Engine(
        slots,
        settings.server.request_timeout,
        journal,
        settings.write.drain_timeout,
        identity=sidecar_identity(settings, worker),
    )


def sidecar_identity(settings: Settings, worker: int) -> str:
    """Stable across restarts in the same pod (host name, port, worker): what a sidecar
    leaves unfinished — write-behind entries, missed keys — it takes up again at once."""
    return f"{socket.gethostname()}:{settings.server.port}:{worker}"


def build_journal(settings: Settings, metrics: Metrics, worker: int) -> Journal | None:
    write = settings.write
    if write.journal_url is None:
        return None
    # Peers of an in-process top tier read a write-behind write from the tiers below once
    # their copy is dropped: those get every write as soon as it can be read.
    shared_top = not settings.tiers[0].is_in_process
    return Journal(
        write.journal_url,
        write.journal_stream,
        max_pending=write.journal_max_pending,
        batch=write.flush_batch,
        interval=write.flush_interval if shared_top else 0.0,
        reclaim_after=write.reclaim_after,
        max_attempts=write.max_attempts,
        metrics=metrics,
        consumer=sidecar_identity(settings, worker),
        volatile=write.volatile_journal,
        replicas=write.journal_replicas,
    )


def build_invalidator(
    settings: Settings, engine: Engine, metrics: Metrics, worker: int = 0
) -> Invalidator:
    config = settings.invalidation
    identity = config.identity or sidecar_identity(settings, worker)
    listeners: list[Listener] = []
    if config.url is not None:
        listeners.append(RedisPubSubListener(config.url, config.channel, config.liveness_interval))
        if config.stream is not None:
            listeners.append(RedisStreamListener(config.url, config.stream, identity))
    if config.postgres_url is not None:
        listeners.append(
            PostgresNotifyListener(
                config.postgres_url, config.postgres_channel, config.liveness_interval
            )
        )
    by_database: dict[str, list[TableSpec]] = {}
    for source in config.tables:
        by_database.setdefault(source.url or settings.tiers[-1].url, []).append(source.spec())
    for number, (url, tables) in enumerate(by_database.items(), start=1):
        name = "postgres-wal" if len(by_database) == 1 else f"postgres-wal-{number}"
        listeners.append(PostgresWalListener(url, tables, source=name))
    invalidator = Invalidator(
        engine,
        metrics,
        listeners,
        config.url,
        config.channel,
        config.liveness_interval,
        stream=None if config.stream is None else (config.stream, config.trimming()),
        identity=identity,
    )
    if any(slot.tier.in_process for slot in engine.slots[:-1]):
        # In-process copies of every sidecar and worker must learn of every write.
        engine.announce = invalidator.announce
    return invalidator


def build_audit(settings: Settings) -> AuditTrail | None:
    """The audit trail, in the durable tier's database; None when that is not Postgres."""
    durable = settings.tiers[-1]
    if durable.parsed_url.scheme.lower() not in POSTGRES_SCHEMES:
        return None
    return AuditTrail(
        database_url(durable.parsed_url), retention_days=settings.audit.retention_days
    )


def create_app(settings: Settings, worker: int = 0) -> web.Application:
    """The application for ``settings``; ``worker`` tells apart the processes of
    ``--workers``."""
    metrics = Metrics()
    engine = build_engine(settings, metrics, worker)
    invalidator = build_invalidator(settings, engine, metrics, worker)
    api = Api(settings, engine, invalidator, metrics)
    api.openapi_document = OPENAPI_DOCUMENT.read_bytes()
    app = web.Application()
    app[API] = api
    trail = build_audit(settings)
    if trail is not None:
        api.audit = invalidator.audit = trail
        app[AUDIT] = trail
        app.cleanup_ctx.append(_audit_lifecycle)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.cleanup_ctx.append(_invalidator_lifecycle)
    app.cleanup_ctx.append(_api_lifecycle)
    return app


async def _audit_lifecycle(app: web.Application) -> AsyncIterator[None]:
    trail = app[AUDIT]
    # Secrets are masked in the dump (SecretStr), and keys are only named (their variable).
    digest = audit.config_digest(app[API].settings.model_dump(mode="json"))
    await trail.start()
    trail.record(audit.START, actor=trail.actor, config_digest=digest)
    yield
    trail.release_refusals(everything=True)  # the stop record comes last
    trail.record(audit.STOP, actor=trail.actor, config_digest=digest)
    await trail.close()


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    engine = app[API].engine
    await engine.start()
    yield
    await engine.close()


async def _invalidator_lifecycle(app: web.Application) -> AsyncIterator[None]:
    invalidator = app[API].invalidator
    await invalidator.start()
    yield
    await invalidator.close()


async def _api_lifecycle(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[API].close()


class Service:
    """The application and its listeners: ``await start()``, ``await stop()``."""

    def __init__(self, settings: Settings, worker: int = 0) -> None:
        self.settings = settings
        self.worker = worker
        self.app = create_app(settings, worker)
        self.api = self.app[API]
        server = settings.server
        # Runs the application's start-up and clean-up (its server is not used).
        self._runner = web.AppRunner(self.app)
        self._servers: list[asyncio.Server] = []
        self.edges: list[Edge] = []
        self.host = server.host
        self.port = server.port
        self.ops_port = server.ops_port

    async def start(self) -> None:
        """Start the resources, then listen (``port`` and ``ops_port`` are then the bound
        ports, also when the settings asked for 0)."""
        server = self.settings.server
        await self._runner.setup()
        try:
            self.port = await self._listen(Edge(self.api), server.host, server.port)
            if server.ops_port is not None:
                edge = Edge(self.api, ops_only=True)
                self.ops_port = await self._listen(edge, server.ops_host, server.ops_port)
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, edge: Edge, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        # --workers: the processes share the port (the kernel spreads the connections).
        listening = await loop.create_server(
            edge, host, port, reuse_port=self.worker > 0 or None, backlog=1024
        )
        self._servers.append(listening)
        self.edges.append(edge)
        port_bound: int = listening.sockets[0].getsockname()[1]
        return port_bound

    async def stop(self) -> None:
        """Stop accepting, answer what is under way (at most ``shutdown_timeout``), then
        release the resources (the write-behind journal drains there)."""
        for listening in self._servers:
            listening.close()
        await asyncio.gather(
            *(edge.shutdown(self.settings.server.shutdown_timeout) for edge in self.edges)
        )
        for listening in self._servers:
            await listening.wait_closed()
        self._servers.clear()
        self.edges.clear()
        await self._runner.cleanup()


def describe_tiers(tiers: list[TierSettings]) -> str:
    return ", ".join(f"{t.name}={redact(t.url)} (ttl {t.ttl:g} s)" for t in tiers)


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
