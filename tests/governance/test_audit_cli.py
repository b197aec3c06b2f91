"""``cachesvc audit list`` and ``cachesvc audit verify``, run as the command an operator
types, against a trail written to a real Postgres."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from cachesvc.audit import AuditTrail


@pytest.fixture
def config(tmp_path: Path, postgres_url: str) -> Path:
    path = tmp_path / "cachesvc.toml"
    path.write_text(f'[[tiers]]\nname = "l3"\nurl = "{postgres_url}?pool_size=2"\n')
    return path


def cachesvc(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachesvc", *arguments], capture_output=True, text=True, timeout=60
    )


async def written(postgres_url: str) -> None:
    trail = AuditTrail(postgres_url)
    await trail.start()
    long_ago = datetime.now(UTC) - timedelta(days=3)
    trail.record("invalidate", actor="orders-api", namespace="orders", target="k:1", at=long_ago)
    trail.record("invalidate", actor="orders-api", namespace="orders", target="k:2")
    trail.record("erase", actor="admin", namespace="patients", target="p:1", client="127.0.0.1")
    await trail.close()


async def test_list_prints_one_json_object_a_line(
    db: asyncpg.Connection, postgres_url: str, config: Path
) -> None:
    await written(postgres_url)

    everything = cachesvc("audit", "list", "--config", str(config))
    assert everything.returncode == 0, everything.stderr
    records = [json.loads(line) for line in everything.stdout.splitlines()]
    assert [record["seq"] for record in records] == [1, 2, 3]
    assert records[2] | {"at": None, "hash": None, "prev": None} == {
        "seq": 3, "at": None, "actor": "admin", "namespace": "patients", "action": "erase",
        "target": "p:1", "outcome": "ok", "client": "127.0.0.1", "count": 1,
        "config_digest": None, "prev": None, "hash": None,
    }  # fmt: skip
    assert records[2]["prev"] == records[1]["hash"]

    orders = cachesvc("audit", "list", "--config", str(config), "--namespace", "orders")
    assert [json.loads(line)["target"] for line in orders.stdout.splitlines()] == ["k:1", "k:2"]

    since = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")  # no zone: UTC
    recent = cachesvc("audit", "list", "--config", str(config), "--since", since)
    assert [json.loads(line)["seq"] for line in recent.stdout.splitlines()] == [2, 3]

    bad = cachesvc("audit", "list", "--config", str(config), "--since", "yesterday")
    assert bad.returncode == 2 and "'yesterday' is not an ISO 8601 time" in bad.stderr


async def test_verify_exits_0_when_whole_and_1_naming_the_record(
    db: asyncpg.Connection, postgres_url: str, config: Path
) -> None:
    await written(postgres_url)
    whole = cachesvc("audit", "verify", "--config", str(config))
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.startswith("the chain is whole: 3 records, 1 to 3; head hash ")

    await db.execute("UPDATE cachesvc_audit SET outcome = 'failed' WHERE seq = 2")
    changed = cachesvc("audit", "verify", "--config", str(config))
    assert (changed.returncode, changed.stderr) == (
        1,
        "record 2 was changed (it does not match its hash)\n",
    )

    await db.execute("DELETE FROM cachesvc_audit WHERE seq = 2")
    removed = cachesvc("audit", "verify", "--config", str(config))
    assert (removed.returncode, removed.stderr) == (1, "record 2 was removed\n")


async def test_without_a_trail_or_a_postgres_durable_tier(
    db: asyncpg.Connection, tmp_path: Path, config: Path
) -> None:
    empty = cachesvc("audit", "verify", "--config", str(config))
    assert empty.returncode == 0 and "nothing recorded yet" in empty.stdout
    nothing = cachesvc("audit", "list", "--config", str(config))
    assert (nothing.returncode, nothing.stdout) == (0, "")

    memory_only = tmp_path / "memory.toml"
    memory_only.write_text('[[tiers]]\nurl = "memory://"\n')
    refused = cachesvc("audit", "verify", "--config", str(memory_only))
    assert refused.returncode == 2
    assert "the durable tier l1 is not one (memory://)" in refused.stderr
