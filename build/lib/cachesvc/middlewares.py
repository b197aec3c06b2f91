"""The two middlewares: errors -> JSON (with request metrics), and bearer-token auth."""

from __future__ import annotations

import hmac
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from cachesvc.errors import ServiceError, Unauthorized
from cachesvc.handlers import error_reply, error_response
from cachesvc.logs import CURRENT_REQUEST, RequestContext
from cachesvc.metrics import Metrics

log = logging.getLogger(__name__)

_DETAILS = {
    404: "no endpoint at this path; the API is under /v1/ (see /openapi.json)",
    405: "method not allowed here; the Allow header lists the ones that are",
}


def error_middleware(metrics: Metrics) -> Middleware:
    """Every error becomes ``{"error", "detail"}`` JSON; every request is counted."""
    record = metrics.requests.record

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        route = request.match_info.route.name or "unmatched"
        # Reset below: keep-alive requests of one connection share its task's context.
        token = CURRENT_REQUEST.set(RequestContext(request.headers))
        try:
            response = await handler(request)
        except ServiceError as exc:
            response = error_reply(exc).response()
        except web.HTTPException as exc:
            if exc.empty_body or exc.status < 400:
                raise
            code = exc.reason.lower().replace(" ", "_")
            response = error_response(exc.status, code, _DETAILS.get(exc.status, exc.reason))
            response.headers.extend(
                (name, value) for name, value in exc.headers.items() if name == "Allow"
            )
        except Exception:
            log.exception("unhandled error in %s %s", request.method, route)
            response = error_response(500, "internal_error", "unexpected server error")
        finally:
            CURRENT_REQUEST.reset(token)
        record(route, response.status, time.perf_counter() - started)
        return response

    return middleware


def auth_middleware(token: str) -> Middleware:
    """SPEC §5: ``/v1/...`` needs ``Authorization: Bearer <token>``; health, readiness,
    metrics and the OpenAPI document stay open for probes and scrapers."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            # compare_digest: the time taken must not reveal how much of the token matched.
            if not hmac.compare_digest(given, expected):
                raise Unauthorized("missing or wrong bearer token")
        return await handler(request)

    return middleware
