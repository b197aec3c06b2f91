"""Everything a server holds, raw, as bytes: what an operator with access to the server
(or its backups) can read, to look for plaintext in."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis

from tests.governance.conftest import pg_dump


async def redis_dump(url: str) -> bytes:
    """Every key of every database of the Redis at ``url``, and every value of every type."""
    parts = urlsplit(url)
    chunks: list[bytes] = []
    admin = Redis(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)
    try:
        keyspace = await admin.info("keyspace")
    finally:
        await admin.aclose()
    for name in keyspace:  # "db0", "db1", ...
        client = Redis(
            host=parts.hostname or "127.0.0.1", port=parts.port or 6379, db=int(name[2:])
        )
        try:
            async for key in client.scan_iter(count=1000):
                chunks.append(key)
                kind = (await client.type(key)).decode()
                if kind == "string":
                    chunks.append(await client.get(key) or b"")
                elif kind == "stream":
                    for entry_id, fields in await client.xrange(key):
                        chunks.append(entry_id)
                        chunks.extend(b"%s=%s" % pair for pair in fields.items())
                elif kind == "hash":
                    chunks.extend(b"%s=%s" % pair for pair in (await client.hgetall(key)).items())
                elif kind == "list":
                    chunks.extend(await client.lrange(key, 0, -1))
                elif kind == "set":
                    chunks.extend(await client.smembers(key))
                elif kind == "zset":
                    chunks.extend(
                        member for member, _ in await client.zrange(key, 0, -1, withscores=True)
                    )
                else:
                    raise AssertionError(f"a Redis key of a type this dump cannot read: {kind}")
        finally:
            await client.aclose()
    return b"\n".join(chunks)


async def memcached_dump(url: str) -> bytes:
    """Every item of the memcached at ``url``: its keys listed by the LRU crawler's
    metadump, then each one read."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(b"lru_crawler metadump all\r\n")
        listing = await reader.readuntil(b"END\r\n")
        keys = [
            unquote(field[4:]).encode()
            for line in listing.decode().splitlines()
            for field in line.split()
            if field.startswith("key=")
        ]
        chunks: list[bytes] = []
        for key in keys:
            writer.write(b"get " + key + b"\r\n")
            chunks.append(key)
            chunks.append(await reader.readuntil(b"END\r\n"))
        return b"\n".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def postgres_dump(url: str) -> bytes:
    return await asyncio.to_thread(pg_dump, url)
