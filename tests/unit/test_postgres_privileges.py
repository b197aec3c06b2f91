"""The privileges docs/postgres.md says the Postgres tier's role needs, against a real
server: CREATE on the schema, or a table created beforehand (with the documented DDL)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.servers import PostgresServer
from tiers.base import TierError, TierWrite
from tiers.postgres import PostgresTier

DOCS = Path(__file__).resolve().parents[2] / "docs" / "postgres.md"


def documented_ddl() -> str:
    """The first SQL block of docs/postgres.md: the table as the tier creates it."""
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.DOTALL)[0]


@pytest.fixture
async def admin(postgres_server: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres_server.url)
    await connection.execute(
        "CREATE ROLE cachesvc LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC"
    )
    yield connection
    await connection.close()


async def round_trip(postgres_server: PostgresServer) -> bytes | None:
    url = postgres_server.url.replace("://postgres@", "://cachesvc@")
    tier = PostgresTier("l3", urlsplit(url), 60)
    await tier.start()
    try:
        await tier.set_many([TierWrite("k", b"v", 1, 60)])
        await tier.sweep()
        return (await tier.get_many(["k"]))[0]
    finally:
        await tier.close()


async def test_without_create_on_the_schema_the_error_says_so(
    admin: asyncpg.Connection, postgres_server: PostgresServer
) -> None:
    with pytest.raises(TierError, match="permission denied for schema public"):
        await round_trip(postgres_server)


async def test_create_on_the_schema_is_enough(
    admin: asyncpg.Connection, postgres_server: PostgresServer
) -> None:
    await admin.execute("GRANT CREATE ON SCHEMA public TO cachesvc")
    assert await round_trip(postgres_server) == b"v"
    indexes = await admin.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = $1", "cachesvc_entries"
    )
    assert {row[0] for row in indexes} == {
        "cachesvc_entries_pkey",
        "cachesvc_entries_expires_at_idx",
        "cachesvc_entries_tags_idx",
    }


async def test_a_table_created_beforehand_needs_only_dml_privileges(
    admin: asyncpg.Connection, postgres_server: PostgresServer
) -> None:
    await admin.execute(documented_ddl())
    await admin.execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON cachesvc_entries, cachesvc_entries_markers "
        "TO cachesvc"
    )
    assert await round_trip(postgres_server) == b"v"


def test_the_documented_table_is_the_one_the_tier_creates() -> None:
    tier = PostgresTier("l3", urlsplit("postgresql://u@h/db"), 60)
    assert documented_ddl().split() == tier._ddl.split()
