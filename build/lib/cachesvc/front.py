"""The front door: the protocol every connection to the sidecar starts with.

It answers ``GET``, ``PUT`` and ``DELETE`` of ``/v1/cache/{key}`` itself — the requests
application pods send thousands of times a second — and hands the connection to aiohttp
for anything else. Why: aiohttp's web framework spends most of its ~40 µs per request on
this machine on its own machinery (a request object, a task per request, the router, a
response object), more than an L1 hit needs in all (bench/README.md has the figures).
Here an L1 hit that the top tier answers is a few dict lookups and one write; no task is
made unless the read goes below the top tier or is a write.

What the front door answers itself is a deliberately narrow subset of HTTP/1.1: an
origin-form target under ``/v1/cache/``, ``HTTP/1.1``, well-formed ``name: value`` fields
with a ``Host``, at most one ``Content-Length``, no ``Transfer-Encoding``, ``Expect`` or
``Upgrade``, a body within ``max_body_bytes``. Anything else — every other path, method or
version, and any request it does not fully understand — goes to aiohttp with the bytes
received so far, and the connection stays with aiohttp from then on. So aiohttp's
hardened parser decides everything unusual, and both paths build their answers with the
same functions (``cachesvc.handlers``).

Requests on one connection are answered in order, one at a time (pipelined requests
wait in the buffer); idle connections are closed after ``KEEPALIVE_TIMEOUT`` (so are
those handed to aiohttp); on shutdown idle connections close at once and busy ones
after their answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from collections.abc import Coroutine
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web

from cachesvc.config import Settings, Strategy
from cachesvc.engine import Engine, Hit, NewValue
from cachesvc.errors import ServiceError, Unauthorized
from cachesvc.handlers import (
    ENGINE,
    INVALIDATOR,
    METRICS,
    SETTINGS,
    Reply,
    error_reply,
    get_reply,
    json_reply,
    key_in_target,
    new_value,
    put_reply,
)
from cachesvc.invalidator import Invalidator
from cachesvc.logs import CURRENT_REQUEST, RequestContext
from cachesvc.metrics import RequestStats
from invalidation.events import InvalidationEvent
from tiers.base import TierError

log = logging.getLogger(__name__)

# Idle keep-alive connections close after this; the aiohttp runner is given the same.
KEEPALIVE_TIMEOUT = 75.0
MAX_HEAD_BYTES = 8190  # a longer request head goes to aiohttp (its line/field limit)
MAX_FIELDS = 100  # more fields go to aiohttp (it refuses more than 128)
REQUESTS_PER_TURN = 64  # pipelined requests answered before yielding the event loop

_BARE_LF = re.compile(rb"(?<!\r)\n")
_REQUEST_LINE = re.compile(rb"(GET|PUT|DELETE) (/v1/cache/[\x21-\x7e]*) HTTP/1\.1\r\n")
# Field lines as RFC 9112 allows them, without obs-fold: token ":" OWS value OWS CRLF.
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# Fields that, present at all, send the request to aiohttp; and those that may not repeat.
_HAND_OVER_FIELDS = frozenset(("transfer-encoding", "expect", "upgrade"))
_SINGLE_FIELDS = frozenset(
    (
        "host",
        "connection",
        "content-length",
        "content-type",
        "authorization",
        "if-none-match",
        "x-cache-strategy",
    )
)
_ROUTES = {b"GET": "get", b"PUT": "put", b"DELETE": "delete"}  # the aiohttp route names
_INTERNAL_ERROR = json_reply(500, {"error": "internal_error", "detail": "unexpected server error"})
_NO_CONTENT = frozenset((204, 304))
_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus
}


class _Date:
    """The ``Date`` field, formatted once a second."""

    second = 0
    field = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.field = f"Date: {formatdate(second, usegmt=True)}\r\n"
        return cls.field


def encode_reply(reply: Reply, close: bool) -> bytes:
    head = [_STATUS_LINES[reply.status], _Date.now()]
    if reply.status not in _NO_CONTENT:  # RFC 9110 §8.6: never on a 204, nor a 304 here
        head.append(f"Content-Length: {len(reply.body)}\r\n")
    head.extend(f"{name}: {value}\r\n" for name, value in reply.headers.items())
    if close:
        head.append("Connection: close\r\n")
    head.append("\r\n")
    # Field values are ASCII: content types are validated on the way in.
    return "".join(head).encode("latin-1") + reply.body


class _AnsweringFailures:
    """``with door.answering_failures:`` — a request that fails is answered all the same:
    a connection must never stay busy with nobody to answer (nor the loop swallow the
    error in a callback). A class, not @contextmanager: it is on every request's path."""

    __slots__ = ("door",)

    def __init__(self, door: FrontDoor) -> None:
        self.door = door

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if isinstance(exc, ServiceError):
            self.door.answer(error_reply(exc))
            return True
        if isinstance(exc, (Exception, asyncio.CancelledError)):
            self.door._failed(exc)
            return True
        return False


