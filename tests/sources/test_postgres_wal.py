"""The Postgres logical-decoding source: committed INSERT, UPDATE, DELETE and TRUNCATE
become keys and tags, nothing committed is skipped across stops and reader failover, and a
database that cannot serve says why."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from invalidation.postgres_wal import PostgresWalListener, TableSpec, Template
from tests.polling import until
from tests.sources.conftest import RecordingSink, running

_names = itertools.count()


class Names:
    def __init__(self) -> None:
        n = next(_names)
        self.table = f"users_{n}"
        self.slot = f"test_slot_{n}"


@pytest.fixture
async def db(logical_postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(logical_postgres_url)
    yield connection
    await connection.close()


@pytest.fixture
async def names(db: asyncpg.Connection) -> AsyncIterator[Names]:
    names = Names()
    await db.execute(
        f"CREATE TABLE {names.table} (id int PRIMARY KEY, org_id int, name text, v int DEFAULT 0)"
    )
    yield names
    # A slot keeps WAL until dropped; the listeners are stopped by now.
    await db.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
        names.slot,
    )
    await db.execute(f"DROP PUBLICATION IF EXISTS {names.slot}; DROP TABLE {names.table}")


def users(
    names: Names, keys: tuple[str, ...] = ("user:{id}",), **options: Any
) -> PostgresWalListener:
    spec = TableSpec.parse(names.table, keys, ["org:{org_id}"])
    options.setdefault("standby_poll", 0.2)
    return PostgresWalListener(
        options.pop("url"), [spec], slot=names.slot, publication=names.slot, **options
    )


async def reading(listener: PostgresWalListener, sink: RecordingSink) -> bool:
    return listener.reading and bool(sink.gaps)


def originated(sinks: list[RecordingSink], field: str = "keys") -> set[str]:
    return {item for sink in sinks for event in sink.originated for item in getattr(event, field)}


async def test_insert_update_delete_invalidate_old_and_new_keys_and_tags(
    logical_postgres_url: str, db: asyncpg.Connection, names: Names
) -> None:
    sink = RecordingSink()
    listener = users(names, url=logical_postgres_url)
    async with running(listener, sink):
        await until(lambda: reading(listener, sink), 10, "reading the slot")
        # The templates use org_id, which is not in the primary key: the old row needs it.
        identity = await db.fetchval(
            "SELECT relreplident::text FROM pg_class WHERE oid = $1::regclass", names.table
        )
        assert identity == "f"
        steps = [
            (f"INSERT INTO {names.table} (id, org_id) VALUES (1, 7)", {"user:1"}, {"org:7"}),
            (f"UPDATE {names.table} SET org_id = 8 WHERE id = 1", {"user:1"}, {"org:7", "org:8"}),
            (f"UPDATE {names.table} SET id = 2 WHERE id = 1", {"user:1", "user:2"}, {"org:8"}),
            (f"DELETE FROM {names.table} WHERE id = 2", {"user:2"}, {"org:8"}),
        ]
        for statement, keys, tags in steps:
            sink.originated.clear()
            await db.execute(statement)
            await until(lambda: _true(sink.originated), 5, statement)
            assert originated([sink]) == keys, statement
            assert originated([sink], "tags") == tags, statement
        assert sink.gaps == [True]  # it created the slot: what came before is unknown


async def test_key_only_templates_keep_the_default_replica_identity(
    logical_postgres_url: str, db: asyncpg.Connection, names: Names
) -> None:
    sink = RecordingSink()
    listener = PostgresWalListener(
        logical_postgres_url,
        [TableSpec.parse(names.table, ["user:{id}"])],
        slot=names.slot,
        publication=names.slot,
    )
    async with running(listener, sink):
        await until(lambda: reading(listener, sink), 10, "reading the slot")
        await db.execute(f"INSERT INTO {names.table} (id, name) VALUES (5, 'a')")
        await db.execute(f"UPDATE {names.table} SET name = 'b' WHERE id = 5")
        await db.execute(f"UPDATE {names.table} SET id = 6 WHERE id = 5")
        await until(lambda: _true("user:6" in originated([sink])), 5, "the key change")
    identity = await db.fetchval(
        "SELECT relreplident::text FROM pg_class WHERE oid = $1::regclass", names.table
    )
    assert identity == "d"
    assert originated([sink]) == {"user:5", "user:6"}


async def test_events_carry_their_tables_namespace(
    logical_postgres_url: str, db: asyncpg.Connection, names: Names
) -> None:
    sink = RecordingSink()
    listener = PostgresWalListener(
        logical_postgres_url,
        [TableSpec.parse(names.table, ["user:{id}"], namespace="orders")],
        slot=names.slot,
        publication=names.slot,
    )
    async with running(listener, sink):
        await until(lambda: reading(listener, sink), 10, "reading the slot")
        await db.execute(f"INSERT INTO {names.table} (id) VALUES (1); TRUNCATE {names.table}")
        await until(lambda: _true(originated([sink], "prefixes")), 5, "the truncate")
    assert {event.namespace for event in sink.originated} == {"orders"}
    assert originated([sink]) == {"user:1"}


async def test_truncate_invalidates_by_the_key_templates_prefixes(
    logical_postgres_url: str, db: asyncpg.Connection, names: Names
) -> None:
    sink = RecordingSink()
    listener = users(names, url=logical_postgres_url)
    async with running(listener, sink):
        await until(lambda: reading(listener, sink), 10, "reading the slot")
        await db.execute(f"INSERT INTO {names.table} (id) VALUES (1); TRUNCATE {names.table}")
        await until(lambda: _true(originated([sink], "prefixes")), 5, "the truncate")
    assert originated([sink], "prefixes") == {"user:"}


async def test_changes_committed_while_no_listener_runs_are_applied_on_start(
    logical_postgres_url: str, db: asyncpg.Connection, names: Names
) -> None:
    first = RecordingSink()
    listener = users(names, url=logical_postgres_url)
    async with running(listener, first):
        await until(lambda: reading(listener, first), 10, "reading the slot")
    await db.execute(f"INSERT INTO {names.table} (id, org_id) VALUES (41, 1), (42, 1)")

    later = RecordingSink()
    restarted = users(names, url=logical_postgres_url)
    async with running(restarted, later):
        await until(lambda: _true(later.gaps), 10, "caught up")
        assert originated([later]) == {"user:41", "user:42"}
        assert later.gaps == [False]  # the slot kept everything


async def test_a_failed_originate_is_delivered_again(
    logical_postgres_url: str, db: asyncpg.Connection, names: Names
) -> None:
    sink = RecordingSink()
    listener = users(names, url=logical_postgres_url)
    async with running(listener, sink):
        await until(lambda: reading(listener, sink), 10, "reading the slot")
        sink.originate_failures = 3
        await db.execute(f"INSERT INTO {names.table} (id) VALUES (9)")
        await until(lambda: _true(sink.originated), 10, "delivered after the failures")
        assert sink.originate_failures == 0
    assert originated([sink]) == {"user:9"}


@pytest.mark.parametrize("failure", ["cancelled", "terminated"])
async def test_a_standby_takes_over_and_no_committed_update_is_skipped(
    logical_postgres_url: str, db: asyncpg.Connection, names: Names, failure: str
) -> None:
    count = 1000
    await db.execute(
        f"INSERT INTO {names.table} (id, org_id) SELECT i, 1 FROM generate_series(0, {count - 1}) i"
    )
    sinks = [RecordingSink(), RecordingSink()]
    listeners = [users(names, url=logical_postgres_url) for _ in sinks]
    async with (
        running(listeners[0], sinks[0]) as first_task,
        running(listeners[1], sinks[1]) as second_task,
    ):
        await until(lambda: _true(all(sink.gaps for sink in sinks)), 10, "both started")
        # Sidecars start together: whichever took the lock reads, the other stands by.
        assert [listener.reading for listener in listeners].count(True) == 1
        reader, standby = listeners if listeners[0].reading else listeners[::-1]
        reader_task = first_task if reader is listeners[0] else second_task

        async def update_all() -> None:
            writer = await asyncpg.connect(logical_postgres_url)
            try:
                for i in range(count):  # each its own transaction
                    await writer.execute(f"UPDATE {names.table} SET v = v + 1 WHERE id = $1", i)
            finally:
                await writer.close()

        updates = asyncio.create_task(update_all())
        await until(lambda: _true(len(originated(sinks)) >= 200), 20, "some updates read")
        if failure == "cancelled":
            reader_task.cancel()
        else:
            terminated = await db.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted"
                " AND objid = (hashtextextended($1, 0) & 4294967295)::oid",
                f"cachesvc-wal:{names.slot}",
            )
            assert terminated
        await updates
        await until(lambda: _true(standby.reading or reader.reading), 10, "a reader again")
        keys = {f"user:{i}" for i in range(count)}
        await until(lambda: _true(keys <= originated(sinks)), 20, "every update originated")
        if failure == "cancelled":
            assert standby.reading
    never_originated = keys - originated(sinks)
    assert len(never_originated) == 0


async def test_a_missing_table_is_named(logical_postgres_url: str) -> None:
    sink = RecordingSink()
    listener = PostgresWalListener(
        logical_postgres_url,
        [TableSpec.parse("public.no_such_table", ["x:{id}"])],
        slot="never_created",
    )
    async with running(listener, sink):
        await until(lambda: _true(listener.error), 10, "the error")
        assert (
            listener.error is not None and "public.no_such_table does not exist" in listener.error
        )
        assert listener.state == "down"
    assert sink.gaps == []


async def test_a_server_without_logical_decoding_is_named(postgres_url: str) -> None:
    db = await asyncpg.connect(postgres_url)
    try:
        assert await db.fetchval("SHOW wal_level") == "replica"
    finally:
        await db.close()
    listener = PostgresWalListener(
        postgres_url, [TableSpec.parse("users", ["user:{id}"])], slot="never_created"
    )
    async with running(listener, RecordingSink()):
        await until(lambda: _true(listener.error), 10, "the error")
    assert listener.error is not None and "wal_level=replica" in listener.error
    assert "wal_level=logical" in listener.error


def test_templates_name_their_columns() -> None:
    assert Template.parse("user:{id}").columns == {"id"}
    assert Template.parse("{org_id}/{id}").columns == {"org_id", "id"}
    assert Template.parse("{{literal}}:{id}").render({"id": "3"}) == "{literal}:3"
    assert Template.parse("user:{id}").render({"id": None}) is None
    spec = TableSpec.parse("users", ["user:{id}"], ["org:{org_id}"])
    assert spec.columns == {"id", "org_id"}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["user:{"], "keys[0]: 'user:{'"),
        (["ok:{id}", "user:{a.b}"], "keys[1]: 'user:{a.b}': '{a.b}' is not a column name"),
        (["user:{id:>3}"], "'{id:>3}' is not a column name"),
        (["user:{id!r}"], "'{id!r}' is not a column name"),
        (["user:{}"], "must name a column"),
        ([""], "keys[0]: a template must not be empty"),
        ([], "name at least one key or tag template"),
    ],
)
def test_bad_templates_are_a_clear_value_error(keys: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TableSpec.parse("users", keys)


async def _true(value: object) -> bool:
    return bool(value)
