"""The request layer: every operation of the HTTP API, once, whichever wire path a request
came by.

A wire adapter — the front door (``cachesvc.front``, the sidecar's own HTTP/1.1 protocol)
or aiohttp (``cachesvc.app``, when ``access_log`` is on) — turns bytes into a request head
and a body, and a ``Reply`` back into bytes. Everything between happens here, once:
routing, authentication, validation, the operation itself, errors turned into the JSON
error shape, request metrics and the request context of log lines.

An adapter calls ``Api.head`` when a request's head is complete (a bad key, a missing token
or an unsupported body is answered before the body is read), then ``Api.respond`` with
the body. ``respond`` returns the ``Reply`` itself when the answer is known at once — an
in-process L1 hit, an error — and otherwise a future of it, completed from the tier's
callback (no task per request) or by a task for the slower operations. Errors the adapter
finds itself (framing, timeouts, oversized bodies) go through ``Api.refuse``.

``head`` decides, in this order: the route (404, 405), the token (401, ``cachesvc.access``),
the namespace (404 ``unknown_namespace``), the token's rate (429) and scope (403), the
body's announced size and encoding (413, 415), the key (400). Every operation then works
in its request's namespace (``cachesvc.namespaces``): its engine, its policy, and its
keys, tags and prefixes as the tiers hold them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import math
import os
import re
import time
import types
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import parse_qsl, unquote, unquote_to_bytes

import msgpack
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cachesvc import audit
from cachesvc.access import Grant, TokenRequests, build_access
from cachesvc.audit import AuditTrail, AuditUnavailable
from cachesvc.config import STRATEGIES, Settings, Strategy
from cachesvc.engine import Engine, Hit, NewValue
from cachesvc.envelope import DEFAULT_CONTENT_TYPE
from cachesvc.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    UnknownNamespace,
    UnsupportedEncoding,
)
from cachesvc.invalidator import Invalidator
from cachesvc.logs import CURRENT_REQUEST, RequestContext
from cachesvc.metrics import Metrics
from cachesvc.namespaces import Namespace, build_ciphers, build_namespaces
from invalidation.events import DEFAULT_NAMESPACE, InvalidationEvent, MalformedEvent, parse_event
from tiers.base import Payload

log = logging.getLogger(__name__)
ACCESS_LOG = logging.getLogger("cachesvc.access")  # [server].access_log: a line a request
M = TypeVar("M", bound=BaseModel)

CACHE_PREFIX = "/v1/cache/"
NAMESPACE_PREFIX = "/v1/ns/"
TAGS_PREFIX = "/v1/tags/"
_CACHE_PREFIX_LENGTH = len(CACHE_PREFIX)
_NAMESPACE_PREFIX_LENGTH = len(NAMESPACE_PREFIX)
TAG_KEYS_SUFFIX = "/keys"
MAX_KEY_BYTES = 250
MAX_TAGS = 32
MAX_BULK_KEYS = 1000
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
JSON_TYPE = "application/json; charset=utf-8"

# No whitespace (any Unicode space) and no control characters (C0, DEL, C1).
_FORBIDDEN_IN_KEY = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_PUT_PARAMS = frozenset(("ttl", "strategy", "tags"))
# RFC 9110 media type: type "/" subtype *( ";" parameter ), printable ASCII only — the
# value goes back out as a response header, where CR/LF or non-ASCII would break it.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[\x20-\x7e\t]*)?")


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: Payload = b""  # a large value: a view of the payload it was read from


def json_reply(status: int, document: Any, headers: Mapping[str, str] | None = None) -> Reply:
    fields = {"Content-Type": JSON_TYPE, **(headers or {})}
    return Reply(status, fields, json.dumps(document).encode())


def error_reply(exc: ServiceError) -> Reply:
    return json_reply(exc.status, exc.body(), exc.headers())


INTERNAL_ERROR = json_reply(500, {"error": "internal_error", "detail": "unexpected server error"})
NOT_FOUND = json_reply(
    404,
    {"error": "not_found", "detail": "no tier holds a live entry for this key"},
    {"Cache-Status": "cachesvc; fwd=miss"},
)
NO_CONTENT = Reply(204, {})

# -- input validation ----------------------------------------------------------------------


def validate_key(key: str, what: str = "key") -> str:
    if key.isascii() and 0 < len(key) <= MAX_KEY_BYTES and key.isprintable() and " " not in key:
        return key  # the common case, without the regular expression: printable ASCII
    size = len(key.encode())
    if not 1 <= size <= MAX_KEY_BYTES:
        raise BadRequest(f"{what} must be 1-{MAX_KEY_BYTES} bytes of UTF-8, got {size}")
    if _FORBIDDEN_IN_KEY.search(key):
        raise BadRequest(f"{what} must not contain whitespace or control characters")
    return key


def key_in_path(encoded: str, what: str = "key") -> str:
    """The key (or tag) of a raw (still percent-encoded) path part, so that an encoded
    ``/``, ``?``, ``#`` or ``%`` is part of it; invalid UTF-8 is refused."""
    if "%" not in encoded and encoded.isascii():
        return validate_key(encoded, what)  # nothing to decode
    try:
        key = unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"{what} is not valid UTF-8") from None
    return validate_key(key, what)


