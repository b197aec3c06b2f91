"""The front door: the sidecar's own HTTP/1.1 server protocol.

Application pods call the sidecar thousands of times a second, and aiohttp's web framework
spends most of its ~40 µs per request here on its own machinery (a request object, a task
per request, the router, a response object): more than an L1 hit needs in all
(bench/README.md has the figures). So every connection is served by this
``asyncio.Protocol``, as uvicorn's fastest path is: llhttp (``httptools``, the parser
aiohttp vendors too) decides the framing — request line, fields, Content-Length and
chunked bodies, keep-alive — and calls back; what a request means and what it gets back
is ``cachesvc.api``'s, the same for both wire paths. An in-process L1 hit is answered
inside ``data_received`` without a task; a Redis hit from its batch's callback.

What this module adds to llhttp's framing, each the way HTTP/1.1 asks for it:

- answers in order, one request at a time; pipelined requests wait, and reading pauses
  while too many wait or while the client does not read its answers (flow control);
- a timer per connection, armed on activity: a request whose head or body stops arriving
  is answered ``408`` ``body_timeout`` seconds after its last byte, an idle keep-alive
  connection is closed after ``keepalive_timeout``;
- limits: a target over ``MAX_TARGET_BYTES`` is ``414``; more than ``MAX_FIELDS`` fields,
  or one over ``MAX_FIELD_BYTES``, ``431``; a body over ``max_body_bytes`` ``413`` (the
  connection then closes: the rest of the body is not read);
- ``Expect: 100-continue`` answered; ``Upgrade`` ignored (RFC 9110 §7.8): the request is
  served as plain HTTP/1.1, its body included;
- a client that half-closes after its requests still gets their answers;
- framing errors answered ``400`` in the API's JSON error shape, logged once at INFO;
- on shutdown idle connections close at once and busy ones after their answer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

from cachesvc.api import Api, Call, Reply
from cachesvc.errors import (
    BadRequest,
    FieldsTooLarge,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    UriTooLong,
)
from tiers.base import Payload

log = logging.getLogger(__name__)

MAX_TARGET_BYTES = 8190  # aiohttp's request-line limit: the same requests fit either path
MAX_FIELD_BYTES = 8190
MAX_FIELDS = 128
MAX_WAITING = 64  # pipelined requests buffered before reading pauses
LARGE_BODY = 16384  # answers with bodies past this are written without joining head + body

# Fields that may appear once only (as aiohttp has it): a second one is a framing error.
_SINGLETON_FIELDS = frozenset(
    (
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    )
)
_NO_CONTENT = frozenset((204, 304))
_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode() for status in HTTPStatus
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# llhttp refuses these requests' framing outright: they cannot be answered in order.
_CONNECT = b"CONNECT"


class _Date:
    """The ``Date`` field, formatted once a second."""

    second = 0
    field = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.field = f"Date: {formatdate(second, usegmt=True)}\r\n".encode()
        return cls.field


def encode_head(reply: Reply, close: bool, keep_alive_1_0: bool = False) -> bytes:
    status = reply.status
    # Field values are ASCII: content types are validated on the way in.
    fields = "".join([f"{name}: {value}\r\n" for name, value in reply.headers.items()])
    if close:
        fields += "Connection: close\r\n"
    elif keep_alive_1_0:
        fields += "Connection: keep-alive\r\n"
    # RFC 9110 §8.6: no Content-Length on a 204, nor on a 304 here.
    length = b"" if status in _NO_CONTENT else b"Content-Length: %d\r\n" % len(reply.body)
    return b"".join((_STATUS_LINES[status], _Date.now(), length, fields.encode("latin-1"), b"\r\n"))


class _Request:
    """A request whose head is complete, waiting for its body or its turn."""

    __slots__ = ("body", "call", "http_1_0", "keep_alive", "size")

    def __init__(self, call: Call, http_1_0: bool) -> None:
        self.call = call
        self.body: list[bytes] = []
        self.size = 0
        self.keep_alive = True
        self.http_1_0 = http_1_0


class FrontDoor(asyncio.Protocol):
    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None  # the client's address (the audit trail's)
        self.waiting: collections.deque[_Request] = collections.deque()
        self.receiving: _Request | None = None  # the request whose body is arriving
        self.mid_message = False  # a request's head or body is arriving
        self.busy = False  # answering waiting[0]
        self.closing = False  # nothing more is read; close once the answers are out
        self.reading_paused = False
        self.writing_paused = False
        self.last_active = 0.0  # loop time
        # Answers made at once (an in-process hit), written on the loop's next turn: see
        # _answer. The transport closes after them when close_after_unsent.
        self.unsent: list[Payload] = []
        self.close_after_unsent = False
        self._timer: asyncio.TimerHandle | None = None
        # Per head: the target and fields as llhttp passes them.
        self._url = b""
        self._fields: dict[str, str] = {}
        self._field_count = 0
        self._upgrade_body: bytes | None = None  # a synthetic head to read an Upgrade's body
        self._in_synthetic_head = False

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        self.edge.doors.add(self)
        self.last_active = self.edge.loop.time()
        self._arm(self.last_active + self.edge.check_every)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = self.edge.loop.time()
        self._feed(data)
        self._process()

    def eof_received(self) -> bool:
        # A half-close after a request: its answer is still owed, so keep the transport
        # open for writing; a request cut off in the middle can never be answered.
        self.receiving = None
        self.mid_message = False
        self.closing = True
        self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.waiting.clear()
        self.receiving = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.edge.door_left(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.last_active = self.edge.loop.time()
        self._process()

    # -- llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._in_synthetic_head:
            return
        self.mid_message = True
        self._url = b""
        self._fields = {}
        self._field_count = 0

    def on_url(self, url: bytes) -> None:
        if self._in_synthetic_head:
            return
        self._url += url
        if len(self._url) > MAX_TARGET_BYTES:
            raise UriTooLong(f"the request target exceeds {MAX_TARGET_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_synthetic_head:
            return
        self._field_count += 1
        if self._field_count > MAX_FIELDS:
            raise FieldsTooLarge(f"more than {MAX_FIELDS} header fields")
        if len(name) + len(value) > MAX_FIELD_BYTES:
            raise FieldsTooLarge(f"a header field exceeds {MAX_FIELD_BYTES} bytes")
        field = name.decode("latin-1").lower()
        text = value.decode("utf-8", "surrogateescape")
        held = self._fields.get(field)
        if held is None:
            self._fields[field] = text
        elif field in _SINGLETON_FIELDS:
            raise BadRequest(f"the {field} field appears more than once")
        else:  # RFC 9110 §5.3: field lines of one name combine into a list
            self._fields[field] = f"{held}, {text}"

    def on_headers_complete(self) -> None:
        if self._in_synthetic_head:
            self._in_synthetic_head = False
            return
        parser = self.parser
        method = parser.get_method()
        if method == _CONNECT:
            raise BadRequest("CONNECT is not served here")
        target = self._url.decode("latin-1")
        if target[:1] != "/":  # (not startswith: see Api._route)
            target = _origin_form(self._url)
        call = self.edge.api.head(
            method.decode("ascii"), target, self._fields, self.edge.ops_only, self.peer
        )
        request = _Request(call, parser.get_http_version() == "1.0")
        self.receiving = request
        fields = self._fields
        if parser.should_upgrade() and (
            "content-length" in fields or "transfer-encoding" in fields
        ):
            # llhttp takes a request that asks to upgrade as having no body; the sidecar
            # upgrades to nothing, so its body is read through a head made up for it.
            framing = (
                f"Transfer-Encoding: {fields['transfer-encoding']}"
                if "transfer-encoding" in fields
                else f"Content-Length: {fields['content-length']}"
            )
            self._upgrade_body = f"PUT / HTTP/1.1\r\n{framing}\r\n\r\n".encode("latin-1")
        if call.early is not None and call.early.status == 413:
            self._complete(request, keep_alive=False)  # the body is not read
            return
        # An interim answer may only go out when no earlier answer is still owed.
        if (
            fields.get("expect", "").lower() == "100-continue"
            and call.early is None
            and not self.waiting
            and not self.busy
            and self.transport is not None
        ):
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        request = self.receiving
        if request is None or request.call.early is not None:
            return  # an answer that needs no body: it is read and dropped
        request.size += len(body)
        if request.size > self.edge.max_body_bytes:
            raise PayloadTooLarge(f"body exceeds {self.edge.max_body_bytes} bytes")
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self.receiving
        if request is None:
            return
        if self._upgrade_body is not None:
            return  # the body follows, read through the synthetic head
        self._complete(request, keep_alive=self.parser.should_keep_alive())

    # -- parsing -------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args else len(data)
            synthetic, self._upgrade_body = self._upgrade_body, None
            if synthetic is None:
                self._feed(data[offset:])  # no body: the next request follows at once
                return
            self._in_synthetic_head = True
            self._feed(synthetic + data[offset:])
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, ServiceError):
                self._refuse(cause)
            else:
                raise
        except httptools.HttpParserError as error:
            self._refuse(BadRequest(f"malformed request: {error}"))

    def _complete(self, request: _Request, keep_alive: bool) -> None:
        request.keep_alive = keep_alive
        self.receiving = None
        self.mid_message = False
        self.waiting.append(request)
        if not keep_alive:
            self.closing = True  # RFC 9112 §9.6: nothing after it is processed
        if len(self.waiting) >= MAX_WAITING:
            self._pause_reading()

    def _refuse(self, exc: ServiceError) -> None:
        """Answer, in its turn, the request the front door cannot read on; then close."""
        request = self.receiving or _Request(Call({}), http_1_0=False)
        self.edge.api.refuse(exc, request.call)
        self.receiving = None
        self._complete(request, keep_alive=False)

    # -- answering -----------------------------------------------------------------------

    def _process(self) -> None:
        """Answer the waiting requests, one at a time, in order."""
        while (
            self.waiting
            and not self.busy
            and not self.writing_paused
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            request = self.waiting[0]
            self.busy = True
            outcome = self.edge.api.respond(request.call, b"".join(request.body))
            if isinstance(outcome, Reply):
                self._answer(outcome, soon=True)
            else:
                outcome.add_done_callback(self._answered)
                return
        if not self.waiting and not self.busy:
            if self.closing and self.transport is not None and self.receiving is None:
                self._close()
            elif self.reading_paused and not self.writing_paused:
                self._resume_reading()

    def _answered(self, outcome: asyncio.Future[Reply]) -> None:
        if not self.waiting:  # the client went away meanwhile: no one to answer
            self.busy = False
            return
        if outcome.cancelled():  # the sidecar is stopping
            self.busy = False
            if self.transport is not None:
                self._close()
            return
        self._answer(self.edge.api.settled(self.waiting[0].call, outcome))
        self._process()

    def _answer(self, reply: Reply, soon: bool = False) -> None:
        """Write the answer to waiting[0]: at once, or (``soon``) on the loop's next turn.

        An answer made at once (an in-process hit) is written ``soon``, with those made
        for every connection read in the same turn: the client, woken by the first, finds
        the others ready. Written at once, each answer woke the client on its own, which
        the writer pays for (a wake-up on another CPU): measured in pairs at saturation,
        an in-process hit cost 58 us of CPU that way and 48 us this way (1.32x the
        requests/s; unchanged at 2,000 requests/s). An answer that waited for a tier
        comes from that tier's reply, with the others of its batch: written at once.
        """
        request = self.waiting.popleft()
        self.busy = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        close = not request.keep_alive or (self.closing and not self.waiting)
        head = encode_head(reply, close, request.http_1_0 and request.keep_alive)
        body = reply.body
        parts = (head, body) if len(body) > LARGE_BODY else (head + body,)
        if soon or self.unsent:  # (behind answers not written yet: in order)
            if not self.unsent:
                self.edge.loop.call_soon(self._send_unsent)
            self.unsent += parts
        else:
            transport.writelines(parts)
        self.last_active = self.edge.loop.time()
        if close:
            self.waiting.clear()
            self._close()

    def _send_unsent(self) -> None:
        unsent, self.unsent = self.unsent, []
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.writelines(unsent)
        if self.close_after_unsent:
            transport.close()

    def _close(self) -> None:
        """Close the transport once what is written is sent, answers not written yet
        included."""
        if self.unsent:
            self.close_after_unsent = True
        elif self.transport is not None:
            self.transport.close()

    # -- time and flow -------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        self._timer = self.edge.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None:
            return
        now = self.edge.loop.time()
        if self.writing_paused:
            # A client that reads none of its answers for this long is not coming back.
            deadline = self.last_active + self.edge.keepalive_timeout
            if now >= deadline:
                transport.abort()
                return
        elif self.busy or self.waiting:
            deadline = now + self.edge.body_timeout  # answering: the tiers bound it
        elif self.mid_message:
            deadline = self.last_active + self.edge.body_timeout
            if now >= deadline:
                self._refuse(
                    RequestTimeout(f"the request stopped arriving for {self.edge.body_timeout:g} s")
                )
                self._process()
                return
        else:
            deadline = self.last_active + self.edge.keepalive_timeout
            if now >= deadline:
                self._close()
                return
        # A request may begin at any moment: look again within body_timeout at the latest.
        self._arm(min(deadline, now + self.edge.check_every))

    def close_when_idle(self) -> None:
        """Shutdown: close now if idle, else after the answer under way."""
        if self.transport is None:
            return
        self.closing = True
        if not self.busy and not self.waiting:
            self._close()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()


def _origin_form(url: bytes) -> str:
    """The path and query of an absolute-form target (``http://host/path?query``)."""
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        raise BadRequest("the request target is not a path or an absolute URL") from None
    target = (parsed.path or b"/").decode("latin-1")
    if parsed.query:
        target += "?" + parsed.query.decode("latin-1")
    return target


class Edge:
    """What the front doors of one listening socket share: the API, the limits, and the
    open connections (for shutdown)."""

    def __init__(self, api: Api, *, ops_only: bool = False) -> None:
        server = api.settings.server
        self.api = api
        self.ops_only = ops_only
        self.max_body_bytes = server.max_body_bytes
        self.body_timeout = server.body_timeout
        self.keepalive_timeout = server.keepalive_timeout
        # One timer per connection, looking at its state at most this far apart.
        self.check_every = min(server.body_timeout, server.keepalive_timeout)
        self.loop = asyncio.get_running_loop()
        self.doors: set[FrontDoor] = set()
        self._all_left: asyncio.Event | None = None

    def __call__(self) -> FrontDoor:
        return FrontDoor(self)

    def door_left(self, door: FrontDoor) -> None:
        self.doors.discard(door)
        if self._all_left is not None and not self.doors:
            self._all_left.set()

    async def shutdown(self, within: float) -> None:
        """Idle connections close at once, busy ones after their answer; those still open
        ``within`` seconds later are cut."""
        self._all_left = asyncio.Event()
        for door in list(self.doors):
            door.close_when_idle()
        if self.doors:
            try:
                async with asyncio.timeout(within):
                    await self._all_left.wait()
            except TimeoutError:
                for door in list(self.doors):
                    if door.transport is not None:
                        door.transport.abort()
