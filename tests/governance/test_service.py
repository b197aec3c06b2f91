"""Governance through the running service (docs/governance.md), against real Redis,
memcached and Postgres: an encrypted namespace's values are ciphertext on every server and
in the journal, before and after it drains; key rotation in both directions; erasure over
HTTP from every tier, recorded before it is answered; the keys held with a tag; the audit
trail of a sidecar's own start, stop, invalidations and refusals, checked by
``cachesvc audit verify``."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from cachesvc.crypto import sealed_key_id
from cachesvc.namespaces import scope_of
from tests.governance.conftest import holds, pg_dump
from tests.governance.dumps import memcached_dump, postgres_dump, redis_dump
from tests.polling import until
from tests.servers import PostgresServer
from tests.service.conftest import Client, MakeClient, settings_for, start_client
from tests.service.test_namespaces import in_ns, memcached_raw, postgres_raw, redis_raw
from tests.service.test_write_behind import journal_depth

NAMESPACE = "patients"
KEYS_ENV = "GOV_TEST_PATIENTS_KEYS"
ADMIN, WRITER = "admin-secret", "writer-secret"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def governed(*tier_urls: str, **sections: Any) -> Any:
    """Settings with the restricted namespace ``patients`` (keys in ``KEYS_ENV``)."""
    namespace = {
        "name": NAMESPACE,
        "classification": "restricted",
        "encryption_keys_env": KEYS_ENV,
    }
    return settings_for(*tier_urls, namespaces=[namespace], **sections)


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Two keys, k1 and k2; ``use("k2,k1")`` lists them in that order for the next start."""
    made = {"k1": new_key(), "k2": new_key()}
    monkeypatch.setenv(KEYS_ENV, f"k1:{made['k1']}")
    return made


def use(monkeypatch: pytest.MonkeyPatch, made: dict[str, str], order: str) -> None:
    listed = ",".join(f"{key_id}:{made[key_id]}" for key_id in order.split(","))
    monkeypatch.setenv(KEYS_ENV, listed)