def parse_ttl(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        ttl = float(raw)
    except ValueError:
        raise BadRequest(f"ttl must be a positive number of seconds, got {raw[:40]!r}") from None
    if not math.isfinite(ttl) or ttl <= 0:
        raise BadRequest(f"ttl must be a positive number of seconds, got {raw[:40]!r}")
    return ttl


def parse_strategy(raw: str | None, default: Strategy) -> Strategy:
    if raw is None or raw == "":
        return default
    if raw not in STRATEGIES:
        raise BadRequest(f"unknown strategy {raw[:40]!r} (known: {', '.join(STRATEGIES)})")
    return raw


@functools.lru_cache(maxsize=256)  # a service sends a few content types, over and over
def validate_content_type(content_type: str) -> str:
    if len(content_type) > 255 or not _MEDIA_TYPE.fullmatch(content_type):
        raise BadRequest(
            f"content type must be a media type like text/plain, got {content_type[:60]!r}"
        )
    return content_type


def parse_tags(tags: Sequence[str]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS:
        raise BadRequest(f"at most {MAX_TAGS} tags per entry")
    return tuple(validate_key(tag, "tag") for tag in tags)


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``*`` or a list of entity tags, compared weakly. Several field
    lines arrive joined by ", " (both adapters join them)."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def get_reply(hit: Hit | None, if_none_match: str | None) -> Reply:
    if hit is None:
        return NOT_FOUND
    etag = f'"{hit.entry.version}"'
    headers = {
        "X-Cache-Tier": hit.tier,
        "Cache-Status": f"cachesvc; hit; detail={hit.tier}",
        "ETag": etag,
    }
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Reply(304, headers)
    headers["Content-Type"] = hit.entry.content_type
    return Reply(200, headers, hit.entry.value)


def put_reply(version: int, strategy: Strategy) -> Reply:
    return Reply(202 if strategy == "write-behind" else 204, {"ETag": f'"{version}"'})


# -- bulk bodies ---------------------------------------------------------------------------


class _BulkModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BulkKeys(_BulkModel):
    keys: list[str] = Field(min_length=1, max_length=MAX_BULK_KEYS)


class BulkSetEntry(_BulkModel):
    key: str
    value: str | bytes | None = None
    value_base64: str | None = None
    content_type: str = DEFAULT_CONTENT_TYPE
    ttl: float | None = Field(None, gt=0, allow_inf_nan=False, strict=True)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)

    @field_validator("value_base64")
    @classmethod
    def _is_base64(cls, text: str | None) -> str | None:
        if text is not None:
            try:
                base64.b64decode(text, validate=True)
            except binascii.Error:
                raise ValueError("not valid base64") from None
        return text

    def payload(self) -> bytes:
        if (self.value is None) == (self.value_base64 is None):
            raise BadRequest(f"entry {self.key[:60]!r}: give exactly one of value, value_base64")
        if self.value_base64 is not None:
            return base64.b64decode(self.value_base64)
        return self.value.encode() if isinstance(self.value, str) else cast(bytes, self.value)


class BulkSet(_BulkModel):
    entries: list[BulkSetEntry] = Field(min_length=1, max_length=MAX_BULK_KEYS)
    strategy: str | None = None


class Erasure(_BulkModel):
    keys: list[str] = Field(default_factory=list, max_length=MAX_BULK_KEYS)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)


