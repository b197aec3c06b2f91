"""The HTTP edge at the byte level: what the front door answers, for every defect a review
with raw sockets and real clients found, on a fresh connection and on one that served other
routes first (which, before the front door served every route, had been handed to aiohttp
for good)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import pytest

from tests.polling import until
from tests.service.conftest import Client, MakeClient, settings_for


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


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


def request(method: str, target: str, *fields: str, body: bytes = b"") -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: sidecar", *fields]
    if body or method in ("PUT", "POST"):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BULK_GET = request(
    "POST", "/v1/bulk/get", "Content-Type: application/json", body=b'{"keys": ["x"]}'
)


class Connection:
    """One raw connection to a sidecar."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.writer.write(chunk)
            await self.writer.drain()

    async def answer(self, within: float = 5.0) -> Answer:
        return await asyncio.wait_for(read_answer(self.reader), within)

    async def closed_by_server(self, within: float = 5.0) -> bool:
        return await asyncio.wait_for(self.reader.read(), within) == b""

    def close(self) -> None:
        self.writer.close()


Connect = Callable[[], Awaitable[Connection]]


async def connect_to(client: Client, warm: bool) -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    connection = Connection(reader, writer)
    if warm:  # a connection that served another route first
        await connection.send(BULK_GET)
        assert (await connection.answer()).status == 200
    return connection


WAYS = ["fresh", "warm"]


class Way(NamedTuple):
    client: Client
    connect: Connect


async def make_way(make_client: MakeClient, way: str, **server: Any) -> Way:
    server = {"body_timeout": 0.5, **server}
    client = await make_client(settings_for("memory://", server=server))

    async def connect() -> Connection:
        return await connect_to(client, warm=way == "warm")

    return Way(client, connect)


@pytest.fixture(params=WAYS)
async def way(request: pytest.FixtureRequest, make_client: MakeClient) -> Way:
    return await make_way(make_client, request.param)


async def stored(client: Client, key: str) -> bytes | None:
    response = await client.get(f"/v1/cache/{key}")
    return await response.read() if response.status == 200 else None


# -- the answers of every way ---------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(way: Way) -> None:
    connection = await way.connect()
    await connection.send(
        request("PUT", "/v1/cache/a", "Content-Type: text/plain", body=b"one")
        + request("GET", "/v1/cache/a")
        + request("GET", "/v1/cache/missing")
        + request("DELETE", "/v1/cache/a")
        + request("GET", "/v1/cache/a")
    )
    answers = [await connection.answer() for _ in range(5)]
    connection.close()
    assert [a.status for a in answers] == [204, 200, 404, 204, 404]
    put, hit, miss = answers[:3]
    assert (hit.body, hit.headers["content-type"]) == (b"one", "text/plain")
    assert hit.headers["x-cache-tier"] == "l1"
    assert hit.headers["cache-status"] == "cachesvc; hit; detail=l1"
    assert miss.headers["cache-status"] == "cachesvc; fwd=miss"
    assert hit.headers["etag"] == put.headers["etag"]
    assert "date" in hit.headers
    assert "content-length" not in put.headers  # RFC 9110: never on a 204
    assert json.loads(miss.body)["error"] == "not_found"


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate, gzip"])
async def test_a_compressed_put_is_415_and_stores_nothing(way: Way, encoding: str) -> None:
    """Defect 1: the stored value depended on connection history."""
    connection = await way.connect()
    await connection.send(
        request("PUT", "/v1/cache/z", f"Content-Encoding: {encoding}", body=b"\x1f\x8bnot gzip")
        + request("GET", "/v1/cache/z")
    )
    refused, after = await connection.answer(), await connection.answer()
    connection.close()
    assert refused.status == 415
    assert refused.headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(refused.body)["error"] == "unsupported_content_encoding"
    assert after.status == 404  # nothing stored, and the connection goes on


async def test_identity_encoding_is_accepted(way: Way) -> None:
    connection = await way.connect()
    await connection.send(request("PUT", "/v1/cache/i", "Content-Encoding: identity", body=b"v"))
    assert (await connection.answer()).status == 204
    connection.close()
    assert await stored(way.client, "i") == b"v"


