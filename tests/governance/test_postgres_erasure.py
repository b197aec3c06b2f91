"""Erasure in the durable tier: a tags column filled from every write, physical deletion by
key and by tag, the keys of a tag, and the migration of a table of an earlier version —
against a real Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.governance.conftest import holds, pg_dump
from tests.polling import until
from tests.servers import PostgresServer
from tiers.base import TierError, TierWrite
from tiers.postgres import PostgresTier


@pytest.fixture
async def admin(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres_url)
    yield connection
    await connection.close()


def write(
    key: str, value: bytes | None, *tags: str, version: int = 1, ttl: float = 600
) -> TierWrite:
    return TierWrite(key, value, version, ttl, tags)


async def test_every_write_stores_its_tags(
    postgres_tier: PostgresTier, admin: asyncpg.Connection, table_name: str
) -> None:
    await postgres_tier.set_many(
        [write("a", b"1", "user:1", "order"), write("b", b"2"), write("c", b"3", 'q"uo\\te,{x}')]
    )
    rows = dict(await admin.fetch(f'SELECT key, tags FROM "{table_name}"'))
    assert rows == {"a": ["user:1", "order"], "b": [], "c": ['q"uo\\te,{x}']}
    # A newer write replaces the tags with its own; a tombstone has none.
    await postgres_tier.set_many(
        [write("a", b"1b", "user:2", version=2), write("c", None, version=2)]
    )
    rows = dict(await admin.fetch(f'SELECT key, tags FROM "{table_name}"'))
    assert rows["a"] == ["user:2"] and rows["c"] == []
    # An older write is refused whole: its tags do not land either.
    await postgres_tier.set_many([write("a", b"old", "user:1", version=1)])
    assert await admin.fetchval(f'SELECT tags FROM "{table_name}" WHERE key = $1', "a") == [
        "user:2"
    ]


async def test_erasure_removes_rows_physically_and_leaves_others(
    postgres_tier: PostgresTier, postgres_url: str, table_name: str
) -> None:
    subject, other = uuid.uuid4().hex, uuid.uuid4().hex
    await postgres_tier.set_many(
        [
            write(f"profile:{subject}", f"name of {subject}".encode(), f"user:{subject}"),
            write(f"orders:{subject}", f"orders of {subject}".encode(), f"user:{subject}"),
            write(f"address:{subject}", f"address of {subject}".encode()),
            write(f"session:{subject}", None, version=5),  # a tombstone of the subject's key
            write(f"profile:{other}", f"name of {other}".encode(), f"user:{other}"),
        ]
    )
    before = pg_dump(postgres_url, table_name)
    assert holds(before, f"address of {subject}") and holds(before, f"user:{subject}")

    erased = await postgres_tier.erase(
        [f"address:{subject}", f"session:{subject}"], [f"user:{subject}"]
    )

    assert erased == 3  # three values; the tombstone went too, uncounted
    dump = pg_dump(postgres_url, table_name)
    assert not holds(dump, subject)  # no value, key or tag of the subject left
    assert holds(dump, f"name of {other}") and holds(dump, f"user:{other}")
    assert await postgres_tier.get_many([f"profile:{subject}", f"profile:{other}"]) == [
        None,
        f"name of {other}".encode(),
    ]


async def test_erasing_nothing_or_what_is_absent_removes_nothing(
    postgres_tier: PostgresTier,
) -> None:
    await postgres_tier.set_many([write("kept", b"v", "t")])
    assert await postgres_tier.erase([], []) == 0
    assert await postgres_tier.erase(["absent"], ["no-such-tag"]) == 0
    assert await postgres_tier.get_many(["kept"]) == [b"v"]


async def _expired(tier: PostgresTier, key: str) -> bool:
    return await tier.get_many([key]) == [None]


async def test_the_keys_of_a_tag_page_by_page(postgres_tier: PostgresTier) -> None:
    await postgres_tier.set_many(
        [write(f"k{n:02}", b"v", "wanted") for n in range(25)]
        + [
            write("other", b"v", "unwanted"),
            write("expired", b"v", "wanted", ttl=0.001),
            write("k99", b"v", "wanted", version=1),
        ]
    )
    await postgres_tier.set_many([write("k99", None, version=2)])  # deleted since
    await until(lambda: _expired(postgres_tier, "expired"), 1.0, "the 1 ms entry expired")
    first = await postgres_tier.keys_with_tag("wanted", 10)
    assert first == [f"k{n:02}" for n in range(10)]
    pages = [first]
    while page := await postgres_tier.keys_with_tag("wanted", 10, pages[-1][-1]):
        pages.append(page)
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [key for page in pages for key in page] == [f"k{n:02}" for n in range(25)]
    assert await postgres_tier.keys_with_tag("nothing", 10) == []


async def test_the_tags_index_serves_erasure_and_listing(
    postgres_tier: PostgresTier, admin: asyncpg.Connection, table_name: str
) -> None:
    await postgres_tier.set_many([write(f"k{n}", b"v", f"t{n}") for n in range(200)])
    await admin.execute(f'ANALYZE "{table_name}"')
    async with admin.transaction():
        await admin.execute("SET LOCAL enable_seqscan = off")
        erase_plan = await admin.fetch(
            f'EXPLAIN DELETE FROM "{table_name}" WHERE key = ANY($1::text[]) OR tags && $2::text[]',
            ["k1"],
            ["t2"],
        )
        list_plan = await admin.fetch(
            f'EXPLAIN SELECT key FROM "{table_name}" WHERE tags @> ARRAY[$1::text]', "t3"
        )
    assert f"{table_name}_tags_idx" in "\n".join(row[0] for row in erase_plan)
    assert f"{table_name}_pkey" in "\n".join(row[0] for row in erase_plan)
    assert f"{table_name}_tags_idx" in "\n".join(row[0] for row in list_plan)


EARLIER_DDL = """
    CREATE TABLE "{table}" (
        key text PRIMARY KEY, payload bytea, version bigint NOT NULL,
        expires_at timestamptz NOT NULL
    );
    CREATE INDEX "{table}_expires_at_idx" ON "{table}" (expires_at);
    CREATE TABLE "{table}_markers" (
        name text PRIMARY KEY, version bigint NOT NULL, expires_at timestamptz NOT NULL
    );
    INSERT INTO "{table}" VALUES ('before', 'old value', 1, now() + interval '1 hour');
