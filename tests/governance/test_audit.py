"""The audit trail (cachesvc.audit) against a real Postgres: the chain and its canonical
encoding, batches, several writers, record_now, coalesced refusals, pruning that keeps
the chain verifiable, and verify naming the first record changed or removed."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cachesvc.audit import (
    GENESIS,
    AuditTrail,
    AuditUnavailable,
    Record,
    chain_hash,
    config_digest,
    ddl,
    verify,
)
from tests.polling import until
from tests.servers import PostgresServer

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
async def trail(db: asyncpg.Connection, postgres_url: str) -> AsyncIterator[AuditTrail]:
    trail = AuditTrail(postgres_url)
    await trail.start()
    yield trail
    await trail.close()


async def rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM cachesvc_audit ORDER BY seq")


def independently_hashed(row: asyncpg.Record) -> str:
    """The documented canonical encoding, written out again from the docs' definition."""
    document = {
        "seq": row["seq"],
        "at": row["at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": row["actor"],
        "namespace": row["namespace"],
        "action": row["action"],
        "target": row["target"],
        "outcome": row["outcome"],
        "client": row["client"],
        "count": row["count"],
        "config_digest": row["config_digest"],
        "prev": row["prev_hash"],
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


async def test_records_form_one_chain_in_the_documented_encoding(
    trail: AuditTrail, db: asyncpg.Connection
) -> None:
    digest = config_digest({"server": {"port": 8787}})
    trail.record("start", actor="cachesvc", config_digest=digest)
    trail.record(
        "invalidate",
        actor="orders-api",
        namespace="orders",
        target="tag:user:7",
        client="127.0.0.1",
    )
    trail.record("invalidate", actor="redis-pubsub", target="prefix:ünïcode\x00 and NUL")
    seq = await trail.record_now(
        "erase",
        actor="admin",
        namespace="patients",
        target='{"keys":["p:1"],"tags":[]}',
        outcome="erased 1",
    )
    assert seq == 4
    stored = await rows(db)
    assert [row["seq"] for row in stored] == [1, 2, 3, 4]
    assert stored[0]["prev_hash"] == GENESIS
    for previous, row in zip([None, *stored[:-1]], stored, strict=True):
        assert row["hash"] == independently_hashed(row)
        if previous is not None:
            assert row["prev_hash"] == previous["hash"]
    assert stored[0]["config_digest"] == digest and stored[0]["action"] == "start"
    assert stored[2]["target"] == "prefix:ünïcode\ufffd and NUL"  # stored as hashed
    verdict = await verify(db)
    assert verdict.whole and verdict.records == 4
    assert stored[-1]["hash"] in verdict.message


async def test_record_now_is_committed_before_it_returns(
    trail: AuditTrail, postgres_url: str
) -> None:
    seq = await trail.record_now("erase", actor="admin", target="k")
    other = await asyncpg.connect(postgres_url)  # another session sees it: committed
    try:
        assert (
            await other.fetchval("SELECT action FROM cachesvc_audit WHERE seq = $1", seq) == "erase"
        )
    finally:
        await other.close()


class CountingTrail(AuditTrail):
    """Counts the batches the writer appends."""

    batches: list[int]

    async def _append(self, records: Any) -> int:
        self.batches.append(len(records))
        return await super()._append(records)


async def test_queued_records_are_written_in_batches(
    db: asyncpg.Connection, postgres_url: str
) -> None:
    trail = CountingTrail(postgres_url, batch=500)
    trail.batches = []
    await trail.start()
    for n in range(2000):
        trail.record("invalidate", actor="orders-api", target=f"key:{n}")
    await trail.close()
    assert trail.batches == [500, 500, 500, 500]
    assert await db.fetchval("SELECT count(*) FROM cachesvc_audit") == 2000
    assert (await verify(db)).whole


async def test_sidecars_writing_at_once_keep_one_chain(
    db: asyncpg.Connection, postgres_url: str
) -> None:
    trails = [AuditTrail(postgres_url, batch=7) for _ in range(3)]
    for trail in trails:
        await trail.start()

    async def write(trail: AuditTrail, name: str) -> None:
        for n in range(100):
            trail.record("invalidate", actor=name, target=f"key:{n}")
            if n % 10 == 0:
                await trail.record_now("erase", actor=name, target=f"key:{n}")

    await asyncio.gather(*(write(trail, f"sidecar-{i}") for i, trail in enumerate(trails)))
    for trail in trails:
        await trail.close()
    stored = await rows(db)
    assert [row["seq"] for row in stored] == list(range(1, 331))
    assert {row["actor"] for row in stored} == {"sidecar-0", "sidecar-1", "sidecar-2"}
    verdict = await verify(db)
    assert verdict.whole, verdict.message


async def filled(trail: AuditTrail, count: int) -> None:
    for n in range(count):
        trail.record("invalidate", actor="orders-api", namespace="orders", target=f"key:{n}")
    await trail.record_now("invalidate", actor="orders-api", target="last")


async def test_a_changed_record_is_named(trail: AuditTrail, db: asyncpg.Connection) -> None:
    await filled(trail, 19)
    await db.execute("UPDATE cachesvc_audit SET target = 'key:other' WHERE seq = 7")
    verdict = await verify(db)
    assert not verdict.whole and verdict.first_broken == 7
    assert verdict.message == "record 7 was changed (it does not match its hash)"


async def test_a_changed_record_with_its_hash_recomputed_is_named(
    trail: AuditTrail, db: asyncpg.Connection
) -> None:
    await filled(trail, 19)
    row = await db.fetchrow("SELECT * FROM cachesvc_audit WHERE seq = 7")
    forged = Record(
        row["at"],
        row["actor"],
        row["namespace"],
        row["action"],
        "key:other",
        row["outcome"],
        row["client"],
        row["count"],
        row["config_digest"],
    )
    await db.execute(
        "UPDATE cachesvc_audit SET target = 'key:other', hash = $1 WHERE seq = 7",
        chain_hash(7, forged, row["prev_hash"]),
    )
    verdict = await verify(db)
    assert verdict.first_broken == 7
    assert verdict.message == "record 7 was changed (record 8 does not follow from it)"


async def test_a_removed_record_is_named(trail: AuditTrail, db: asyncpg.Connection) -> None:
    await filled(trail, 19)
    await db.execute("DELETE FROM cachesvc_audit WHERE seq IN (12, 13)")
    verdict = await verify(db)
    assert verdict.first_broken == 12
    assert verdict.message == "records 12 to 13 were removed"


async def test_the_oldest_records_removed_without_pruning_are_named(
    trail: AuditTrail, db: asyncpg.Connection
) -> None:
    await filled(trail, 9)
    await db.execute("DELETE FROM cachesvc_audit WHERE seq <= 3")
    verdict = await verify(db)
    assert verdict.first_broken == 1
    assert verdict.message == "records 1 to 3 were removed (no pruning accounts for them)"


async def test_pruning_keeps_the_rest_verifiable(db: asyncpg.Connection, postgres_url: str) -> None:
    old = datetime.now(UTC) - timedelta(days=10)
    writer = AuditTrail(postgres_url)
    await writer.start()
    for n in range(5):
        writer.record("invalidate", actor="orders-api", target=f"old:{n}", at=old)
    for n in range(3):
        writer.record("invalidate", actor="orders-api", target=f"new:{n}")
    await writer.close()

    pruning = AuditTrail(postgres_url, retention_days=7)  # prunes when it starts
    await pruning.start()
    try:
        stored = await until(
            lambda: db.fetch("SELECT * FROM cachesvc_audit WHERE action = 'prune'"),
            within=10,
            what="the pruning record",
        )
        assert json.loads(stored[0]["target"])["through"] == 5
        assert await pruning.prune() == 0  # nothing more to prune: no second record
    finally:
        await pruning.close()
    remaining = await rows(db)
    assert [row["seq"] for row in remaining] == [6, 7, 8, 9]
    assert json.loads(remaining[-1]["target"])["hash"] == remaining[0]["prev_hash"]
    verdict = await verify(db)
    assert verdict.whole and verdict.records == 4, verdict.message

    await db.execute("DELETE FROM cachesvc_audit WHERE seq = 6")
    verdict = await verify(db)
    assert verdict.message == "record 6 was removed (no pruning accounts for them)"


async def test_refusals_are_one_record_per_token_and_minute(
    trail: AuditTrail, db: asyncpg.Connection
) -> None:
    for _ in range(30):
        trail.refused(401, actor="-", client="127.0.0.1", target="GET /v1/cache/k")
    for _ in range(5):
        trail.refused(403, actor="orders-api", namespace="patients", client="127.0.0.1")
    await trail.close()  # the minute is not over: stopping writes them
    stored = [(row["actor"], row["action"], row["outcome"], row["count"]) for row in await rows(db)]
    assert sorted(stored) == [("-", "refused", "401", 30), ("orders-api", "refused", "403", 5)]


async def test_a_record_now_without_postgres_fails_and_is_written_later(
    postgres_server: PostgresServer,
) -> None:
    trail = AuditTrail(postgres_server.url, record_now_timeout=1.0, connect_timeout=0.5)
    await trail.start()
    try:
        await trail.record_now("start", actor="cachesvc")
        await asyncio.to_thread(postgres_server.kill)
        with pytest.raises(AuditUnavailable, match=r"not committed within 1\.0 s"):
            await trail.record_now("erase", actor="admin", target="k")
        await asyncio.to_thread(postgres_server.start)
        db = await asyncpg.connect(postgres_server.url)
        try:
            await until(
                lambda: db.fetchval("SELECT count(*) = 2 FROM cachesvc_audit"),
                within=15,
                what="the queued erase record written once Postgres is back",
            )
            assert (await verify(db)).whole
        finally:
            await db.close()
    finally:
        await trail.close()


def documented_audit_ddl() -> str:
    text = (DOCS / "postgres.md").read_text()
    section = text[text.index("## The audit table") :]
    return re.findall(r"```sql\n(.*?)```", section, re.DOTALL)[0]


def test_the_documented_table_is_the_one_the_trail_creates() -> None:
    assert documented_audit_ddl().split() == ddl().split()


async def test_a_table_created_beforehand_needs_select_insert_and_delete_only(
    postgres_server: PostgresServer,
) -> None:
    admin = await asyncpg.connect(postgres_server.url)
    try:
        await admin.execute(
            "CREATE ROLE cachesvc LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        )
        await admin.execute(documented_audit_ddl())
        await admin.execute("GRANT SELECT, INSERT, DELETE ON cachesvc_audit TO cachesvc")
        old = datetime.now(UTC) - timedelta(days=30)
        url = postgres_server.url.replace("://postgres@", "://cachesvc@")
        trail = AuditTrail(url, retention_days=1)
        await trail.start()
        try:
            trail.record("invalidate", actor="a", target="old", at=old)
            await trail.record_now("invalidate", actor="a", target="new")
            assert await trail.prune() == 1
        finally:
            await trail.close()
        verdict = await verify(admin)
        assert verdict.whole and verdict.records == 2  # "new" and the pruning record
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("UPDATE cachesvc_audit SET target = 'x'")
            finally:
                await conn.close()
    finally:
        await admin.close()
