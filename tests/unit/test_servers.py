"""Self-test of tests/servers.py: the private servers start, hang, die and come back."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis

from tests import servers
from tests.servers import (
    MemcachedServer,
    PostgresServer,
    RedisServer,
    Server,
    ServerError,
    flush_memcached,
    truncate_postgres,
)

HUNG = 0.3  # seconds we wait to conclude that a stopped server does not answer


def _ask(port: int | None, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        return sock.recv(4096)


def _check_hang_kill_restart(server: Server, request: bytes, answer: bytes) -> None:
    port, pid = server.port, server.pid
    assert _ask(port, request).startswith(answer)

    server.hang()
    with socket.create_connection(("127.0.0.1", port), timeout=HUNG) as sock:
        # The kernel still completes the handshake; only the answer never comes.
        sock.sendall(request)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        server.resume()
        sock.settimeout(5)
        assert sock.recv(4096).startswith(answer)

    server.kill()
    assert server.pid is None
    with pytest.raises(ConnectionRefusedError):
        _ask(port, request)

    server.restart()
    assert server.port == port and f":{port}" in server.url
    assert server.pid not in (None, pid)
    assert _ask(port, request).startswith(answer)


def test_redis_server_hangs_dies_and_restarts_on_its_port(redis_server: RedisServer) -> None:
    _check_hang_kill_restart(redis_server, b"PING\r\n", b"+PONG")


def test_memcached_server_hangs_dies_and_restarts_on_its_port(
    memcached_server: MemcachedServer,
) -> None:
    _check_hang_kill_restart(memcached_server, b"version\r\n", b"VERSION ")


async def _fetch(url: str, query: str) -> object:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def test_postgres_server_hangs_dies_and_keeps_its_data(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('row')")

        postgres_server.hang()
        # An open (pooled) connection freezes too, not only new ones.
        query = asyncio.ensure_future(conn.fetchval("SELECT v FROM kept"))
        done, _ = await asyncio.wait({query}, timeout=HUNG)
        assert not done
        with pytest.raises(TimeoutError):
            await asyncpg.connect(url, timeout=HUNG)
        postgres_server.resume()
        assert await asyncio.wait_for(query, 5) == "row"
    finally:
        conn.terminate()  # no goodbye to send: close() would block on a still-hung server

    postgres_server.kill()
    with pytest.raises(OSError):
        await asyncpg.connect(url, timeout=5)
    postgres_server.restart()  # crash recovery on the same data directory
    assert await _fetch(url, "SELECT v FROM kept") == "row"

    await _fetch(url, "INSERT INTO kept VALUES ('second') RETURNING v")
    postgres_server.stop_immediate()
    assert postgres_server.pid is None
    postgres_server.start()
    assert await _fetch(url, "SELECT count(*) FROM kept") == 2


@pytest.mark.parametrize("server_cls", [RedisServer, MemcachedServer, PostgresServer])
def test_close_kills_a_hung_server_and_removes_its_files(server_cls: type[Server]) -> None:
    with server_cls() as server:
        assert server.dir.is_dir()
        tree = [server.pid, *servers._descendants(server.pid or 0)]
        server.hang()
    assert not any(servers._alive(pid) for pid in tree if pid is not None)
    assert not server.dir.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    # Bound but not listening: the server's bind() fails, and readiness probes are refused
    # at once instead of waiting for an answer from a listener that never speaks.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_taken_port_fails_with_the_log_when_pinned(busy_port: int) -> None:
    server = RedisServer(port=busy_port)
    with pytest.raises(ServerError, match="Address already in use"), server:
        pass
    assert not server.dir.exists()


def test_a_taken_port_is_swapped_when_picked(
    busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([busy_port])  # as if another process grabbed our pick before the bind
    real_free_port = servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda: next(ports, None) or real_free_port())
    with RedisServer() as server:
        assert server.port != busy_port
        assert _ask(server.port, b"PING\r\n") == b"+PONG\r\n"


def test_clean_redis_url_is_an_empty_database(
    redis_url: str, request: pytest.FixtureRequest
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set("test_servers:left-over", b"x")
        assert request.getfixturevalue("clean_redis_url") == redis_url
        assert client.dbsize() == 0


def test_flush_memcached_empties_every_node(
    memcached_url: str, memcached_server: MemcachedServer
) -> None:
    ports = (urlsplit(memcached_url).port, memcached_server.port)
    for port in ports:
        assert _ask(port, b"set test_servers 0 0 1\r\nx\r\n") == b"STORED\r\n"
    flush_memcached(f"{memcached_url},127.0.0.1:{memcached_server.port}")
    for port in ports:
        assert _ask(port, b"get test_servers\r\n") == b"END\r\n"


async def test_truncate_postgres_skips_missing_tables(clean_postgres_url: str) -> None:
    # A private table name: creating cachesvc_entries here could clash with the tier's schema.
    table = "test_servers_scratch"
    conn = await asyncpg.connect(clean_postgres_url, timeout=5)
    try:
        await conn.execute(f"CREATE TABLE {table} (v int); INSERT INTO {table} VALUES (1)")
        # Called from inside a running event loop, as an async test would.
        truncate_postgres(clean_postgres_url, tables=("test_servers_absent", table))
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
