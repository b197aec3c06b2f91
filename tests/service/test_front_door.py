"""The front door (cachesvc.front) at the byte level: what it answers itself, what it hands
to aiohttp, and that a connection keeps working either way.

Which of the two answered is visible: aiohttp adds a ``Server`` field, the front door
does not.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, NamedTuple

import pytest
from aiohttp.test_utils import TestClient

from tests.service.conftest import MakeClient, settings_for

Client = TestClient[Any, Any]


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def from_aiohttp(self) -> bool:
        return "server" in self.headers


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """The next final answer (an interim ``100 Continue`` is skipped)."""
    while (status_line := await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 1"):
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length)
    return Answer(int(status_line.split()[1]), headers, body)


async def exchange(client: Client, *chunks: bytes, answers: int) -> list[Answer]:
    """Send ``chunks`` (each its own write) on one connection; read ``answers``."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        return [await asyncio.wait_for(read_answer(reader), 5) for _ in range(answers)]
    finally:
        writer.close()


@pytest.fixture
async def sidecar(make_client: MakeClient) -> Client:
    return await make_client()


def request(method: str, target: str, *fields: str, body: bytes = b"") -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: sidecar", *fields]
    if body:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_pipelined_requests_are_answered_in_order_by_the_front_door(
    sidecar: Client,
) -> None:
    pipeline = b"".join(
        [
            request("PUT", "/v1/cache/a", "Content-Type: text/plain", body=b"one"),
            request("GET", "/v1/cache/a"),
            request("GET", "/v1/cache/missing"),
            request("DELETE", "/v1/cache/a"),
            request("GET", "/v1/cache/a"),
        ]
    )
    answers = await exchange(sidecar, pipeline, answers=5)
    assert [a.status for a in answers] == [204, 200, 404, 204, 404]
    assert not any(a.from_aiohttp for a in answers)
    put, hit, miss = answers[:3]
    assert hit.body == b"one"
    assert hit.headers["content-type"] == "text/plain"
    assert hit.headers["x-cache-tier"] == "l1"
    assert hit.headers["etag"] == put.headers["etag"]
    assert "date" in hit.headers
    assert "content-length" not in put.headers  # RFC 9110: never on a 204
    assert json.loads(miss.body)["error"] == "not_found"


async def test_a_request_in_pieces_is_answered_once_complete(sidecar: Client) -> None:
    whole = request("PUT", "/v1/cache/slow", body=b"x" * 5000) + request("GET", "/v1/cache/slow")
    pieces = [whole[i : i + 7] for i in range(0, len(whole), 7)]
    put, get = await exchange(sidecar, *pieces, answers=2)
    assert (put.status, get.status, get.body) == (204, 200, b"x" * 5000)
    assert not put.from_aiohttp and not get.from_aiohttp


async def test_connection_close_is_honoured(sidecar: Client) -> None:
    reader, writer = await asyncio.open_connection(sidecar.server.host, sidecar.server.port)
    writer.write(request("GET", "/v1/cache/k", "Connection: close"))
    answer = await asyncio.wait_for(read_answer(reader), 5)
    assert answer.status == 404
    assert answer.headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the sidecar
    writer.close()


