"""What the governance tests share: a Postgres tier on a table of its own, and pg_dump."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from tests.servers import _pg_bindir
from tests.service.conftest import make_client as make_client  # the services under test
from tiers.postgres import PostgresTier


def pg_dump(url: str, *tables: str) -> bytes:
    """What pg_dump writes of ``tables`` (data and definitions): the database as a backup
    or a replica would see it."""
    selected = [argument for table in tables for argument in ("--table", table)]
    return subprocess.run(
        [str(_pg_bindir() / "pg_dump"), "--dbname", url, *selected],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout


def holds(dump: bytes, text: str) -> bool:
    """Whether ``dump`` holds ``text``, as text or as a bytea in pg_dump's hex form."""
    raw = text.encode()
    return raw in dump or raw.hex().encode() in dump


@pytest.fixture
def table_name() -> str:
    return f"gov_{uuid.uuid4().hex[:12]}"


MakeTier = Callable[..., PostgresTier]


@pytest.fixture
async def postgres_tier(postgres_url: str, table_name: str) -> AsyncIterator[PostgresTier]:
    tier = PostgresTier("l3", urlsplit(f"{postgres_url}?table={table_name}"), 3600)
    await tier.start()
    yield tier
    await tier.close()


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the session Postgres, where no audit table exists yet."""
    connection = await asyncpg.connect(postgres_url)
    await connection.execute("DROP TABLE IF EXISTS cachesvc_audit")
    yield connection
    await connection.close()
