"""HTTP handlers of API v1 (SPEC §3). Parsing and validation live here; the engine gets
typed, valid input only."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import parse_qsl, unquote_to_bytes

import msgpack
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cachesvc.config import STRATEGIES, Settings, Strategy
from cachesvc.engine import Engine, Hit, NewValue
from cachesvc.envelope import DEFAULT_CONTENT_TYPE
from cachesvc.errors import BadRequest, PayloadTooLarge, ServiceError
from cachesvc.invalidator import Invalidator
from cachesvc.metrics import Metrics
from invalidation.events import InvalidationEvent, MalformedEvent, parse_event

M = TypeVar("M", bound=BaseModel)

ENGINE = web.AppKey("engine", Engine)
SETTINGS = web.AppKey("settings", Settings)
INVALIDATOR = web.AppKey("invalidator", Invalidator)
METRICS = web.AppKey("metrics", Metrics)

CACHE_PREFIX = "/v1/cache/"
MAX_KEY_BYTES = 250
MAX_TAGS = 32
MAX_BULK_KEYS = 1000
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

# SPEC §3: no whitespace (any Unicode space) and no control characters (C0, DEL, C1).
_FORBIDDEN_IN_KEY = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_PUT_PARAMS = frozenset(("ttl", "strategy", "tags"))
# RFC 9110 media type: type "/" subtype *( ";" parameter ), printable ASCII only — the
# value goes back out as a response header, where CR/LF or non-ASCII would break it.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[\x20-\x7e\t]*)?")


def validate_key(key: str, what: str = "key") -> str:
    size = len(key.encode())
    if not 1 <= size <= MAX_KEY_BYTES:
        raise BadRequest(f"{what} must be 1-{MAX_KEY_BYTES} bytes of UTF-8, got {size}")
    if _FORBIDDEN_IN_KEY.search(key):
        raise BadRequest(f"{what} must not contain whitespace or control characters")
    return key


def key_of(request: web.Request) -> str:
    return key_in_target(request.raw_path)


def key_in_target(target: str) -> str:
    """The key of a ``/v1/cache/{key}`` request target, decoded from the raw target so that
    an encoded ``/``, ``?``, ``#`` or ``%`` is part of the key; invalid UTF-8 is refused."""
    raw = target.partition("?")[0]
    if not raw.startswith(CACHE_PREFIX):
        raise BadRequest("the key must follow /v1/cache/")
    try:
        key = unquote_to_bytes(raw[len(CACHE_PREFIX) :]).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("key is not valid UTF-8") from None
    return validate_key(key)


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


# -- single key ----------------------------------------------------------------------------
# The single-key operations are answered by the front door (cachesvc.front) on its fast
# path and by these handlers on connections it handed to aiohttp: both build their answer
# with the functions below.


class Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes = b""

    def response(self) -> web.Response:
        return web.Response(status=self.status, headers=self.headers, body=self.body)


JSON_TYPE = "application/json; charset=utf-8"


def json_reply(status: int, document: Any) -> Reply:
    return Reply(status, {"Content-Type": JSON_TYPE}, json.dumps(document).encode())


def error_reply(exc: ServiceError) -> Reply:
    return json_reply(exc.status, exc.body())


NOT_FOUND = json_reply(
    404, {"error": "not_found", "detail": "no tier holds a live entry for this key"}
)


def get_reply(hit: Hit | None, if_none_match: str | None) -> Reply:
    if hit is None:
        return NOT_FOUND
    etag = f'"{hit.entry.version}"'
    headers = {"X-Cache-Tier": hit.tier, "ETag": etag}
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Reply(304, headers)
    headers["Content-Type"] = hit.entry.content_type
    return Reply(200, headers, hit.entry.value)


async def get_entry(request: web.Request) -> web.StreamResponse:
    hit = await request.app[ENGINE].get(key_of(request))
    return get_reply(hit, request.headers.get("If-None-Match")).response()


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: ``*`` or a list of entity tags, compared weakly."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def new_value(
    target: str, headers: Mapping[str, str], value: bytes, settings: Settings
) -> tuple[NewValue, Strategy]:
    """What a ``PUT /v1/cache/{key}`` asks to store, and how. ``headers`` are looked up
    by lower-case name."""
    key = key_in_target(target)
    query: dict[str, str] = {}
    for name, param in parse_qsl(target.partition("?")[2], keep_blank_values=True):
        query.setdefault(name, param)
    unknown = set(query) - _PUT_PARAMS
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(sorted(unknown))[:200]}")
    strategy = parse_strategy(
        query.get("strategy") or headers.get("x-cache-strategy"), settings.write.strategy
    )
    ttl = parse_ttl(query.get("ttl"))
    raw_tags = query.get("tags", "")
    tags = parse_tags(raw_tags.split(",")) if raw_tags else ()
    content_type = validate_content_type(headers.get("content-type") or DEFAULT_CONTENT_TYPE)
    return NewValue(key, value, content_type, ttl, tags), strategy