class FrontDoor(asyncio.Protocol):
    def __init__(self, entrance: Entrance) -> None:
        self.entrance = entrance
        self.transport: asyncio.Transport | None = None
        # Received bytes; those before ``pos`` are consumed (parsing at an offset keeps a
        # long pipeline from being copied once per request).
        self.buffer = b""
        self.pos = 0
        self.busy = False  # a request is being answered
        self.close_after = False  # after the answer under way
        self.processing = False
        self.route = ""
        self.started = 0.0
        self.last_active = 0.0
        self.reading_paused = False
        self.writing_paused = False  # the transport's buffer is full: answer nothing more
        self._keepalive: asyncio.TimerHandle | None = None
        self.answering_failures = _AnsweringFailures(self)

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.entrance.doors.add(self)
        self.last_active = time.monotonic()
        self._keepalive = self.entrance.loop.call_later(KEEPALIVE_TIMEOUT, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.pos < len(self.buffer):
            self.buffer = self.buffer[self.pos :] + data
        else:
            self.buffer = data
        self.pos = 0
        if self.busy or self.writing_paused:
            if len(self.buffer) > self.entrance.buffer_limit:
                self._pause_reading()
            return
        self.process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if len(self.buffer) - self.pos <= self.entrance.buffer_limit:
            self._resume_reading()
        self.process()

    # -- requests ------------------------------------------------------------------------

    def process(self) -> None:
        """Answer the complete requests in the buffer, one at a time; at most
        ``REQUESTS_PER_TURN`` before other connections get the event loop."""
        if self.processing:
            return
        self.processing = True
        try:
            for _ in range(REQUESTS_PER_TURN):
                if not self._ready() or not self._next_request():
                    return
            if self._ready():
                self.entrance.loop.call_soon(self.process)
        finally:
            self.processing = False

    def _ready(self) -> bool:
        """Whether a buffered request may be started now."""
        transport = self.transport
        return (
            self.pos < len(self.buffer)
            and not self.busy
            and not self.writing_paused
            and transport is not None
            and not transport.is_closing()
        )

    def _next_request(self) -> bool:
        """Start answering the request at the head of the buffer; False when more bytes
        are needed first (or the connection went to aiohttp)."""
        buffer, pos = self.buffer, self.pos
        end = buffer.find(b"\r\n\r\n", pos)
        if end < 0:
            # Not complete yet: wait, unless it cannot become a request the front door
            # takes (aiohttp then answers it at once, e.g. 400 for a bare LF or non-HTTP).
            first_line_end = buffer.find(b"\n", pos)
            if (
                len(buffer) - pos > MAX_HEAD_BYTES
                or (first_line_end >= 0 and _REQUEST_LINE.match(buffer, pos) is None)
                or _BARE_LF.search(buffer, pos) is not None
            ):
                self._hand_over()
            return False
        line = _REQUEST_LINE.match(buffer, pos)
        if (
            line is None
            or end - pos > MAX_HEAD_BYTES
            or _FIELD_LINES.fullmatch(buffer, line.end(), end + 2) is None
        ):
            self._hand_over()
            return False
        headers: dict[str, str] = {}
        fields = buffer[line.end() : end].split(b"\r\n") if end + 2 > line.end() else []
        if len(fields) > MAX_FIELDS:
            self._hand_over()
            return False
        for field in fields:
            raw_name, _, raw_value = field.partition(b":")
            name = raw_name.decode("ascii").lower()
            if name in headers and (name in _SINGLE_FIELDS or name in _HAND_OVER_FIELDS):
                self._hand_over()
                return False
            headers[name] = raw_value.strip(b" \t").decode("utf-8", "surrogateescape")
        if not _HAND_OVER_FIELDS.isdisjoint(headers) or "host" not in headers:
            self._hand_over()
            return False
        length_field = headers.get("content-length", "0")
        if not length_field.isdigit() or not length_field.isascii():
            self._hand_over()
            return False
        length = int(length_field)
        if length > self.entrance.max_body_bytes:
            self._hand_over()  # aiohttp reads the body as it comes and answers 413
            return False
        body_start = end + 4
        if len(buffer) < body_start + length:
            return False  # the rest of the body is on its way
        body = buffer[body_start : body_start + length]
        self.pos = body_start + length
        connection = headers.get("connection", "").lower()
        self.close_after = "close" in connection
        method = line.group(1)
        target = line.group(2).decode("ascii")
        self.busy = True
        self.started = time.perf_counter()
        self.route = _ROUTES[method]
        with self.answering_failures:
            self._dispatch(method, target, headers, body)
        return True

    def _dispatch(self, method: bytes, target: str, headers: dict[str, str], body: bytes) -> None:
        entrance = self.entrance
        if entrance.expected_authorization is not None:
            given = headers.get("authorization", "").encode("utf-8", "surrogateescape")
            # compare_digest: the time taken must not reveal how much of the token matched.
            if not hmac.compare_digest(given, entrance.expected_authorization):
                raise Unauthorized("missing or wrong bearer token")
        if method == b"GET":
            self._get(key_in_target(target), headers)
        elif method == b"PUT":
            new, strategy = new_value(target, headers, body, entrance.settings)
            if entrance.engine.writes_behind(strategy):
                self._run(_put(entrance.engine, new, strategy), headers)
            else:
                versions, stored = entrance.engine.put_through([new], strategy)
                stored.add_done_callback(
                    lambda done: self._stored(done, put_reply(versions[0], strategy))
                )
        else:
            event = InvalidationEvent(keys=(key_in_target(target),))
            self._run(_delete(entrance.invalidator, event), headers)

    def _get(self, key: str, headers: dict[str, str]) -> None:
        engine = self.entrance.engine
        if not engine.top.readable(key):
            self._run(_get_below(engine, key, headers, top_failed=False), headers)
            return
        answer = engine.top.get(key)
        if answer.done():
            self._top_answered(key, headers, answer)
        else:
            answer.add_done_callback(lambda done: self._top_answered(key, headers, done))

    def _top_answered(
        self, key: str, headers: dict[str, str], answer: asyncio.Future[bytes | None]
    ) -> None:
        with self.answering_failures:
            if answer.cancelled():  # the tier was closed: the sidecar is stopping
                raise asyncio.CancelledError
            engine = self.entrance.engine
            failure = answer.exception()
            if isinstance(failure, TierError):
                self._run(_get_below(engine, key, headers, top_failed=True), headers)
                return
            if failure is not None:
                raise failure
            hit = engine.top_hit(key, answer.result())
            if hit is None:
                self._run(_get_below(engine, key, headers, top_failed=False), headers)
            else:
                self.answer(get_reply(hit, headers.get("if-none-match")))

    def _stored(self, stored: asyncio.Future[None], reply: Reply) -> None:
        """Answer ``reply`` once the write's promise holds, else its failure."""
        with self.answering_failures:
            if stored.cancelled():  # the sidecar is stopping
                raise asyncio.CancelledError
            failure = stored.exception()
            if failure is not None:
                raise failure
            self.answer(reply)

    def _run(self, work: Coroutine[Any, Any, Reply], headers: dict[str, str]) -> None:
        """Answer with what ``work`` returns, in a task of its own."""
        task = self.entrance.loop.create_task(self._answer_with(work, headers))
        self.entrance.tasks.add(task)
        task.add_done_callback(self.entrance.tasks.discard)

    async def _answer_with(self, work: Coroutine[Any, Any, Reply], headers: dict[str, str]) -> None:
        CURRENT_REQUEST.set(RequestContext(headers))  # the task's own context
        with self.answering_failures:  # a cancellation: the sidecar is stopping
            self.answer(await work)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self.close_after = True
        else:
            log.error("unhandled error in %s", self.route, exc_info=exc)
        self.answer(_INTERNAL_ERROR)

    def answer(self, reply: Reply) -> None:
        self.entrance.requests.record(self.route, reply.status, time.perf_counter() - self.started)
        transport = self.transport
        self.busy = False
        if transport is None or transport.is_closing():
            return
        close = self.close_after
        transport.write(encode_reply(reply, close))
        self.last_active = time.monotonic()
        if close:
            # RFC 9112 §9.6: nothing sent after a request with "close" is processed.
            self.buffer, self.pos = b"", 0
            transport.close()
            return
        if not self.writing_paused and len(self.buffer) - self.pos <= self.entrance.buffer_limit:
            self._resume_reading()
        self.process()

    # -- the connection ------------------------------------------------------------------

    def _hand_over(self) -> None:
        """Give the connection, with what it sent so far, to aiohttp for good."""
        transport = self.transport
        assert transport is not None
        handler = self.entrance.aiohttp_server()
        buffer = self.buffer[self.pos :]
        writing_paused = self.writing_paused
        self._leave()
        if self.reading_paused:
            transport.resume_reading()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if writing_paused:  # aiohttp must learn it, or its resume_writing() fails
            handler.pause_writing()
        if buffer:
            handler.data_received(buffer)

    def _leave(self) -> None:
        self.transport = None
        self.buffer, self.pos = b"", 0
        self.entrance.doors.discard(self)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self.entrance.door_left()

    def _check_idle(self) -> None:
        if self.transport is None:
            return
        idle_for = time.monotonic() - self.last_active
        if not self.busy and idle_for >= KEEPALIVE_TIMEOUT:
            self.transport.close()
            return
        self._keepalive = self.entrance.loop.call_later(
            max(KEEPALIVE_TIMEOUT - idle_for, 1.0), self._check_idle
        )

    def close_when_idle(self) -> None:
        if self.transport is None:
            return
        if self.busy:
            self.close_after = True
        else:
            self.transport.close()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()


async def _get_below(engine: Engine, key: str, headers: dict[str, str], top_failed: bool) -> Reply:
    hit: Hit | None = await engine.get_below(key, top_failed)
    return get_reply(hit, headers.get("if-none-match"))


async def _put(engine: Engine, new: NewValue, strategy: Strategy) -> Reply:
    return put_reply(await engine.put(new, strategy), strategy)


async def _delete(invalidator: Invalidator, event: InvalidationEvent) -> Reply:
    await invalidator.invalidate(event)
    return Reply(204, {})


class Entrance:
    """What the front doors of one app share; stands in for aiohttp's ``web.Server`` as
    the runner's protocol factory (see ``FrontDoorRunner``)."""

    def __init__(self, app: web.Application, aiohttp_server: web.Server) -> None:
        settings: Settings = app[SETTINGS]
        self.settings = settings
        self.engine: Engine = app[ENGINE]
        self.invalidator: Invalidator = app[INVALIDATOR]
        self.requests: RequestStats = app[METRICS].requests
        self.aiohttp_server = aiohttp_server
        self.max_body_bytes = settings.server.max_body_bytes
        self.buffer_limit = settings.server.max_body_bytes + 2 * MAX_HEAD_BYTES
        token = settings.server.auth_token
        self.expected_authorization = (
            None if token is None else f"Bearer {token.get_secret_value()}".encode()
        )
        self.loop = asyncio.get_running_loop()
        self.doors: set[FrontDoor] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._all_left: asyncio.Event | None = None

    def __call__(self) -> FrontDoor:
        return FrontDoor(self)

    def door_left(self) -> None:
        if self._all_left is not None and not self.doors:
            self._all_left.set()

    # The runner's shutdown, as aiohttp's Server has it: idle connections close first,
    # then busy ones get up to ``timeout`` to answer.

    def pre_shutdown(self) -> None:
        self.aiohttp_server.pre_shutdown()
        for door in list(self.doors):
            door.close_when_idle()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (aiohttp's signature)
        self._all_left = asyncio.Event()
        if not self.doors:
            self._all_left.set()
        # aiohttp bounds its own connections' shutdown by ``timeout``; the front doors
        # get the same time to answer what they are busy with, then are cut.
        await asyncio.gather(
            self._doors_leave(within=timeout), self.aiohttp_server.shutdown(timeout)
        )
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _doors_leave(self, within: float | None) -> None:
        assert self._all_left is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._all_left.wait()
        for door in list(self.doors):
            if door.transport is not None:
                door.transport.abort()


class FrontDoorRunner(web.AppRunner):
    """An ``AppRunner`` whose connections start at the front door. Any aiohttp site
    (``TCPSite``, ``SockSite``, the test server's) serves through it."""

    async def _make_server(self) -> web.Server:
        aiohttp_server = await super()._make_server()
        # Duck-typed: sites call the server to make protocols, the runner calls
        # pre_shutdown() and shutdown(); Entrance does those and delegates to aiohttp.
        return cast(web.Server, Entrance(self.app, aiohttp_server))
