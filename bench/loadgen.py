"""A small HTTP/1.1 load generator in Python: the fallback when wrk is not installed, and
the open-loop client that measures latency at a fixed request rate.

Closed loop (like wrk): ``connections`` keep-alive connections, each sending its next
request as soon as the previous answer is in, for ``duration`` seconds or ``total``
requests. It is one Python process on uvloop, so it saturates well below wrk: on a small
machine it measures the client as much as the server. Prefer wrk for throughput.

Open loop (``open_loop``): requests are due on a fixed schedule (``rate`` per second)
whatever the answers do, and each latency is measured from the time the request was
*due*, not sent, so a stalled server is charged for the requests queued behind it
(no coordinated omission). wrk2 does this in C; it is not packaged for Debian.

The client speaks just enough HTTP/1.1 for the servers benchmarked here: answers must
carry ``Content-Length`` (or have no body), as aiohttp's ``web.Response`` always does.

Command line::

    python -m bench.loadgen http://127.0.0.1:8787/v1/cache/k --connections 32 --duration 5
    python -m bench.loadgen http://127.0.0.1:8787/v1/cache/k --keys 1000 --method PUT
    python -m bench.loadgen http://127.0.0.1:8787/v1/cache/k --rate 1000 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import math
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

# -- the client -----------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        try:
            status = int(head[9:12])
            length = _content_length(head, status)
        except ValueError as exc:
            waiter.set_exception(exc)
            return
        size = end + 4 + length
        if len(buffer) >= size:
            del buffer[:size]
            waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("the server closed the connection")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    async def request(self, data: bytes) -> int:
        """Send one raw request; the answer's status code."""
        if self._lost is not None or self._transport is None:
            raise ConnectionResetError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _content_length(head: bytes, status: int) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        start = at + len(b"\r\ncontent-length:")
        stop = head.find(b"\r\n", start)  # -1: the last header (the blank line is cut off)
        return int(head[start : stop if stop >= 0 else None])
    if b"\r\ntransfer-encoding:" in head:
        raise ValueError("chunked answers are not supported by bench.loadgen")
    if status in (204, 304) or 100 <= status < 200:
        return 0
    raise ValueError(f"an answer with status {status} has no Content-Length")


async def connect(host: str, port: int) -> _Connection:
    _, protocol = await asyncio.get_running_loop().create_connection(_Connection, host, port)
    return protocol


class HttpPool:
    """Connections for the open loop: reuses an idle one, opens another when all are busy."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[_Connection] = []
        self.opened = 0

    async def request(self, data: bytes) -> int:
        if self._idle:
            conn = self._idle.pop()
        else:
            conn = await connect(self.host, self.port)
            self.opened += 1
        try:
            status = await conn.request(data)
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)
        return status

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class _RespConnection(asyncio.Protocol):
    """One Redis connection speaking RESP through hiredis' parser; one command in flight."""

    def __init__(self) -> None:
        import hiredis

        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[object] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        reply = self._reader.gets()
        if reply is not False and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionResetError("redis closed the connection"))

    async def command(self, packed: bytes) -> object:
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(packed)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def pack_command(*parts: str | bytes) -> bytes:
    """A RESP array of bulk strings: how every Redis command goes on the wire."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RespPool:
    """The leanest Redis client there is, for a floor to compare with: pre-packed
    commands, hiredis parsing, no connection-pool bookkeeping beyond a list."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._idle: list[_RespConnection] = []

    async def command(self, packed: bytes) -> object:
        if self._idle:
            conn = self._idle.pop()
        else:
            _, conn = await asyncio.get_running_loop().create_connection(
                _RespConnection, self.host, self.port
            )
        try:
            reply = await conn.command(packed)
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)
        return reply

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def build_request(
    method: str,
    path: str,
    host: str,
    body: bytes | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def key_requests(
    url: str,
    keys: int,
    method: str = "GET",
    body: bytes | None = None,
    query: str = "",
    offset: int = 0,
    headers: Sequence[tuple[str, str]] = (),
) -> list[bytes]:
    """One request per key ``<url><i>`` for i in 0..keys-1, starting at ``offset``."""
    parts = urlsplit(url)
    suffix = f"?{query}" if query else ""
    order = itertools.islice(itertools.cycle(range(keys)), offset % keys, offset % keys + keys)
    return [
        build_request(method, f"{parts.path}{i}{suffix}", parts.netloc, body, headers)
        for i in order
    ]


# -- results --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (``fraction`` in 0..1)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class LoadResult:
    """What one load run measured. Latencies are in seconds."""

    elapsed: float = 0.0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    socket_errors: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))

    @property
    def requests(self) -> int:
        """Answered requests (any status)."""
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        """Answers that are not 2xx/3xx, plus requests lost to socket errors."""
        bad = sum(n for status, n in self.statuses.items() if not 200 <= status < 400)
        return bad + self.socket_errors

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    def percentiles(self, *fractions: float) -> list[float]:
        ordered = sorted(self.latencies)
        return [percentile(ordered, f) for f in fractions]

    def summary(self) -> dict[str, float | int]:
        p50, p90, p99, p999 = self.percentiles(0.5, 0.9, 0.99, 0.999)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": self.rps,
            "p50_ms": p50 * 1e3,
            "p90_ms": p90 * 1e3,
            "p99_ms": p99 * 1e3,
            "p999_ms": p999 * 1e3,
            "max_ms": max(self.latencies, default=math.nan) * 1e3,
        }


