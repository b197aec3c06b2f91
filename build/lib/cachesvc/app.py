"""``create_app(settings)``: the aiohttp application and the lifecycle of its resources."""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cachesvc import handlers
from cachesvc.config import Settings, TierSettings
from cachesvc.engine import Engine
from cachesvc.handlers import ENGINE, INVALIDATOR, METRICS, SETTINGS
from cachesvc.invalidator import Invalidator
from cachesvc.journal import Journal
from cachesvc.metrics import Metrics
from cachesvc.middlewares import auth_middleware, error_middleware
from cachesvc.slot import TierSlot
from invalidation.base import Listener
from invalidation.postgres_notify import PostgresNotifyListener
from invalidation.redis_pubsub import RedisPubSubListener
from tiers.registry import tier_class

OPENAPI_DOCUMENT = Path(__file__).with_name("openapi.json")
# Any characters, newlines included: the handler validates the key and answers 400.
KEY_ROUTE = r"/v1/cache/{key:[\s\S]*}"


def build_engine(settings: Settings, metrics: Metrics, worker: int = 0) -> Engine:
    slots = []
    for tier_settings in settings.tiers:
        url = tier_settings.parsed_url
        cls = tier_class(url.scheme.lower())
        tier = cls(tier_settings.name, url, tier_settings.ttl)
        slots.append(
            TierSlot(
                tier,
                timeout=tier_settings.timeout or cls.default_timeout,
                breaker_failures=tier_settings.breaker_failures,
                breaker_reset=tier_settings.breaker_reset,
                metrics=metrics.for_tier(tier_settings.name),
            )
        )
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
    return Journal(
        write.journal_url,
        write.journal_stream,
        max_pending=write.journal_max_pending,
        batch=write.flush_batch,
        reclaim_after=write.reclaim_after,
        max_attempts=write.max_attempts,
        metrics=metrics,
        consumer=sidecar_identity(settings, worker),
    )


def create_app(settings: Settings, worker: int = 0) -> web.Application:
    """The app for ``settings``; ``worker`` tells apart the processes of ``--workers``."""
    metrics = Metrics()
    middlewares = [error_middleware(metrics)]
    if settings.server.auth_token is not None:
        middlewares.append(auth_middleware(settings.server.auth_token.get_secret_value()))
    # The body limit is enforced by the handlers (413 as JSON); aiohttp's own limit is
    # kept just above it so that it never answers first.
    app = web.Application(
        middlewares=middlewares, client_max_size=settings.server.max_body_bytes + 1
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[ENGINE] = engine = build_engine(settings, metrics, worker)
    app[INVALIDATOR] = build_invalidator(settings, engine, metrics)
    app.cleanup_ctx.append(_engine_lifecycle)
    app.cleanup_ctx.append(_invalidator_lifecycle)

    app.router.add_get(KEY_ROUTE, handlers.get_entry, name="get", allow_head=False)
    app.router.add_put(KEY_ROUTE, handlers.put_entry, name="put")
    app.router.add_delete(KEY_ROUTE, handlers.delete_entry, name="delete")
    app.router.add_post("/v1/bulk/get", handlers.bulk_get, name="bulk_get")
    app.router.add_post("/v1/bulk/set", handlers.bulk_set, name="bulk_set")
    app.router.add_post("/v1/bulk/delete", handlers.bulk_delete, name="bulk_delete")
    app.router.add_post("/v1/invalidate", handlers.invalidate, name="invalidate")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics_handler, name="metrics")
    openapi = OPENAPI_DOCUMENT.read_bytes()
    app.router.add_get("/openapi.json", functools.partial(serve_openapi, openapi), name="openapi")
    return app


def build_invalidator(settings: Settings, engine: Engine, metrics: Metrics) -> Invalidator:
    config = settings.invalidation
    listeners: list[Listener] = []
    if config.url is not None:
        listeners.append(RedisPubSubListener(config.url, config.channel, config.liveness_interval))
    if config.postgres_url is not None:
        listeners.append(
            PostgresNotifyListener(
                config.postgres_url, config.postgres_channel, config.liveness_interval
            )
        )
    return Invalidator(engine, metrics, listeners, config.url, config.channel)


async def _engine_lifecycle(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE]
    await engine.start()
    yield
    await engine.close()


async def _invalidator_lifecycle(app: web.Application) -> AsyncIterator[None]:
    invalidator = app[INVALIDATOR]
    await invalidator.start()
    yield
    await invalidator.close()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    tiers = await engine.tier_states()
    listeners = request.app[INVALIDATOR].states()
    ready = all(tier["state"] == "up" for tier in tiers) and all(
        state == "up" for state in listeners.values()
    )
    body: dict[str, object] = {"status": "ready" if ready else "not ready", "tiers": tiers}
    if listeners:
        body["invalidation"] = listeners
    return web.json_response(body, status=200 if ready else 503)


async def serve_openapi(document: bytes, request: web.Request) -> web.Response:
    return web.Response(body=document, content_type="application/json")


async def metrics_handler(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def describe_tiers(tiers: list[TierSettings]) -> str:
    return ", ".join(f"{t.name}={redact(t.url)} (ttl {t.ttl:g} s)" for t in tiers)


def redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