async def test_a_stalled_body_is_408_and_the_connection_closes(way: Way) -> None:
    """Defect 2: stalled uploads were held for good on aiohttp's connections."""
    connections = [await way.connect() for _ in range(10)]
    started = time.monotonic()
    for connection in connections:
        await connection.send(request("PUT", "/v1/cache/s", body=b"x" * 100)[:-60])
    answers = [await connection.answer(within=5) for connection in connections]
    assert all(answer.status == 408 for answer in answers)
    assert json.loads(answers[0].body)["error"] == "request_timeout"
    assert time.monotonic() - started < 5
    for connection in connections:
        assert await connection.closed_by_server()
        connection.close()
    assert await stored(way.client, "s") is None


async def test_a_stalled_head_is_answered_408(way: Way) -> None:
    connection = await way.connect()
    await connection.send(b"GET /v1/cache/k HTTP/1.1\r\nHost: s\r\n")
    assert (await connection.answer()).status == 408
    assert await connection.closed_by_server()
    connection.close()


async def test_a_slow_body_that_keeps_coming_is_served(way: Way) -> None:
    """Defect 3: the idle timer ignored activity (body_timeout is 0.5 s here; the body takes
    2 s, a byte every 0.1 s)."""
    connection = await way.connect()
    whole = request("PUT", "/v1/cache/slow", body=b"0123456789" * 2)
    head, body = whole[: -len(b"0123456789" * 2)], whole[-20:]
    await connection.send(head)
    for byte in body:
        await asyncio.sleep(0.1)
        await connection.send(bytes([byte]))
    assert (await connection.answer()).status == 204
    connection.close()
    assert await stored(way.client, "slow") == b"0123456789" * 2


async def test_a_slow_reader_gets_every_pipelined_answer(
    make_client: MakeClient,
) -> None:
    """Defect 3: a slow reader's fifth pipelined request was dropped without a
    ``Connection: close`` on the fourth answer. Five answers of 1 MiB fill the socket
    buffers; the client reads 64 KiB every 20 ms, so taking them all lasts well past the
    idle timeout (0.3 s) while it keeps making progress."""
    way = await make_way(
        make_client, "fresh", keepalive_timeout=0.3, max_body_bytes=2 * 1024 * 1024
    )
    value = b"v" * (1024 * 1024)
    await way.client.put("/v1/cache/big", data=io.BytesIO(value))
    connection = await way.connect()
    await connection.send(request("GET", "/v1/cache/big") * 5)
    started = time.monotonic()
    received = b""
    expected = 5 * len(value)
    while received.count(b"v") < expected:
        chunk = await asyncio.wait_for(connection.reader.read(65536), 5)
        assert chunk, "closed before every answer was read"
        received += chunk
        await asyncio.sleep(0.02)
    connection.close()
    assert time.monotonic() - started > 1.0
    assert received.count(b"HTTP/1.1 200 OK") == 5
    assert b"Connection: close" not in received


async def test_a_half_closed_client_gets_its_answer(way: Way) -> None:
    """Defect 4: ``shutdown(SHUT_WR)`` after a request left it unanswered."""
    connection = await way.connect()
    await connection.send(
        request("PUT", "/v1/cache/h", body=b"half") + request("GET", "/v1/cache/h")
    )
    sock = connection.writer.get_extra_info("socket")
    sock.shutdown(socket.SHUT_WR)
    put, get = await connection.answer(), await connection.answer()
    assert (put.status, get.status, get.body) == (204, 200, b"half")
    assert await connection.closed_by_server()
    connection.close()


@pytest.mark.parametrize(
    "upgrade",
    [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAA",
        "Connection: Upgrade\r\nUpgrade: websocket",
    ],
    ids=["h2c", "websocket"],
)
async def test_upgrade_is_ignored_and_the_request_served(way: Way, upgrade: str) -> None:
    """Defect 5: Java's HttpClient sends ``Upgrade: h2c`` on each connection's first
    request, body included."""
    connection = await way.connect()
    await connection.send(
        request("PUT", "/v1/cache/u", upgrade, body=b"body")
        + request("GET", "/v1/cache/u", upgrade)
        + request("GET", "/v1/cache/u")
    )
    put, first, second = [await connection.answer() for _ in range(3)]
    connection.close()
    assert (put.status, first.status, second.status) == (204, 200, 200)
    assert first.body == second.body == b"body"


async def test_chunked_bodies_are_served(way: Way) -> None:
    """Defect 5: Node's ``http`` module sends chunked bodies."""
    connection = await way.connect()
    await connection.send(
        b"PUT /v1/cache/chunky HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n",
        b"2\r\nde\r\n0\r\n\r\n" + request("GET", "/v1/cache/chunky"),
    )
    put, get = await connection.answer(), await connection.answer()
    connection.close()
    assert (put.status, get.status, get.body) == (204, 200, b"abcde")