# -- closed loop ----------------------------------------------------------------------------


async def closed_loop(
    host: str,
    port: int,
    requests: Sequence[bytes] | Callable[[int], bytes],
    connections: int,
    duration: float | None = None,
    total: int | None = None,
    result: LoadResult | None = None,
) -> LoadResult:
    """Send ``requests`` (a list, round-robin, or a function of the request number) over
    ``connections`` connections until ``duration`` seconds have passed or ``total``
    requests were sent, whichever comes first. Pass ``result`` to watch it fill."""
    if duration is None and total is None:
        raise ValueError("give a duration or a total")
    if callable(requests):
        make = requests
    else:
        listed = requests

        def make(i: int) -> bytes:
            return listed[i % len(listed)]

    result = LoadResult() if result is None else result
    counter = itertools.count()
    perf = time.perf_counter
    deadline = math.inf if duration is None else perf() + duration
    limit = math.inf if total is None else total

    async def worker() -> None:
        conn: _Connection | None = None
        try:
            while True:
                i = next(counter)
                if i >= limit or perf() >= deadline:
                    return
                if conn is None:
                    conn = await connect(host, port)
                started = perf()
                try:
                    status = await conn.request(make(i))
                except (OSError, ValueError):
                    result.socket_errors += 1
                    conn.close()
                    conn = None
                    continue
                result.latencies.append(perf() - started)
                result.statuses[status] += 1
        finally:
            if conn is not None:
                conn.close()

    started = perf()
    await asyncio.gather(*(worker() for _ in range(connections)))
    result.elapsed = perf() - started
    return result


# -- open loop ------------------------------------------------------------------------------


@dataclass
class OpenLoopResult(LoadResult):
    # How late the client sent each request (its own scheduling noise), seconds.
    send_lag: array[float] = field(default_factory=lambda: array("d"))

    def summary(self) -> dict[str, float | int]:
        lag = sorted(self.send_lag)
        return {
            **super().summary(),
            "send_lag_p50_ms": percentile(lag, 0.5) * 1e3,
            "send_lag_p99_ms": percentile(lag, 0.99) * 1e3,
        }


async def open_loop(
    call: Callable[[int], Awaitable[int]], rate: float, duration: float
) -> OpenLoopResult:
    """Start ``call(i)`` for request i at t0 + i/rate, not waiting for earlier answers.

    ``call`` returns a status code (use 200 for non-HTTP calls). Latency runs from the due
    time to the answer. When the loop wakes late, every request already due is started
    at once; the lateness is recorded in ``send_lag``.
    """
    return (await open_loop_interleaved([call], rate, duration))[0]


async def open_loop_interleaved(
    calls: Sequence[Callable[[int], Awaitable[int]]], rate: float, duration: float
) -> list[OpenLoopResult]:
    """``open_loop`` over several targets side by side: at each due time t0 + i/rate
    every target gets its request i, started in an order that rotates with i, and
    result k records target k. So every target sees the same schedule, the same
    client lateness and the same disturbances, which running them one after the other
    (or staggered) does not give."""
    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    perf = time.perf_counter
    n = len(calls)
    results = [OpenLoopResult() for _ in calls]
    interval = 1.0 / rate
    pending: set[asyncio.Task[None]] = set()

    async def one(k: int, i: int, due: float) -> None:
        result = results[k]
        result.send_lag.append(perf() - due)
        try:
            status = await calls[k](i)
        except Exception:
            # Whatever the client raised (a socket error, a client's own pool limit) is
            # an error of that target: a task's exception must be counted, not lost.
            result.socket_errors += 1
            return
        result.latencies.append(perf() - due)
        result.statuses[status] += 1

    start = perf() + 0.01
    for i in range(int(rate * duration)):
        due = start + i * interval
        delay = due - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        for j in range(n):
            task = asyncio.ensure_future(one((i + j) % n, i, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    for result in results:
        result.elapsed = perf() - start
    return results


# -- command line ---------------------------------------------------------------------------


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("url", help="with --keys, the key number is appended to it")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body-size", type=int, default=0, help="bytes of body (PUT)")
    parser.add_argument("--query", default="", help="query string, e.g. strategy=write-behind")
    parser.add_argument("--keys", type=int, default=0, help="spread over <url>0..<url>N-1")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rate", type=float, help="open loop at this many requests/s")
    args = parser.parse_args(argv)
    _install_uvloop()
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = b"x" * args.body_size if args.body_size else None
    if args.keys:
        requests = key_requests(args.url, args.keys, args.method, body, args.query)
    else:
        path = parts.path + (f"?{args.query}" if args.query else "")
        requests = [build_request(args.method, path, parts.netloc, body)]

    async def run() -> LoadResult:
        if args.rate is None:
            return await closed_loop(host, port, requests, args.connections, args.duration)
        pool = HttpPool(host, port)
        try:
            return await open_loop(
                lambda i: pool.request(requests[i % len(requests)]), args.rate, args.duration
            )
        finally:
            pool.close()

    result = asyncio.run(run())
    for name, value in result.summary().items():
        print(f"{name:>16}: {value:.3f}" if isinstance(value, float) else f"{name:>16}: {value}")
    print(f"{'statuses':>16}: {dict(result.statuses)}")


if __name__ == "__main__":
    main()