def tokens() -> list[dict[str, Any]]:
    def digest(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    return [
        {"name": "ops", "sha256": digest(ADMIN), "scopes": ["*:admin"]},
        {"name": "app", "sha256": digest(WRITER), "scopes": [f"{NAMESPACE}:write", "*:read"]},
    ]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def put(client: Client, key: str, value: str, query: str = "", **headers: str) -> int:
    response = await client.put(in_ns(NAMESPACE, key, query), data=value.encode(), headers=headers)
    return response.status


async def value_of(client: Client, key: str, **headers: str) -> bytes | None:
    response = await client.get(in_ns(NAMESPACE, key), headers=headers)
    if response.status == 404:
        return None
    assert response.status == 200, await response.text()
    return await response.read()


# -- encryption -------------------------------------------------------------------------------


async def test_no_server_holds_plaintext_before_or_after_the_journal_drains(
    postgres_server: PostgresServer,
    keys: dict[str, str],
    make_client: MakeClient,
    clean_redis_url: str,
    clean_memcached_url: str,
) -> None:
    client = await make_client(governed(clean_redis_url, clean_memcached_url, postgres_server.url))
    secrets = {f"patient:{n}": f"PLAINTEXT-{uuid.uuid4().hex}" for n in range(6)}
    names = list(secrets)
    for key in names[:2]:
        assert await put(client, key, secrets[key], "tags=ward:7") == 204
    bulk = {"entries": [{"key": names[2], "value": secrets[names[2]], "tags": ["ward:7"]}]}
    response = await client.post(f"/v1/ns/{NAMESPACE}/bulk/set", json=bulk)
    assert response.status == 200, await response.text()
    control = f"CLEARTEXT-{uuid.uuid4().hex}"  # the default namespace: not encrypted
    assert (await client.put("/v1/cache/control", data=control.encode())).status == 204

    await asyncio.to_thread(postgres_server.hang)  # write-behind writes wait in the journal
    try:
        for key in names[3:]:
            assert await put(client, key, secrets[key], "strategy=write-behind") == 202
        assert await journal_depth(clean_redis_url) >= 3
        waiting = await redis_dump(clean_redis_url) + await memcached_dump(clean_memcached_url)
    finally:
        await asyncio.to_thread(postgres_server.resume)
    assert holds(waiting, control)  # the dumps do show what is stored in clear
    assert [plaintext for plaintext in secrets.values() if holds(waiting, plaintext)] == []

    await until(lambda: _is_empty(clean_redis_url), within=30, what="the journal drained")
    for key in names:  # read back, and promoted into l1 and l2: served in clear
        assert await value_of(client, key) == secrets[key].encode()
    response = await client.post(f"/v1/ns/{NAMESPACE}/bulk/get", json={"keys": names})
    entries = (await response.json())["entries"]
    assert {e["key"]: base64.b64decode(e["value_base64"]).decode() for e in entries} == secrets
    drained = (
        await redis_dump(clean_redis_url)
        + await memcached_dump(clean_memcached_url)
        + await postgres_dump(postgres_server.url)
    )
    assert holds(drained, control)
    assert [plaintext for plaintext in secrets.values() if holds(drained, plaintext)] == []
    stored = await postgres_raw(postgres_server.url, scope_of(NAMESPACE) + names[3])
    assert stored is not None and stored.sealed and sealed_key_id(stored.value) == "k1"


async def _is_empty(redis_url: str) -> bool:
    return await journal_depth(redis_url) == 0


async def test_rotation_in_both_directions(
    keys: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    clean_redis_url: str,
    clean_postgres_url: str,
) -> None:
    settings = governed(clean_redis_url, clean_postgres_url)

    async def run(order: str, puts: dict[str, str], reads: dict[str, str | None]) -> None:
        """A sidecar with the keys in ``order``: write ``puts``, then check ``reads`` (None:
        a miss), every read twice (from the durable tier, then from l1 after promotion)."""
        use(monkeypatch, keys, order)
        client = await start_client(settings)
        try:
            for key, value in puts.items():
                assert await put(client, key, value) == 204
            for _ in range(2):
                found = {key: await value_of(client, key) for key in reads}
                assert found == {
                    key: None if value is None else value.encode() for key, value in reads.items()
                }, order
        finally:
            await client.close()

    async def sealed_by(key: str) -> str | None:
        entry = await postgres_raw(clean_postgres_url, scope_of(NAMESPACE) + key)
        return None if entry is None else sealed_key_id(entry.value)

    await run("k1", {"a": "A"}, {"a": "A"})
    # A new key put first: it seals; the old one still opens.
    await run("k2,k1", {"b": "B"}, {"a": "A", "b": "B"})
    assert (await sealed_by("a"), await sealed_by("b")) == ("k1", "k2")
    # Rolled back: k1 first again, k2 still listed.
    await run("k1,k2", {"c": "C"}, {"a": "A", "b": "B", "c": "C"})
    assert await sealed_by("c") == "k1"
    # A key no longer listed: what it sealed reads as a miss, from l1 and the durable tier.
    await run("k1", {}, {"a": "A", "b": None, "c": "C"})
    await run("k2", {}, {"a": None, "b": "B", "c": None})


async def test_a_restricted_namespace_without_keys_does_not_start(tmp_path: Path) -> None:
    config = tmp_path / "cachesvc.toml"
    config.write_text(
        '[[tiers]]\nurl = "memory://"\n\n[[namespaces]]\nname = "patients"\n'
        'classification = "restricted"\n'
    )
    checked = _cachesvc("check-config", str(config))
    assert checked.returncode == 2
    assert checked.stderr.startswith(
        "config error: namespaces[0].encryption_keys_env: a restricted namespace needs "
        "encryption keys"
    )
    config.write_text(config.read_text() + 'encryption_keys_env = "GOV_UNSET_KEYS"\n')
    assert _cachesvc("check-config", str(config)).returncode == 0
    served = _cachesvc("serve", "--config", str(config), "--port", "0")
    assert (served.returncode, served.stderr) == (
        2,
        "config error: namespaces[0].encryption_keys_env: the environment variable "
        "GOV_UNSET_KEYS (the encryption keys) is not set\n",
    )
    short = _cachesvc("serve", "--config", str(config), env={"GOV_UNSET_KEYS": "k1:AAAA"})
    assert short.returncode == 2
    assert "GOV_UNSET_KEYS, key 'k1' is 3 bytes; AES-256 needs 32" in short.stderr
    assert "AAAA" not in short.stderr


def _cachesvc(
    *arguments: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
    return subprocess.run(
        [sys.executable, "-m", "cachesvc", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
    )


# -- erasure and access -----------------------------------------------------------------------


@pytest.fixture
async def audit_db(postgres_server: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgres_server.url)
    yield connection
    await connection.close()


async def audit_records(db: asyncpg.Connection, action: str) -> list[asyncpg.Record]:
    exists = await db.fetchval("SELECT to_regclass('cachesvc_audit') IS NOT NULL")
    if not exists:
        return []
    return list(
        await db.fetch("SELECT * FROM cachesvc_audit WHERE action = $1 ORDER BY seq", action)
    )


async def test_erasure_leaves_no_trace_and_other_subjects_stay(
    postgres_server: PostgresServer,
    keys: dict[str, str],
    make_client: MakeClient,
    clean_redis_url: str,
    clean_memcached_url: str,
    audit_db: asyncpg.Connection,
) -> None:
    urls = (clean_redis_url, clean_memcached_url, postgres_server.url)
    client = await make_client(governed(*urls, tokens=tokens()))
    admin, writer = bearer(ADMIN), bearer(WRITER)
    subject, other = uuid.uuid4().hex, uuid.uuid4().hex
    mine = [f"profile:{subject}", f"orders:{subject}", f"notes:{subject}"]
    assert await put(client, mine[0], "name", f"tags=subject:{subject}", **writer) == 204
    assert await put(client, mine[1], "orders", f"tags=subject:{subject},x", **writer) == 204
    assert await put(client, mine[2], "notes", **writer) == 204  # untagged: erased by key
    assert await put(client, f"profile:{other}", "other", f"tags=subject:{other}", **writer) == 204
    for key in mine:  # promoted copies in every tier
        assert await value_of(client, key, **writer) is not None

    listing = await client.get(f"/v1/ns/{NAMESPACE}/tags/subject:{subject}/keys", headers=admin)
    assert listing.status == 200
    assert await listing.json() == {"tag": f"subject:{subject}", "keys": sorted(mine[:2])}
    body = {"keys": [mine[2]], "tags": [f"subject:{subject}"]}
    refused = await client.post(f"/v1/ns/{NAMESPACE}/erase", json=body, headers=writer)
    assert refused.status == 403  # erasure needs admin

    response = await client.post(f"/v1/ns/{NAMESPACE}/erase", json=body, headers=admin)

    assert response.status == 200, await response.text()
    assert await response.json() == {"erased": 3}
    # On record before the answer: no waiting for the trail's batches.
    (record,) = await audit_records(audit_db, "erase")
    assert (record["actor"], record["namespace"], record["outcome"]) == (
        "ops",
        NAMESPACE,
        "erased 3",
    )
    assert json.loads(record["target"]) == body
    assert record["client"] == "127.0.0.1"

    # The entries' table (the audit trail names the subject, as it must).
    dump = await asyncio.to_thread(pg_dump, postgres_server.url, "cachesvc_entries")
    assert not holds(dump, subject)  # no key, tag or value of the subject
    assert holds(dump, f"profile:{other}")
    for key in mine:
        held = scope_of(NAMESPACE) + key
        assert await redis_raw(clean_redis_url, held) is None
        assert await memcached_raw(clean_memcached_url, held) is None
        assert await postgres_raw(postgres_server.url, held) is None
        assert await value_of(client, key, **writer) is None
    assert await value_of(client, f"profile:{other}", **writer) == b"other"
    listing = await client.get(f"/v1/ns/{NAMESPACE}/tags/subject:{subject}/keys", headers=admin)
    assert await listing.json() == {"tag": f"subject:{subject}", "keys": []}

    async def accesses() -> list[asyncpg.Record]:
        return await audit_records(audit_db, "access")

    listed = await until(lambda: _two(accesses()), within=5, what="both listings recorded")
    assert {(row["actor"], row["target"]) for row in listed} == {
        ("ops", json.dumps({"tags": [f"subject:{subject}"]}, separators=(",", ":")))
    }


async def _two(records: Any) -> list[asyncpg.Record] | None:
    found: list[asyncpg.Record] = await records
    return found if len(found) == 2 else None


async def test_an_erasure_reaches_the_in_process_tier_of_every_sidecar(
    keys: dict[str, str],
    make_client: MakeClient,
    clean_redis_url: str,
    clean_postgres_url: str,
) -> None:
    settings = governed(
        "memory://", clean_redis_url, clean_postgres_url, invalidation={"url": clean_redis_url}
    )
    first, second = await make_client(settings), await make_client(settings)
    assert await put(first, "k", "subject's", "tags=subject:9") == 204
    for client in (first, second):  # each holds a copy in its own memory
        assert await value_of(client, "k") == b"subject's"
        assert await value_of(client, "k") == b"subject's"

    response = await first.post(f"/v1/ns/{NAMESPACE}/erase", json={"tags": ["subject:9"]})

    assert await response.json() == {"erased": 1}
    assert await value_of(first, "k") is None
    await until(lambda: _gone(second, "k"), within=1, what="the peer's copy dropped")


async def _ready(client: Client) -> bool:
    return (await client.get("/readyz")).status == 200


async def _gone(client: Client, key: str) -> bool:
    return await value_of(client, key) is None


async def test_keys_by_tag_needs_a_durable_tier_that_can_list_them(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    response = await client.get("/v1/tags/t/keys")
    assert response.status == 409
    assert (await response.json())["error"] == "unsupported"
    erased = await client.post("/v1/erase", json={"keys": ["k"]})
    assert (erased.status, await erased.json()) == (200, {"erased": 0})
    empty = await client.post("/v1/erase", json={})
    assert empty.status == 400


# -- the audit trail of a sidecar -------------------------------------------------------------


async def test_the_trail_records_a_sidecar_and_verify_finds_changes(
    keys: dict[str, str],
    clean_redis_url: str,
    postgres_server: PostgresServer,
    audit_db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    settings = governed(clean_redis_url, postgres_server.url, tokens=tokens())
    client = await start_client(settings)
    try:
        assert (await client.delete(in_ns(NAMESPACE, "gone"), headers=bearer(WRITER))).status == 204
        event = {"tags": ["ward:7"]}
        response = await client.post(
            f"/v1/ns/{NAMESPACE}/invalidate", json=event, headers=bearer(ADMIN)
        )
        assert response.status == 202
        for _ in range(3):  # one record for the three of them
            assert (await client.get(in_ns(NAMESPACE, "k"))).status == 401
        forbidden = await client.post(
            f"/v1/ns/{NAMESPACE}/invalidate", json=event, headers=bearer(WRITER)
        )
        assert forbidden.status == 403
    finally:
        await client.close()  # the stop record, and the refusals of this minute, written

    rows = await audit_db.fetch("SELECT * FROM cachesvc_audit ORDER BY seq")
    summary = [(row["action"], row["actor"], row["outcome"], row["count"]) for row in rows]
    assert summary[0][:2] == ("start", "cachesvc") and summary[-1][:2] == ("stop", "cachesvc")
    assert rows[0]["config_digest"] == rows[-1]["config_digest"] is not None
    assert sorted(summary[1:-1]) == [
        ("invalidate", "app", "ok", 1),
        ("invalidate", "ops", "ok", 1),
        ("refused", "-", "401", 3),
        ("refused", "app", "403", 1),
    ]
    targets = {row["actor"]: row["target"] for row in rows if row["action"] == "invalidate"}
    assert json.loads(targets["app"]) == {"keys": ["gone"]}
    assert json.loads(targets["ops"]) == {"tags": ["ward:7"]}

    config = tmp_path / "cachesvc.toml"
    config.write_text(f'[[tiers]]\nurl = "{postgres_server.url}"\n')
    whole = _cachesvc("audit", "verify", "--config", str(config))
    assert whole.returncode == 0 and whole.stdout.startswith(
        f"the chain is whole: {len(rows)} records"
    )
    middle = rows[2]["seq"]
    await audit_db.execute("UPDATE cachesvc_audit SET actor = 'someone' WHERE seq = $1", middle)
    changed = _cachesvc("audit", "verify", "--config", str(config))
    assert (changed.returncode, changed.stderr) == (
        1,
        f"record {middle} was changed (it does not match its hash)\n",
    )
    await audit_db.execute("DELETE FROM cachesvc_audit WHERE seq = $1", middle)
    removed = _cachesvc("audit", "verify", "--config", str(config))
    assert (removed.returncode, removed.stderr) == (1, f"record {middle} was removed\n")


async def test_an_event_is_recorded_by_the_sidecar_that_applies_it(
    postgres_server: PostgresServer,
    audit_db: asyncpg.Connection,
    make_client: MakeClient,
    clean_redis_url: str,
) -> None:
    settings = settings_for(
        clean_redis_url, postgres_server.url, invalidation={"url": clean_redis_url}
    )
    clients = [await make_client(settings), await make_client(settings)]
    for client in clients:
        await until(lambda: _ready(client), within=10, what="subscribed")  # noqa: B023
    publisher = Redis.from_url(clean_redis_url)
    try:
        await publisher.publish("cachesvc:invalidate", json.dumps({"keys": ["user:42"]}))
    finally:
        await publisher.aclose()

    async def recorded() -> list[asyncpg.Record]:
        return await audit_records(audit_db, "invalidate")

    (record,) = await until(recorded, within=5, what="the event recorded")
    assert (record["actor"], record["namespace"]) == ("redis", "default")
    assert json.loads(record["target"]) == {"keys": ["user:42"]}