"""


async def test_a_table_of_an_earlier_version_gets_the_column(
    admin: asyncpg.Connection, postgres_url: str, table_name: str
) -> None:
    await admin.execute(EARLIER_DDL.format(table=table_name))
    tier = PostgresTier("l3", urlsplit(f"{postgres_url}?table={table_name}"), 600)
    await tier.start()
    try:
        assert await tier.get_many(["before"]) == [b"old value"]  # kept
        await tier.set_many([write("after", b"v", "t")])
        assert await tier.keys_with_tag("t", 10) == ["after"]
        assert await tier.erase([], ["t"]) == 1
    finally:
        await tier.close()
    indexes = {
        row[0]
        for row in await admin.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = $1", table_name
        )
    }
    assert f"{table_name}_tags_idx" in indexes
    # A second start finds it done (and several sidecars at once do it once: the DDL lock).
    again = [
        PostgresTier("l3", urlsplit(f"{postgres_url}?table={table_name}"), 600) for _ in range(3)
    ]
    for tier in again:
        await tier.start()
    try:
        for tier in again:
            assert await tier.get_many(["before"]) == [b"old value"]
    finally:
        for tier in again:
            await tier.close()


async def test_a_role_that_may_not_migrate_is_told_what_to_run(
    postgres_server: PostgresServer,
) -> None:
    admin = await asyncpg.connect(postgres_server.url)
    try:
        await admin.execute(EARLIER_DDL.format(table="cachesvc_entries"))
        await admin.execute("CREATE ROLE cachesvc LOGIN")
        await admin.execute(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON cachesvc_entries, cachesvc_entries_markers "
            "TO cachesvc"
        )
    finally:
        await admin.close()
    url = postgres_server.url.replace("://postgres@", "://cachesvc@")
    tier = PostgresTier("l3", urlsplit(url), 600)
    await tier.start()
    try:
        with pytest.raises(TierError, match="lacks the tags column") as caught:
            await tier.get_many(["before"])
    finally:
        await tier.close()
    assert 'ALTER TABLE "cachesvc_entries" ADD COLUMN IF NOT EXISTS tags' in str(caught.value)
    assert "must be owner" in str(caught.value)
