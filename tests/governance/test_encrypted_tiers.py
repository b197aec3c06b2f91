"""An encrypted namespace's values in real tiers (Redis, memcached, Postgres) and the
write-behind journal, through the engine alone (values sealed before the engine sees them,
``NewValue.sealed``, as an encrypted namespace does): no plaintext in any server, before or
after the journal drains; and erasure from every tier (``Engine.erase``) leaving no trace
in pg_dump while other subjects' entries stay. tests/governance/test_service.py shows the
same through the HTTP API."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis

from cachesvc.app import build_engine
from cachesvc.config import Settings
from cachesvc.crypto import Cipher, open_entry, parse_keys
from cachesvc.engine import Engine, NewValue
from cachesvc.metrics import Metrics
from tests.governance.conftest import holds
from tests.governance.dumps import memcached_dump, postgres_dump, redis_dump
from tests.polling import until
from tests.servers import PostgresServer

NAMESPACE = "patients"


@pytest.fixture
def cipher() -> Cipher:
    return Cipher(parse_keys(f"k1:{base64.b64encode(os.urandom(32)).decode()}"))


@pytest.fixture
def journal_stream() -> str:
    return f"gov:journal:{uuid.uuid4().hex}"


@pytest.fixture
async def engine(
    clean_redis_url: str,
    clean_memcached_url: str,
    postgres_server: PostgresServer,
    journal_stream: str,
) -> AsyncIterator[Engine]:
    journal_url = urlunsplit(urlsplit(clean_redis_url)._replace(path="/1"))
    durable = {"breaker_failures": 3, "breaker_reset": 0.5}
    settings = Settings.model_validate(
        {
            "tiers": [
                {"name": "l1", "url": clean_redis_url, "ttl": 300},
                {"name": "l2", "url": clean_memcached_url, "ttl": 3600},
                {"name": "l3", "url": postgres_server.url, "ttl": 86400, **durable},
            ],
            "write": {
                "journal_url": journal_url,
                "journal_stream": journal_stream,
                "drain_timeout": 2,
            },
        }
    )
    engine = build_engine(settings, Metrics())
    await engine.start()
    yield engine
    await engine.close()


def sealed_value(cipher: Cipher, key: str, value: str, *tags: str) -> NewValue:
    return NewValue(
        key, cipher.seal(NAMESPACE, key, value.encode()), "text/plain", tags=tags, sealed=True
    )


async def served(engine: Engine, cipher: Cipher, key: str) -> bytes | None:
    (hit,) = await engine.read_many([key])
    entry = None if hit is None else open_entry(cipher, NAMESPACE, key, hit.entry)
    return None if entry is None else entry.value


async def test_no_server_holds_plaintext_before_or_after_the_journal_drains(
    engine: Engine,
    cipher: Cipher,
    clean_redis_url: str,
    clean_memcached_url: str,
    postgres_server: PostgresServer,
    journal_stream: str,
) -> None:
    secrets = {f"patient:{n}": f"PLAINTEXT-{uuid.uuid4().hex}" for n in range(6)}
    through = list(secrets)[:3]
    behind = list(secrets)[3:]
    await engine.write(
        [sealed_value(cipher, key, secrets[key], "ward:7") for key in through], "write-through"
    )
    # The durable tier hangs: the write-behind writes wait in the journal.
    await asyncio.to_thread(postgres_server.hang)
    try:
        await engine.write(
            [sealed_value(cipher, key, secrets[key]) for key in behind], "write-behind"
        )
        journal = Redis.from_url(urlunsplit(urlsplit(clean_redis_url)._replace(path="/1")))
        try:
            assert await journal.xlen(journal_stream) >= len(behind)
            waiting = await redis_dump(clean_redis_url) + await memcached_dump(clean_memcached_url)
        finally:
            await journal.aclose()
    finally:
        await asyncio.to_thread(postgres_server.resume)
    for plaintext in secrets.values():
        assert not holds(waiting, plaintext)

    journal = Redis.from_url(urlunsplit(urlsplit(clean_redis_url)._replace(path="/1")))
    try:
        await until(
            lambda: _drained(journal, journal_stream), within=30, what="the journal drained"
        )
    finally:
        await journal.aclose()
    for key in secrets:  # read back (and promoted into l1 and l2): the values are there
        assert await served(engine, cipher, key) == secrets[key].encode()
    drained = (
        await redis_dump(clean_redis_url)
        + await memcached_dump(clean_memcached_url)
        + await postgres_dump(postgres_server.url)
    )
    for plaintext in secrets.values():
        assert not holds(drained, plaintext)
    stored = await _durable_payloads(postgres_server.url, list(secrets))
    assert len(stored) == len(secrets)  # every one of them, as ciphertext


async def _drained(journal: Redis, stream: str) -> bool:
    return bool(await journal.xlen(stream) == 0)


async def _durable_payloads(url: str, keys: list[str]) -> dict[str, bytes]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT key, payload FROM cachesvc_entries WHERE key = ANY($1) AND payload IS NOT NULL",
            keys,
        )
    finally:
        await connection.close()
    return {row["key"]: row["payload"] for row in rows}


async def test_erasure_leaves_no_trace_and_other_subjects_stay(
    engine: Engine,
    cipher: Cipher,
    clean_redis_url: str,
    clean_memcached_url: str,
    postgres_server: PostgresServer,
) -> None:
    subject, other = uuid.uuid4().hex, uuid.uuid4().hex
    subject_keys = [f"profile:{subject}", f"orders:{subject}", f"notes:{subject}"]
    await engine.write(
        [
            sealed_value(cipher, subject_keys[0], "name", f"user:{subject}"),
            sealed_value(cipher, subject_keys[1], "orders", f"user:{subject}"),
            sealed_value(cipher, subject_keys[2], "notes"),  # untagged: erased by key
            sealed_value(cipher, f"profile:{other}", "other's name", f"user:{other}"),
        ],
        "write-through",
    )
    for key in subject_keys:  # promoted copies everywhere
        assert await served(engine, cipher, key) is not None
    ciphertexts = await _durable_payloads(postgres_server.url, subject_keys)
    assert len(ciphertexts) == 3
    caches = await redis_dump(clean_redis_url) + await memcached_dump(clean_memcached_url)
    assert all(ciphertext in caches for ciphertext in ciphertexts.values())

    erased = await engine.erase([subject_keys[2]], [f"user:{subject}"])

    assert erased == 3
    dump = await postgres_dump(postgres_server.url)
    assert not holds(dump, subject)  # no key, tag or value of the subject
    assert holds(dump, f"profile:{other}")
    caches = await redis_dump(clean_redis_url) + await memcached_dump(clean_memcached_url)
    for ciphertext in ciphertexts.values():
        assert ciphertext not in caches and ciphertext not in dump
    for slot in engine.slots:  # raw reads of every tier: nothing (l1 and l2 hold tombstones)
        assert await slot.tier.get_many(subject_keys) == [None, None, None]
    for key in subject_keys:
        assert await served(engine, cipher, key) is None
    assert await served(engine, cipher, f"profile:{other}") == b"other's name"