@pytest.mark.parametrize(
    ("field", "closes"),
    [
        ("Connection: notclose", False),
        ("Connection: keep-alive", False),
        ("Connection: keep-alive, close", True),
        ("Connection: Close", True),
    ],
)
async def test_connection_is_a_token_list(way: Way, field: str, closes: bool) -> None:
    """Defect 6: ``Connection: notclose`` closed the connection."""
    connection = await way.connect()
    await connection.send(request("GET", "/v1/cache/k", field))
    answer = await connection.answer()
    assert answer.status == 404
    assert (answer.headers.get("connection") == "close") is closes
    if closes:
        assert await connection.closed_by_server()
    else:
        await connection.send(request("GET", "/v1/cache/k"))
        assert (await connection.answer()).status == 404
    connection.close()


async def test_nothing_after_a_close_request_is_processed(way: Way) -> None:
    """RFC 9112 §9.6: a request pipelined behind one with ``Connection: close`` is not run."""
    await way.client.put("/v1/cache/kept", data=b"v")
    connection = await way.connect()
    await connection.send(
        request("GET", "/v1/cache/kept", "Connection: close") + request("DELETE", "/v1/cache/kept")
    )
    assert (await connection.answer()).status == 200
    assert await connection.closed_by_server()
    connection.close()
    assert await stored(way.client, "kept") == b"v"


async def test_401_names_the_bearer_scheme(make_client: MakeClient) -> None:
    """Defect 7."""
    for name in WAYS:
        way = await make_way(make_client, name, auth_token="s3cret")
        connection = await way.connect() if name != "warm" else await _warm_with_token(way)
        await connection.send(
            request("PUT", "/v1/cache/k", body=b"v")
            + request("PUT", "/v1/cache/k", "Authorization: Bearer s3cret", body=b"v")
        )
        denied, allowed = await connection.answer(), await connection.answer()
        connection.close()
        assert denied.status == 401, name
        assert denied.headers["www-authenticate"].startswith("Bearer"), name
        assert json.loads(denied.body)["error"] == "unauthorized"
        assert allowed.status == 204, name


async def _warm_with_token(way: Way) -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", way.client.server.port)
    connection = Connection(reader, writer)
    await connection.send(
        BULK_GET.replace(b"Host: sidecar", b"Host: sidecar\r\nAuthorization: Bearer s3cret")
    )
    assert (await connection.answer()).status == 200
    return connection


async def test_if_none_match_over_two_field_lines(way: Way) -> None:
    """Defect 7: only the first line was read."""
    connection = await way.connect()
    await connection.send(request("PUT", "/v1/cache/e", body=b"v"))
    etag = (await connection.answer()).headers["etag"]
    await connection.send(
        request("GET", "/v1/cache/e", 'If-None-Match: "1"', f"If-None-Match: {etag}")
    )
    answer = await connection.answer()
    connection.close()
    assert answer.status == 304