async def test_nothing_after_a_close_request_is_processed(sidecar: Client) -> None:
    # RFC 9112 §9.6: a request pipelined behind one with "Connection: close" is not run.
    await exchange(sidecar, request("PUT", "/v1/cache/kept", body=b"v"), answers=1)
    reader, writer = await asyncio.open_connection(sidecar.server.host, sidecar.server.port)
    writer.write(
        request("GET", "/v1/cache/kept", "Connection: close") + request("DELETE", "/v1/cache/kept")
    )
    answer = await asyncio.wait_for(read_answer(reader), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert answer.status == 200
    (still,) = await exchange(sidecar, request("GET", "/v1/cache/kept"), answers=1)
    assert still.status == 200


@pytest.mark.parametrize(
    "unusual",
    [
        pytest.param(
            b"PUT /v1/cache/c HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            id="chunked-body",
        ),
        pytest.param(
            b"PUT /v1/cache/c HTTP/1.1\r\nHost: s\r\nExpect: 100-continue\r\n"
            b"Content-Length: 3\r\n\r\nabc",
            id="expect-100-continue",
        ),
        pytest.param(b"GET /v1/cache/c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", id="http-1.0"),
        pytest.param(
            b"POST /v1/bulk/get HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\n"
            b'Content-Length: 15\r\n\r\n{"keys": ["c"]}',
            id="other-route",
        ),
    ],
)
async def test_unusual_requests_go_to_aiohttp_and_the_connection_keeps_working(
    sidecar: Client, unusual: bytes
) -> None:
    answers = await exchange(sidecar, unusual + request("GET", "/v1/cache/c"), answers=2)
    first, then = answers
    assert first.from_aiohttp and then.from_aiohttp  # the connection stays with aiohttp
    assert first.status in (200, 204, 404)
    assert then.status in (200, 404)


async def test_chunked_put_handed_to_aiohttp_stores_the_value(sidecar: Client) -> None:
    chunked = (
        b"PUT /v1/cache/chunky HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    put, get = await exchange(sidecar, chunked + request("GET", "/v1/cache/chunky"), answers=2)
    assert (put.status, get.status, get.body) == (204, 200, b"abcde")


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(
            b"GET /v1/cache/k HTTP/1.1\r\nHost: s\r\nX-A : 1\r\n\r\n", id="space-before-colon"
        ),
        pytest.param(b"GET /v1/cache/k HTTP/1.1\r\nX-A: 1\r\n\r\n", id="no-host"),
        pytest.param(b"GET /v1/cache/k HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="two-hosts"),
        pytest.param(b"GET /v1/cache/k HTTP/1.1\nHost: a\n\n", id="bare-lf"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", id="not-http"),
        pytest.param(
            b"GET /v1/cache/k HTTP/1.1\r\nHost: s\r\nX-A: 1\r\n folded\r\n\r\n", id="obs-fold"
        ),
        pytest.param(
            b"PUT /v1/cache/k HTTP/1.1\r\nHost: s\r\n"
            b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            id="two-content-lengths",
        ),
        pytest.param(
            b"PUT /v1/cache/k HTTP/1.1\r\nHost: s\r\nContent-Length: -1\r\n\r\n",
            id="negative-length",
        ),
    ],
)
async def test_malformed_requests_get_aiohttps_400(sidecar: Client, broken: bytes) -> None:
    reader, writer = await asyncio.open_connection(sidecar.server.host, sidecar.server.port)
    writer.write(broken)
    status_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    writer.close()
    assert status_line.split()[1] == b"400"


async def test_body_over_the_limit_is_413_and_nothing_is_stored(make_client: MakeClient) -> None:
    sidecar = await make_client(settings_for("memory://", server={"max_body_bytes": 1000}))
    too_big = request("PUT", "/v1/cache/big", body=b"x" * 1001)
    put, get = await exchange(sidecar, too_big + request("GET", "/v1/cache/big"), answers=2)
    assert put.status == 413
    assert json.loads(put.body)["error"] == "payload_too_large"
    assert get.status == 404


async def test_front_door_checks_the_token(make_client: MakeClient) -> None:
    sidecar = await make_client(settings_for("memory://", server={"auth_token": "s3cret"}))
    denied, allowed = await exchange(
        sidecar,
        request("PUT", "/v1/cache/k", body=b"v")
        + request("PUT", "/v1/cache/k", "Authorization: Bearer s3cret", body=b"v"),
        answers=2,
    )
    assert not denied.from_aiohttp
    assert denied.status == 401
    assert json.loads(denied.body)["error"] == "unauthorized"
    assert allowed.status == 204


async def test_bad_input_answered_by_the_front_door_is_json(sidecar: Client) -> None:
    bad_ttl, bad_key = await exchange(
        sidecar,
        request("PUT", "/v1/cache/k?ttl=-1", body=b"v") + request("GET", "/v1/cache/a%20b"),
        answers=2,
    )
    assert not bad_ttl.from_aiohttp and not bad_key.from_aiohttp
    assert (bad_ttl.status, bad_key.status) == (400, 400)
    assert "ttl" in json.loads(bad_ttl.body)["detail"]
    assert bad_key.headers["content-type"] == "application/json; charset=utf-8"


async def test_front_door_requests_are_counted(sidecar: Client) -> None:
    await exchange(sidecar, request("GET", "/v1/cache/nothing"), answers=1)
    metrics = await (await sidecar.get("/metrics")).text()
    assert 'cachesvc_requests_total{operation="get",status="404"} 1.0' in metrics
