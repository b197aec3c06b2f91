"""The front door against aiohttp alone: the same request streams — valid, pipelined,
malformed, split at random points — sent to both give the same statuses and leave the same
values stored.

"aiohttp alone" is aiohttp's own server and parser in front of the same request layer
(``cachesvc.api``), through a thin adapter written here: the reference for every framing
decision the front door makes with llhttp. Where the two differ by design the comparison
says so: the front door answers an over-long target ``414`` and too many or too large
fields ``431``, where aiohttp answers ``400``. Two behaviours of aiohttp's are left out of
the streams because the front door fixes them: a request asking to upgrade
(``Connection: Upgrade``) is served as plain HTTP/1.1 (aiohttp waits for the upgraded
protocol), and requests pipelined in the same segment as a malformed one are still
answered (aiohttp drops them) — so a malformed request is sent after the answers to the
stream's valid ones.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import NamedTuple

import pytest
from aiohttp import web

from cachesvc.api import Reply
from cachesvc.app import API, Service, create_app
from cachesvc.config import Settings
from tests.service.conftest import settings_for

STREAMS = 240
KEYS = ["a", "b", "c%2Fd", "e:1", "f"]
# The front door's answer -> what aiohttp answers for the same bytes.
BY_DESIGN = {414: 400, 431: 400}


async def _adapter(request: web.Request) -> web.StreamResponse:
    api = request.app[API]
    headers = {name.lower(): ", ".join(request.headers.getall(name)) for name in request.headers}
    call = api.head(request.method, request.raw_path, headers)
    body = await request.read() if call.early is None and request.can_read_body else b""
    outcome = api.respond(call, body)
    reply = outcome if isinstance(outcome, Reply) else await outcome
    return web.Response(status=reply.status, headers=reply.headers, body=reply.body)


class AiohttpAlone:
    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.app.router.add_route("*", "/{path:.*}", _adapter)
        self.runner = web.AppRunner(self.app, access_log=None, auto_decompress=False)
        self.port = 0

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[int, int]]:
    settings = settings_for("memory://", server={"max_body_bytes": 4096})
    front = Service(settings)
    alone = AiohttpAlone(settings)
    await front.start()
    await alone.start()
    yield front.port, alone.port
    await alone.stop()
    await front.stop()


def _request(method: str, target: str, *fields: str, body: bytes | None = None) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: differential", *fields]
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")


def _valid(rng: random.Random) -> bytes:
    key = rng.choice(KEYS)
    kind = rng.randrange(12)
    if kind == 0:
        value = rng.randbytes(rng.randrange(0, 64))
        query = rng.choice(["", "?ttl=60", "?tags=t1,t2", "?strategy=cache-aside", "?ttl=-1"])
        return _request("PUT", f"/v1/cache/{key}{query}", "Content-Type: text/plain", body=value)
    if kind == 1:
        chunks = [rng.randbytes(rng.randrange(1, 20)) for _ in range(rng.randrange(1, 4))]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        return _request("PUT", f"/v1/cache/{key}", "Transfer-Encoding: chunked") + body
    if kind == 2:
        return _request("DELETE", f"/v1/cache/{key}")
    if kind == 3:
        document = {"entries": [{"key": k, "value": rng.choice(["x", "yy"])} for k in KEYS[:3]]}
        return _request(
            "POST",
            "/v1/bulk/set",
            "Content-Type: application/json",
            body=json.dumps(document).encode(),
        )
    if kind == 4:
        body = json.dumps({"keys": KEYS}).encode()
        return _request("POST", "/v1/bulk/get", "Content-Type: application/json", body=body)
    if kind == 5:
        body = json.dumps({"prefixes": [key[:1]]}).encode()
        return _request("POST", "/v1/invalidate", body=body)
    if kind == 6:
        return _request(rng.choice(["PATCH", "POST"]), f"/v1/cache/{key}", body=b"")
    if kind == 7:
        return _request("GET", rng.choice(["/nowhere", "/healthz", "/v1/bulk/get"]))
    if kind == 8:
        return _request("GET", f"/v1/cache/{key}", 'If-None-Match: "1", "2"')
    if kind == 9:
        return _request("PUT", f"/v1/cache/{key}", "Content-Encoding: gzip", body=b"zz")
    if kind == 10:
        return _request("PUT", "/v1/cache/" + "k" * 300, body=b"v")  # a key over 250 bytes
    return _request("GET", f"/v1/cache/{key}", "Upgrade: h2c")  # not asking: no Connection


MALFORMED = [
    b"GET /v1/cache/a HTTP/1.1\nHost: x\n\n",
    b"GET /v1/cache/a HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
    b"GET /v1/cache/a HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    b"PUT /v1/cache/a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"PUT /v1/cache/a HTTP/1.1\r\nHost: x\r\nContent-Length: -4\r\n\r\n",
    b"PUT /v1/cache/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"G@T /v1/cache/a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/cache/a HTTP/9.9\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    b"GET /v1/cache/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    _request("GET", "/v1/cache/" + "k" * 9000),
    _request("GET", "/v1/cache/a", *(f"X-F{n}: v" for n in range(130))),
]


CLOSING = _request("GET", "/healthz", "Connection: close")


class Stream(NamedTuple):
    valid: bytes  # pipelined requests
    count: int  # how many
    last: bytes  # a malformed request, or one that closes the connection
    malformed: bool


def _stream(rng: random.Random) -> Stream:
    requests = [_valid(rng) for _ in range(rng.randrange(1, 5))]
    malformed = rng.random() < 0.3
    last = rng.choice(MALFORMED) if malformed else CLOSING
    return Stream(b"".join(requests), len(requests), last, malformed)


def _cut(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` in up to four pieces, cut at random points."""
    cuts = sorted(rng.sample(range(1, len(data)), k=min(3, len(data) - 1)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


async def _read_status(reader: asyncio.StreamReader) -> int | None:
    """The next final answer's status; None when the server closed the connection."""
    while line := await reader.readline():
        length = 0
        while (field := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = field.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        if (status := int(line.split()[1])) >= 200:
            return status
    return None


async def _send(port: int, stream: Stream, pieces: list[bytes], last: list[bytes]) -> list[int]:
    """Statuses answered on one connection: the valid requests written in ``pieces``, their
    answers read, then the last request written in pieces and the rest read until the
    server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    statuses: list[int] = []
    try:
        async with asyncio.timeout(10):
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
            for _ in range(stream.count):
                if (status := await _read_status(reader)) is not None:
                    statuses.append(status)
            for piece in last:
                writer.write(piece)
                await writer.drain()
            while (status := await _read_status(reader)) is not None:
                statuses.append(status)
    except ConnectionError:
        pass  # reset by the server after its last answer
    finally:
        writer.close()
    return statuses


async def _stored(port: int) -> dict[str, tuple[int, bytes]]:
    found = {}
    for key in KEYS:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request("GET", f"/v1/cache/{key}", "Connection: close"))
        answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        found[key] = (int(head.split()[1]), body)
    return found


async def test_front_door_and_aiohttp_agree(pair: tuple[int, int]) -> None:
    front, alone = pair
    rng = random.Random(20261207)
    compared = malformed_streams = 0
    for _ in range(STREAMS):
        stream = _stream(rng)
        pieces, last = _cut(rng, stream.valid), _cut(rng, stream.last)
        front_statuses = await _send(front, stream, pieces, last)
        alone_statuses = await _send(alone, stream, pieces, last)
        expected = [BY_DESIGN.get(status, status) for status in front_statuses]
        assert expected == alone_statuses, (stream.valid + stream.last)[:400]
        assert len(front_statuses) == stream.count + 1
        compared += 1
        malformed_streams += stream.malformed
    assert compared == STREAMS and malformed_streams > 40
    assert await _stored(front) == await _stored(alone)