async def test_a_long_target_is_414_and_many_fields_431(way: Way) -> None:
    """Defect 7 (aiohttp's parser answers both 400: the differential test allows for it)."""
    connection = await way.connect()
    await connection.send(request("GET", "/v1/cache/" + "k" * 9000))
    long_target = await connection.answer()
    assert long_target.status == 414
    assert json.loads(long_target.body)["error"] == "uri_too_long"
    connection.close()
    connection = await way.connect()
    await connection.send(request("GET", "/v1/cache/k", *(f"X-F{n}: v" for n in range(129))))
    many_fields = await connection.answer()
    assert many_fields.status == 431
    assert json.loads(many_fields.body)["error"] == "header_fields_too_large"
    connection.close()
    connection = await way.connect()
    await connection.send(request("GET", "/v1/cache/k", "X-Big: " + "v" * 9000))
    assert (await connection.answer()).status == 431
    connection.close()


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(
            b"GET /v1/cache/k HTTP/1.1\r\nHost: s\r\nX-A : 1\r\n\r\n", id="space-before-colon"
        ),
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
        pytest.param(
            b"PUT /v1/cache/k HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            id="bad-chunk-size",
        ),
    ],
)
async def test_framing_errors_are_json_400_logged_once_without_traceback(
    way: Way, broken: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Defect 7: framing errors came back text/plain echoing the request bytes, and were
    logged at ERROR with a traceback."""
    caplog.set_level(logging.INFO)
    connection = await way.connect()
    await connection.send(broken)
    answer = await connection.answer()
    assert await connection.closed_by_server()
    connection.close()
    assert answer.status == 400
    assert answer.headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(answer.body)["error"] == "bad_request"
    assert b"\x16\x03" not in answer.body and b"folded" not in answer.body
    refusals = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.INFO and refusals[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    metrics = await (await way.client.get("/metrics")).text()
    assert 'cachesvc_malformed_requests_total{error="bad_request"} 1.0' in metrics


async def test_body_over_the_limit_is_413_and_nothing_is_stored(make_client: MakeClient) -> None:
    for name in WAYS:
        way = await make_way(make_client, name, max_body_bytes=1000)
        for framing in ("length", "chunked"):
            connection = await way.connect()
            if framing == "length":
                await connection.send(request("PUT", "/v1/cache/big", body=b"x" * 1001))
            else:
                await connection.send(
                    b"PUT /v1/cache/big HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"200\r\n"
                    + b"x" * 512
                    + b"\r\n"
                    + b"200\r\n"
                    + b"x" * 512
                    + b"\r\n"
                )
            answer = await connection.answer()
            connection.close()
            assert answer.status == 413, (name, framing)
            assert json.loads(answer.body)["error"] == "payload_too_large"
        assert await stored(way.client, "big") is None


async def test_expect_100_continue(way: Way) -> None:
    connection = await way.connect()
    head = request("PUT", "/v1/cache/c", "Expect: 100-continue", body=b"abc")[:-3]
    await connection.send(head)
    interim = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    await connection.send(b"abc")
    assert (await connection.answer()).status == 204
    connection.close()
    assert await stored(way.client, "c") == b"abc"


async def test_http_1_0_keep_alive(way: Way) -> None:
    await way.client.put("/v1/cache/old", data=b"v")
    connection = await way.connect()
    await connection.send(b"GET /v1/cache/old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    answer = await connection.answer()
    assert (answer.status, answer.body) == (200, b"v")
    await connection.send(b"GET /v1/cache/old HTTP/1.0\r\n\r\n")
    assert (await connection.answer()).status == 200
    assert await connection.closed_by_server()  # 1.0 without keep-alive: closed after
    connection.close()


async def test_absolute_form_targets(way: Way) -> None:
    connection = await way.connect()
    await connection.send(request("PUT", "http://sidecar/v1/cache/abs?ttl=60", body=b"v"))
    assert (await connection.answer()).status == 204
    connection.close()
    assert await stored(way.client, "abs") == b"v"


async def test_requests_are_counted(way: Way) -> None:
    connection = await way.connect()
    await connection.send(request("GET", "/v1/cache/nothing"))
    await connection.answer()
    connection.close()
    metrics = await (await way.client.get("/metrics")).text()
    assert (
        'cachesvc_requests_total{namespace="default",operation="get",status="404"} 1.0' in metrics
    )


async def test_idle_connections_are_closed(make_client: MakeClient) -> None:
    way = await make_way(make_client, "fresh", keepalive_timeout=0.3)
    connection = await way.connect()
    await connection.send(request("GET", "/v1/cache/k"))
    await connection.answer()
    assert await connection.closed_by_server(within=3)
    connection.close()
    assert await until(lambda: _no_open_doors(way), within=3, what="no open connections")


async def _no_open_doors(way: Way) -> bool:
    return not any(edge.doors for edge in way.client.server.edges)


async def test_the_operations_listener_serves_probes_and_metrics_only(
    make_client: MakeClient,
) -> None:
    client = await make_client(
        settings_for(
            "memory://", server={"auth_token": "s3cret", "ops_port": 0, "ops_host": "127.0.0.1"}
        )
    )
    ops_port = client.server.ops_port
    assert ops_port is not None and ops_port != client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", ops_port)
    connection = Connection(reader, writer)
    await connection.send(
        request("GET", "/healthz")
        + request("GET", "/readyz")
        + request("GET", "/metrics")
        + request("GET", "/v1/cache/k", "Authorization: Bearer s3cret")
        + request("GET", "/openapi.json")
    )
    answers = [await connection.answer() for _ in range(5)]
    connection.close()
    assert [a.status for a in answers] == [200, 200, 200, 404, 404]
    assert b"cachesvc_requests_total" in answers[2].body