def is_msgpack(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() in MSGPACK_TYPES


def wants_msgpack(headers: Mapping[str, str]) -> bool:
    accept = headers.get("accept", "")
    if any(kind in accept for kind in MSGPACK_TYPES):
        return True
    return is_msgpack(headers.get("content-type", "")) and "json" not in accept


def read_document(headers: Mapping[str, str], body: bytes, model: type[M]) -> M:
    content_type = headers.get("content-type", "")
    try:
        document = msgpack.unpackb(body) if is_msgpack(content_type) else json.loads(body)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise BadRequest(f"body is not valid {content_type or 'JSON'}: {exc}") from None
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise BadRequest(f"{where}: {first['msg']}{more}") from None


def document_reply(headers: Mapping[str, str], document: Any, status: int = 200) -> Reply:
    if wants_msgpack(headers):
        return Reply(status, {"Content-Type": "application/msgpack"}, msgpack.packb(document))
    return json_reply(status, document)


# -- requests ------------------------------------------------------------------------------

Outcome = Reply | asyncio.Future[Reply]
Operation = Callable[["Api", "Call", bytes], Reply | Awaitable[Reply]]


class Route(NamedTuple):
    name: str  # in metrics and logs
    operation: Operation
    # What a token needs the scope of (read, write, invalidate) in the request's
    # namespace; None: an operations endpoint, open to all.
    action: str | None
    takes_body: bool


class Call(RequestContext):
    """One request between its head and its answer; also what its log lines name."""

    __slots__ = (
        "actor",
        "client",
        "early",
        "key",
        "method",
        "namespace",
        "path",
        "query",
        "route",
        "started",
    )

    def __init__(
        self, headers: Mapping[str, str], method: str = "", client: str | None = None
    ) -> None:
        RequestContext.__init__(self, headers)  # (not super(): one object fewer per request)
        self.method = method
        self.client = client  # the peer's address, for the audit trail
        self.actor = "-"  # the token's name (the audit trail's actor); "-": none
        self.started = time.perf_counter()
        self.route = "unmatched"
        self.path = ""
        self.query = ""
        self.key = ""  # as the tiers hold it (in the namespace's scope); or a tag, so held
        self.namespace: Namespace | None = None
        # The answer, when the head alone decides it (the body is then not needed).
        self.early: Reply | None = None


class Api:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        invalidator: Invalidator,
        metrics: Metrics,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """``environ``: where the tokens' ``secret_env`` and the namespaces'
        ``encryption_keys_env`` variables are read (default: the process's environment);
        ConfigError names each one that is not set or not usable."""
        self.settings = settings
        self.engine = engine
        self.invalidator = invalidator
        self.metrics = metrics
        self.max_body_bytes = settings.server.max_body_bytes
        environ = os.environ if environ is None else environ
        self.namespaces = build_namespaces(settings, engine, build_ciphers(settings, environ))
        for namespace in self.namespaces.values():
            metrics.requests.hits[namespace.name] = namespace.hits
        invalidator.engines = {
            name: namespace.engine
            for name, namespace in self.namespaces.items()
            if namespace.engine is not engine
        }
        self.access = build_access(settings, environ, time.perf_counter())
        if self.access is not None:
            metrics.registry.register(TokenRequests(self.access))
        self._record = metrics.requests.record
        self._stats = metrics.requests
        self._access_log = settings.server.access_log
        self._tasks: set[asyncio.Task[Reply]] = set()
        self.openapi_document = b""
        # Where invalidations, erasures and refusals are recorded (cachesvc.app sets it
        # when the durable tier is a Postgres database).
        self.audit: AuditTrail | None = None

    # -- the adapters' entry points ------------------------------------------------------

    def head(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        ops_only: bool = False,
        client: str | None = None,
    ) -> Call:
        """Route and check a request whose head is complete; ``call.early`` is its answer
        when the head decides it. ``ops_only``: the operations listener, which serves
        health, readiness and metrics only. ``client``: the peer's address."""
        call = Call(headers, method, client)
        namespace: Namespace | None = None
        try:
            route, namespace_name, encoded_key = self._route(call, method, target, ops_only)
            call.route = route.name
            action = route.action
            if action is None:  # operations: no namespace, no token, no body
                return call
            namespace = call.namespace = self.namespaces.get(namespace_name)
            access = self.access
            grant: Grant | None = None
            if access is not None:
                grant = access.authenticate(headers.get("authorization"))
            if namespace is None:
                # The configured ones are not listed: a tenant need not learn the others'.
                raise UnknownNamespace(f"no namespace {namespace_name[:64]!r} is configured")
            if grant is not None:
                call.actor = grant.name
                grant.check(namespace_name, action, call.started)
            if route.takes_body:
                self._check_body_head(headers, route, namespace)
            if encoded_key is not None:
                what = "tag" if route.name == "tag_keys" else "key"
                call.key = namespace.scope + key_in_path(encoded_key, what)
        except ServiceError as exc:
            call.early = error_reply(exc)
            if exc.status in (401, 403) and self.audit is not None:
                # Coalesced by the trail; the namespace only if it exists, so that made-up
                # names do not make a record each.
                self.audit.refused(
                    exc.status,
                    actor=call.actor,
                    namespace=None if namespace is None else namespace.name,
                    target=call.route,
                    client=call.client,
                )
        return call

    def respond(self, call: Call, body: bytes) -> Outcome:
        """The answer to ``call``: a Reply, or a future that ``settled`` turns into one once
        it is done (its failure included)."""
        if call.early is not None:
            return self._finish(call, call.early)
        token = CURRENT_REQUEST.set(call)
        try:
            outcome = ROUTES_BY_NAME[call.route].operation(self, call, body)
        except ServiceError as exc:
            return self._finish(call, error_reply(exc))
        except Exception:
            log.exception("unhandled error in %s", call.route)
            return self._finish(call, INTERNAL_ERROR)
        finally:
            CURRENT_REQUEST.reset(token)
        if isinstance(outcome, Reply):
            return self._finish(call, outcome)
        if not isinstance(outcome, asyncio.Future):
            outcome = self._start(outcome)
        return outcome

    def settled(self, call: Call, done: asyncio.Future[Reply]) -> Reply:
        """The answer to ``call`` from the future ``respond`` gave, done and not cancelled
        (a cancelled one means the sidecar is stopping: there is no answer)."""
        failure = done.exception()
        if failure is None:
            reply = done.result()
        elif isinstance(failure, ServiceError):
            reply = error_reply(failure)
        else:
            log.error("unhandled error in %s", call.route, exc_info=failure)
            reply = INTERNAL_ERROR
        return self._finish(call, reply)

    def refuse(self, exc: ServiceError, call: Call) -> None:
        """Make ``exc`` the answer to a request the adapter found malformed, or too slow or
        large to read: logged once (no traceback: it is the client's doing) and counted."""
        self.metrics.malformed_requests.labels(exc.code).inc()
        log.info("refused a request (%s %s): %s", exc.status, exc.code, exc.detail)
        call.early = error_reply(exc)

    # -- operations ----------------------------------------------------------------------

    def get_entry(self, call: Call, body: bytes) -> Outcome:
        if_none_match = call.headers.get("if-none-match")
        namespace = call.namespace
        assert namespace is not None  # (not _in: every L1 hit comes here)
        key = call.key
        return namespace.engine.read(key, lambda hit: self._got(namespace, key, hit, if_none_match))

    def _got(
        self, namespace: Namespace, key: str, hit: Hit | None, if_none_match: str | None
    ) -> Reply:
        hit = namespace.opened(key, hit)
        if hit is None:
            self._stats.miss(namespace.name)
            return NOT_FOUND
        hits = namespace.hits
        hits[hit.tier] = hits.get(hit.tier, 0) + 1
        return get_reply(hit, if_none_match)

    def put_entry(self, call: Call, body: bytes) -> Outcome:
        namespace = _in(call)
        _check_value_size(namespace, len(body))
        query = _parsed_query(call.query, _PUT_PARAMS)
        headers = call.headers
        strategy = parse_strategy(
            query.get("strategy") or headers.get("x-cache-strategy"), namespace.strategy
        )
        raw_tags = query.get("tags", "")
        new = NewValue(
            call.key,
            body,
            validate_content_type(headers.get("content-type") or DEFAULT_CONTENT_TYPE),
            namespace.lifetime(parse_ttl(query.get("ttl"))),
            namespace.held(parse_tags(raw_tags.split(","))) if raw_tags else (),
        )
        return namespace.engine.write(
            [namespace.sealed(new)], strategy, lambda versions: put_reply(versions[0], strategy)
        )

    async def delete_entry(self, call: Call, body: bytes) -> Reply:
        namespace = _in(call)
        key = call.key[len(namespace.scope) :]
        await self._invalidate(call, InvalidationEvent((key,), namespace=namespace.name))
        return NO_CONTENT

    async def bulk_get(self, call: Call, body: bytes) -> Reply:
        namespace = _in(call)
        keys = [validate_key(key) for key in read_document(call.headers, body, BulkKeys).keys]
        held = namespace.held(keys)
        hits = await namespace.engine.read_many(held)
        as_msgpack = wants_msgpack(call.headers)
        entries: list[dict[str, Any]] = []
        missing: list[str] = []
        for key, held_key, hit in zip(keys, held, hits, strict=True):
            hit = namespace.opened(held_key, hit)
            if hit is None:
                self._stats.miss(namespace.name)
                missing.append(key)
                continue
            namespace.hits[hit.tier] = namespace.hits.get(hit.tier, 0) + 1
            entry: dict[str, Any] = {
                "key": key,
                "tier": hit.tier,
                "version": hit.entry.version,
                "content_type": hit.entry.content_type,
            }
            if as_msgpack:
                entry["value"] = hit.entry.value
            else:
                entry["value_base64"] = base64.b64encode(hit.entry.value).decode()
            entries.append(entry)
        return document_reply(call.headers, {"entries": entries, "missing": missing})

    async def bulk_set(self, call: Call, body: bytes) -> Reply:
        namespace = _in(call)
        document = read_document(call.headers, body, BulkSet)
        strategy = parse_strategy(
            document.strategy or call.headers.get("x-cache-strategy"), namespace.strategy
        )
        keys = []
        values = []
        for item in document.entries:
            keys.append(validate_key(item.key))
            payload = item.payload()
            _check_value_size(namespace, len(payload), item.key)
            new = NewValue(
                namespace.scope + item.key,
                payload,
                validate_content_type(item.content_type),
                namespace.lifetime(item.ttl),
                namespace.held(parse_tags(item.tags)),
            )
            values.append(namespace.sealed(new))
        versions = await namespace.engine.write(values, strategy)
        status = 202 if strategy == "write-behind" else 200
        result = {"versions": dict(zip(keys, versions, strict=True))}
        return document_reply(call.headers, result, status)

    async def bulk_delete(self, call: Call, body: bytes) -> Reply:
        namespace = _in(call)
        keys = tuple(validate_key(key) for key in read_document(call.headers, body, BulkKeys).keys)
        await self._invalidate(call, InvalidationEvent(keys, namespace=namespace.name))
        return NO_CONTENT

    async def invalidate(self, call: Call, body: bytes) -> Reply:
        namespace = _in(call)
        try:
            event = parse_event(body, namespace=namespace.name)
        except MalformedEvent as exc:
            raise BadRequest(str(exc)) from None
        if event.namespace != namespace.name:
            raise BadRequest(
                f"the body names the namespace {event.namespace!r}, the path {namespace.name!r}"
            )
        for key in event.keys:
            validate_key(key)
        for prefix in event.prefixes:
            validate_key(prefix, "prefix")
        for tag in event.tags:
            validate_key(tag, "tag")
        if event.written:
            raise BadRequest("written is for the sidecars' own announcements, not requests")
        await self._invalidate(call, event)
        return json_reply(202, {"status": "accepted"})

    async def _invalidate(self, call: Call, event: InvalidationEvent) -> None:
        """``event`` applied and told to the peers, and recorded in the audit trail
        (whatever the outcome)."""
        # (Only a trail needs the target: every DELETE comes here.)
        target = (
            "" if self.audit is None else audit.target_of(event.keys, event.prefixes, event.tags)
        )
        try:
            await self.invalidator.invalidate(event)
        except Exception as exc:
            status = exc.status if isinstance(exc, ServiceError) else 500
            self._audit(call, audit.INVALIDATE, target, str(status))
            raise
        self._audit(call, audit.INVALIDATE, target, "ok")

    async def erase(self, call: Call, body: bytes) -> Reply:
        """A data subject's entries removed from every tier and the journal; answered once
        the erasure's audit record is committed."""
        namespace = _in(call)
        document = read_document(call.headers, body, Erasure)
        keys = [validate_key(key) for key in document.keys]
        tags = [validate_key(tag, "tag") for tag in document.tags]
        if not keys and not tags:
            raise BadRequest("nothing to erase: give keys, tags or both")
        target = audit.target_of(keys, tags=tags)
        try:
            erased = await namespace.engine.erase(namespace.held(keys), namespace.held(tags))
        except ServiceError as exc:
            self._audit(call, audit.ERASE, target, str(exc.status))
            raise
        trail = self.audit
        if trail is not None:
            try:
                await trail.record_now(
                    audit.ERASE, **self._fields(call, target, f"erased {erased}")
                )
            except AuditUnavailable as exc:
                raise Unavailable(
                    f"erased, but not answered before its audit record is kept: {exc}", "audit"
                ) from exc
        return json_reply(200, {"erased": erased})

    async def tag_keys(self, call: Call, body: bytes) -> Reply:
        """The keys the durable tier holds with a tag (a data subject's access)."""
        namespace = _in(call)
        scope = len(namespace.scope)
        tag = call.key[scope:]
        keys = await namespace.engine.keys_with_tag(call.key)
        self._audit(call, audit.ACCESS, audit.target_of(tags=[tag]), "ok")
        return json_reply(200, {"tag": tag, "keys": [key[scope:] for key in keys]})

    def _audit(self, call: Call, action: str, target: str, outcome: str) -> None:
        if self.audit is not None:
            self.audit.record(action, **self._fields(call, target, outcome))

    @staticmethod
    def _fields(call: Call, target: str, outcome: str) -> dict[str, Any]:
        namespace = call.namespace
        return {
            "actor": call.actor,
            "namespace": None if namespace is None else namespace.name,
            "target": target,
            "outcome": outcome,
            "client": call.client,
        }

    def healthz(self, call: Call, body: bytes) -> Reply:
        return json_reply(200, {"status": "ok"})

    async def readyz(self, call: Call, body: bytes) -> Reply:
        tiers = await self.engine.tier_states()
        invalidator = self.invalidator
        listeners = invalidator.states()
        journal = invalidator.journal_state()
        ready = (
            all(tier["state"] == "up" for tier in tiers)
            and all(state in ("up", "standby") for state in listeners.values())
            and not self.engine.blind
        )
        document: dict[str, object] = {"status": "ready" if ready else "not ready", "tiers": tiers}
        if listeners:
            document["invalidation"] = listeners
        if problems := invalidator.problems():
            document["invalidation_problems"] = problems
        if self.engine.blind:
            # An invalidation source is lost, or its markers not reloaded yet.
            document["reads"] = "durable tier only"
        if journal is not None:
            document["journal"] = journal
        if invalidator.applier is not None:
            # Whether this sidecar applies external broadcast events to the shared tiers.
            document["applier"] = invalidator.applier.held
        return json_reply(200 if ready else 503, document)

    def serve_metrics(self, call: Call, body: bytes) -> Reply:
        return Reply(
            200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(self.metrics.registry)
        )

    def openapi(self, call: Call, body: bytes) -> Reply:
        return Reply(200, {"Content-Type": "application/json"}, self.openapi_document)

    # -- helpers -------------------------------------------------------------------------

    def _route(
        self, call: Call, method: str, target: str, ops_only: bool
    ) -> tuple[Route, str, str | None]:
        """The route of a request, the name of the namespace it addresses, and its key as
        the path has it (still percent-encoded), if the route takes one."""
        path, _, call.query = target.partition("?")
        call.path = path
        namespace = DEFAULT_NAMESPACE
        encoded_key = None
        if ops_only:
            decoded = unquote(path)
            found = FIXED_ROUTES.get(decoded) if decoded in OPS_PATHS else None
        # Prefixes are compared as slices: str.startswith parses its arguments the generic
        # way in Python 3.11 (about 800 instructions a call, measured with callgrind), and
        # every L1 hit is routed here.
        elif path[:_CACHE_PREFIX_LENGTH] == CACHE_PREFIX:
            found, encoded_key = CACHE_ROUTES, path[_CACHE_PREFIX_LENGTH:]
        elif path[:_NAMESPACE_PREFIX_LENGTH] == NAMESPACE_PREFIX:
            # The namespace, then "cache/" and the key, or "bulk/get", "tags/<tag>/keys"...
            namespace, _, rest = path[_NAMESPACE_PREFIX_LENGTH:].partition("/")
            if "%" in namespace:
                namespace = unquote(namespace)
            if rest[:6] == "cache/":
                found, encoded_key = CACHE_ROUTES, rest[6:]
            elif rest[:5] == "tags/":
                found, encoded_key = _tag_route(rest[5:])
            else:
                found = NAMESPACED_ROUTES.get(unquote(rest))
        elif path.startswith(TAGS_PREFIX):
            found, encoded_key = _tag_route(path[len(TAGS_PREFIX) :])
        else:
            # Other paths match once decoded, as any router matches them.
            found = FIXED_ROUTES.get(unquote(path))
        if found is None:
            raise NotFound("no endpoint at this path; the API is under /v1/ (see /openapi.json)")
        route = found.get(method)
        if route is None:
            raise MethodNotAllowed(
                f"{method} is not allowed here; the Allow field lists what is", tuple(found)
            )
        return route, namespace, encoded_key

    def _check_body_head(
        self, headers: Mapping[str, str], route: Route, namespace: Namespace
    ) -> None:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UnsupportedEncoding(
                f"Content-Encoding {encoding[:40]!r} is not accepted: send the value as is "
                "(store a compressed value under its own Content-Type instead)"
            )
        length = headers.get("content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_body_bytes:
                raise PayloadTooLarge(f"body of {length} bytes exceeds {self.max_body_bytes}")
            if route.name == "put":
                _check_value_size(namespace, int(length))

    def _finish(self, call: Call, reply: Reply) -> Reply:
        elapsed = time.perf_counter() - call.started
        namespace = call.namespace
        self._record("" if namespace is None else namespace.name, call.route, reply.status, elapsed)
        if self._access_log:
            ACCESS_LOG.info(
                "%s %s %d %d %.2fms",
                call.method,
                call.path or "-",
                reply.status,
                len(reply.body),
                elapsed * 1000,
            )
        return reply

    def _start(self, work: Awaitable[Reply]) -> asyncio.Task[Reply]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel the operations still under way (the sidecar is stopping)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _tag_route(rest: str) -> tuple[dict[str, Route] | None, str | None]:
    """The route and the still-encoded tag of ``<tag>/keys`` (after ``.../tags/``)."""
    encoded = rest.removesuffix(TAG_KEYS_SUFFIX)
    if encoded == rest or not encoded or "/" in encoded:
        return None, None
    return TAG_ROUTES, encoded


def _in(call: Call) -> Namespace:
    """The namespace of a request that ``Api.head`` routed to an operation of one."""
    namespace = call.namespace
    assert namespace is not None
    return namespace


@functools.lru_cache(maxsize=1024)
def _parsed_query(raw: str, allowed: frozenset[str]) -> Mapping[str, str]:
    """The first value of each parameter of the query string ``raw``, all of them
    ``allowed``. Remembered: clients send the same few query strings again and again, and
    parse_qsl costs a few microseconds (3 % of a PUT's time). A refusal is not remembered."""
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw, keep_blank_values=True):
        query.setdefault(name, value)
    unknown = set(query) - allowed
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}")
    return types.MappingProxyType(query)