def put_reply(version: int, strategy: Strategy) -> Reply:
    return Reply(202 if strategy == "write-behind" else 204, {"ETag": f'"{version}"'})


async def put_entry(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    key_of(request)  # a bad key is answered before the body is read
    value = await read_body(request, settings.server.max_body_bytes)
    new, strategy = new_value(request.raw_path, request.headers, value, settings)
    version = await request.app[ENGINE].put(new, strategy)
    return put_reply(version, strategy).response()


async def delete_entry(request: web.Request) -> web.StreamResponse:
    await request.app[INVALIDATOR].invalidate(InvalidationEvent(keys=(key_of(request),)))
    return web.Response(status=204)


async def invalidate(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, request.app[SETTINGS].server.max_body_bytes)
    try:
        event = parse_event(body)
    except MalformedEvent as exc:
        raise BadRequest(str(exc)) from None
    for key in event.keys:
        validate_key(key)
    for tag in event.tags:
        validate_key(tag, "tag")
    if not event:
        raise BadRequest("nothing to invalidate: give keys, prefixes or tags")
    await request.app[INVALIDATOR].invalidate(event)
    return web.json_response({"status": "accepted"}, status=202)


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body of {request.content_length} bytes exceeds {limit}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"body exceeds {limit} bytes") from None
    if len(body) > limit:  # a chunked body just past the limit
        raise PayloadTooLarge(f"body exceeds {limit} bytes")
    return body


# -- bulk ----------------------------------------------------------------------------------


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


async def bulk_get(request: web.Request) -> web.StreamResponse:
    body = await read_model(request, BulkKeys)
    keys = [validate_key(key) for key in body.keys]
    hits = await request.app[ENGINE].get_many(keys)
    as_msgpack = wants_msgpack(request)
    entries: list[dict[str, Any]] = []
    missing: list[str] = []
    for key, hit in zip(keys, hits, strict=True):
        if hit is None:
            missing.append(key)
            continue
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
    return encode_response(request, {"entries": entries, "missing": missing})


async def bulk_set(request: web.Request) -> web.StreamResponse:
    body = await read_model(request, BulkSet)
    strategy = parse_strategy(
        body.strategy or request.headers.get("X-Cache-Strategy"),
        request.app[SETTINGS].write.strategy,
    )
    values = [
        NewValue(
            validate_key(item.key),
            item.payload(),
            validate_content_type(item.content_type),
            item.ttl,
            parse_tags(item.tags),
        )
        for item in body.entries
    ]
    versions = await request.app[ENGINE].put_many(values, strategy)
    status = 202 if strategy == "write-behind" else 200
    result = {"versions": {new.key: version for new, version in zip(values, versions, strict=True)}}
    return encode_response(request, result, status)


async def bulk_delete(request: web.Request) -> web.StreamResponse:
    body = await read_model(request, BulkKeys)
    keys = tuple(validate_key(key) for key in body.keys)
    await request.app[INVALIDATOR].invalidate(InvalidationEvent(keys=keys))
    return web.Response(status=204)


def is_msgpack(content_type: str) -> bool:
    return content_type in MSGPACK_TYPES


def wants_msgpack(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    if any(kind in accept for kind in MSGPACK_TYPES):
        return True
    return is_msgpack(request.content_type) and "json" not in accept


async def read_model(request: web.Request, model: type[M]) -> M:
    data = await read_body(request, request.app[SETTINGS].server.max_body_bytes)
    try:
        document = msgpack.unpackb(data) if is_msgpack(request.content_type) else json.loads(data)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
        raise BadRequest(f"body is not valid {request.content_type or 'JSON'}: {exc}") from None
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise BadRequest(f"{where}: {first['msg']}{more}") from None


def encode_response(request: web.Request, document: Any, status: int = 200) -> web.Response:
    if wants_msgpack(request):
        return web.Response(
            body=msgpack.packb(document), status=status, content_type="application/msgpack"
        )
    return web.json_response(document, status=status)


def error_response(status: int, code: str, detail: str) -> web.Response:
    return json_reply(status, {"error": code, "detail": detail}).response()