def _check_value_size(namespace: Namespace, size: int, key: str | None = None) -> None:
    limit = namespace.max_value_bytes
    if limit is not None and size > limit:
        of = "a value" if key is None else f"the value of {key[:60]!r}"
        raise PayloadTooLarge(
            f"{of} of {size} bytes exceeds max_value_bytes of namespace {namespace.name!r} "
            f"({limit})"
        )


def _route(name: str, operation: Operation, action: str | None, body: bool = False) -> Route:
    return Route(name, operation, action, body)


CACHE_ROUTES = {
    "GET": _route("get", Api.get_entry, "read"),
    "PUT": _route("put", Api.put_entry, "write", body=True),
    "DELETE": _route("delete", Api.delete_entry, "write"),
}
# The routes under /v1/ (and /v1/ns/{namespace}/) besides those of keys.
NAMESPACED_ROUTES = {
    "bulk/get": {"POST": _route("bulk_get", Api.bulk_get, "read", body=True)},
    "bulk/set": {"POST": _route("bulk_set", Api.bulk_set, "write", body=True)},
    "bulk/delete": {"POST": _route("bulk_delete", Api.bulk_delete, "write", body=True)},
    "invalidate": {"POST": _route("invalidate", Api.invalidate, "invalidate", body=True)},
    "erase": {"POST": _route("erase", Api.erase, "admin", body=True)},
}
TAG_ROUTES = {"GET": _route("tag_keys", Api.tag_keys, "admin")}
FIXED_ROUTES = {
    **{f"/v1/{path}": methods for path, methods in NAMESPACED_ROUTES.items()},
    "/healthz": {"GET": _route("healthz", Api.healthz, None)},
    "/readyz": {"GET": _route("readyz", Api.readyz, None)},
    "/metrics": {"GET": _route("metrics", Api.serve_metrics, None)},
    "/openapi.json": {"GET": _route("openapi", Api.openapi, None)},
}
# The paths of the operations listener ([server].ops_port): no cache data, no token.
OPS_PATHS = frozenset(("/healthz", "/readyz", "/metrics"))
ROUTES_BY_NAME = {
    route.name: route
    for routes in (CACHE_ROUTES, TAG_ROUTES, *FIXED_ROUTES.values())
    for route in routes.values()
}


def routes() -> Iterator[tuple[str, str, Route]]:
    """Every (method, path template, route) the API serves (the OpenAPI document lists
    the same, a test checks)."""
    for prefix in (CACHE_PREFIX, NAMESPACE_PREFIX + "{namespace}/cache/"):
        for method, route in CACHE_ROUTES.items():
            yield method, prefix + "{key}", route
    for prefix in (TAGS_PREFIX, NAMESPACE_PREFIX + "{namespace}/tags/"):
        for method, route in TAG_ROUTES.items():
            yield method, prefix + "{tag}" + TAG_KEYS_SUFFIX, route
    for path, methods in NAMESPACED_ROUTES.items():
        for method, route in methods.items():
            yield method, NAMESPACE_PREFIX + "{namespace}/" + path, route
    for path, methods in FIXED_ROUTES.items():
        for method, route in methods.items():
            yield method, path, route
