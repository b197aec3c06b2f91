"""The audit trail: an append-only, hash-chained table in the durable tier's database.

Every record is chained to the one before it: its ``hash`` is the SHA-256 (lowercase hex)
of its *canonical encoding*, which includes the previous record's hash::

    json.dumps({"seq": 7, "at": "2025-06-01T12:00:00.000000Z", "actor": "orders-api",
                "namespace": "orders", "action": "invalidate", "target": "...",
                "outcome": "ok", "client": "127.0.0.1", "count": 1,
                "config_digest": null, "prev": "<hash of record 6>"},
               sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

``seq`` numbers the records 1, 2, 3 ... without gaps; the first record's ``prev`` is 64
zeros; ``at`` is UTC with microseconds. Changing any field of a record, or removing a record
from the middle, breaks the chain at that record, which ``verify`` names.

Writing is off the request path: ``record`` queues, and one background task appends what is
queued as one multi-row INSERT per batch. Several sidecars append to one chain: each batch
runs in a transaction that first takes a transaction-scoped advisory lock on the chain
(``pg_advisory_xact_lock``), then reads the head (the highest ``seq``) and chains the batch
onto it. An advisory lock rather than ``SELECT ... FOR UPDATE`` of the head row: an empty
table has no head row to lock, and pruning deletes rows.

``record_now`` is for what must be on record before it is answered (an erasure): it queues
the record like any other, so the chain keeps one order, and returns once the batch that
holds it committed.

Refusals (401, 403) are coalesced: one record per actor, refusal, namespace, client address
and minute, with the number of requests in ``count``.

Pruning keeps the rest verifiable: records older than ``retention_days`` go from the oldest
on, and in the same transaction a ``prune`` record is appended whose target names the last
record removed and its hash (``{"through": 41, "hash": "..."}``); ``verify`` starts from the
oldest record left and checks that the newest prune record accounts for everything before
it. A hash chain cannot show that records were removed from its *end*: ``verify`` prints the
head's hash, for keeping elsewhere.

Driver errors are mapped once, to ``AuditUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias, TypeVar

import asyncpg
import asyncpg.pool

from invalidation.base import Backoff

log = logging.getLogger(__name__)

TABLE = "cachesvc_audit"
GENESIS = "0" * 64
DEFAULT_RETENTION_DAYS = 2555  # seven years
PRUNE_INTERVAL = 3600.0  # seconds between two pruning rounds of one sidecar
RECORD_NOW_TIMEOUT = 5.0
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_T = TypeVar("_T")
if TYPE_CHECKING:  # the proxy class is generic only in asyncpg-stubs
    _Conn: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    )

# What the trail records (``action``); refusals carry their HTTP status as ``outcome``.
INVALIDATE = "invalidate"
ERASE = "erase"
REFUSED = "refused"
ACCESS = "access"  # the keys held with a tag were listed (a data subject's access)
START = "start"
STOP = "stop"
PRUNE = "prune"


class AuditUnavailable(Exception):
    """The audit table could not be read or written (Postgres down, refused, too slow)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One event, before it has its place in the chain."""

    at: datetime  # aware, UTC
    actor: str  # a token's name, an event source ("redis-pubsub"), "cli", "cachesvc"
    namespace: str | None
    action: str
    target: str
    outcome: str
    client: str | None  # the client's address
    count: int = 1  # requests a coalesced record stands for
    config_digest: str | None = None  # start and stop records

    def values(self) -> tuple[Any, ...]:
        """The fields in the table's column order."""
        return (
            self.at,
            self.actor,
            self.namespace,
            self.action,
            self.target,
            self.outcome,
            self.client,
            self.count,
            self.config_digest,
        )


class Stored(NamedTuple):
    """A record in the chain."""

    seq: int
    record: Record
    prev: str
    hash: str

    def document(self) -> dict[str, Any]:
        """The record as ``cachesvc audit list`` prints it."""
        return {**_fields(self.seq, self.record, self.prev), "hash": self.hash}


def new_record(
    action: str,
    *,
    actor: str,
    namespace: str | None = None,
    target: str = "",
    outcome: str = "ok",
    client: str | None = None,
    count: int = 1,
    config_digest: str | None = None,
    at: datetime | None = None,
) -> Record:
    """A record of now, its texts made storable as they are hashed (Postgres text holds
    neither NUL nor lone surrogates, and the hash must be of what is stored)."""
    return Record(
        (at or datetime.now(UTC)).astimezone(UTC),
        _storable(actor),
        None if namespace is None else _storable(namespace),
        _storable(action),
        _storable(target),
        _storable(outcome),
        None if client is None else _storable(client),
        count,
        config_digest,
    )


def _storable(text: str) -> str:
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def format_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fields(seq: int, record: Record, prev: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": format_time(record.at),
        "actor": record.actor,
        "namespace": record.namespace,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
        "client": record.client,
        "count": record.count,
        "config_digest": record.config_digest,
        "prev": prev,
    }


def canonical(seq: int, record: Record, prev: str) -> bytes:
    """The bytes a record's hash is taken over (see the module's docstring)."""
    document = _fields(seq, record, prev)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def chain_hash(seq: int, record: Record, prev: str) -> str:
    return hashlib.sha256(canonical(seq, record, prev)).hexdigest()


def target_of(
    keys: Sequence[str] = (), prefixes: Sequence[str] = (), tags: Sequence[str] = ()
) -> str:
    """An invalidation's or erasure's target: its keys, prefixes and tags (those given),
    as compact JSON, e.g. ``{"keys":["user:7"],"tags":["org:3"]}``."""
    document = {
        field: list(names)
        for field, names in (("keys", keys), ("prefixes", prefixes), ("tags", tags))
        if names
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


def config_digest(document: Mapping[str, Any]) -> str:
    """SHA-256 of a configuration (e.g. ``settings.model_dump(mode="json")``, where secrets
    are masked) in the same canonical JSON: equal configurations, equal digests."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_retention_days(value: int) -> int:
    """For the config model of ``[audit] retention_days``: a whole number of days, >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number of days, at least 1 (got {value!r})")
    return value


# -- the schema --------------------------------------------------------------------------------


def ddl(table: str = TABLE) -> str:
    """The statements that create the audit table (docs/governance.md shows them)."""
    return f"""
        CREATE TABLE IF NOT EXISTS "{table}" (
            seq bigint PRIMARY KEY,
            at timestamptz NOT NULL,
            actor text NOT NULL,
            namespace text,
            action text NOT NULL,
            target text NOT NULL,
            outcome text NOT NULL,
            client text,
            count integer NOT NULL,
            config_digest text,
            prev_hash text NOT NULL,
            hash text NOT NULL
        );
        CREATE INDEX IF NOT EXISTS "{table}_at_idx" ON "{table}" (at);
    """


_COLUMNS = (
    "seq, at, actor, namespace, action, target, outcome, client, count, config_digest, "
    "prev_hash, hash"
)


def _stored(row: asyncpg.Record) -> Stored:
    record = Record(
        row["at"],
        row["actor"],
        row["namespace"],
        row["action"],
        row["target"],
        row["outcome"],
        row["client"],
        row["count"],
        row["config_digest"],
    )
    return Stored(row["seq"], record, row["prev_hash"], row["hash"])


@contextlib.contextmanager
def _mapped(what: str) -> Any:
    try:
        yield
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise AuditUnavailable(f"audit trail: {what}: {exc}") from exc


# -- writing -----------------------------------------------------------------------------------


class _Queued(NamedTuple):
    record: Record
    written: asyncio.Future[int] | None  # record_now's: its seq once committed


@dataclass
class _Refusals:
    first: Record
    count: int


class AuditTrail:
    """The writer: ``start()``, then ``record``/``record_now``/``refused``, then
    ``close()`` (which writes what is queued, within ``close_timeout``)."""

    def __init__(
        self,
        dsn: str,
        *,
        table: str = TABLE,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        batch: int = 500,
        max_queued: int = 100_000,
        connect_timeout: float = 2.0,
        actor: str = "cachesvc",
        record_now_timeout: float = RECORD_NOW_TIMEOUT,
        close_timeout: float = 5.0,
    ) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise ValueError(f"audit table {table!r} must be a lowercase identifier")
        self.dsn = dsn
        self.table = table
        self.retention_days = check_retention_days(retention_days)
        self.batch = batch
        self.max_queued = max_queued
        self.connect_timeout = connect_timeout
        self.actor = actor  # of the records the trail writes itself (prune)
        self.record_now_timeout = record_now_timeout
        self.close_timeout = close_timeout
        self.dropped = 0  # records lost because the queue was full (Postgres down long)
        self._queue: list[_Queued] = []
        self._wake = asyncio.Event()  # set when a record is queued
        self._idle = asyncio.Event()  # set when the queue has been written
        self._refusals: dict[tuple[str, str, str | None, str | None, int], _Refusals] = {}
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._schema_ready = False
        self._next_prune = 0.0
        self._warned_at = 0.0  # when the last "cannot write" warning was logged
        self._lock_name = f"cachesvc:audit:{table}"
        quoted = f'"{table}"'
        self._sql_head = f"SELECT seq, hash FROM {quoted} ORDER BY seq DESC LIMIT 1"
        self._sql_insert = f"""
            INSERT INTO {quoted} ({_COLUMNS})
            SELECT * FROM unnest($1::int8[], $2::timestamptz[], $3::text[], $4::text[],
                $5::text[], $6::text[], $7::text[], $8::text[], $9::int4[], $10::text[],
                $11::text[], $12::text[])
        """
        # The prunable records are a prefix of the chain: from the oldest on, up to the
        # first one young enough to keep (``at`` follows ``seq`` only roughly: a record may
        # wait in a queue before it is numbered).
        self._sql_first_kept = f"SELECT seq FROM {quoted} WHERE at >= $1 ORDER BY seq LIMIT 1"
        self._sql_hash_of = f"SELECT hash FROM {quoted} WHERE seq = $1"
        self._sql_oldest = f"SELECT seq FROM {quoted} ORDER BY seq LIMIT 1"
        self._sql_prune = f"DELETE FROM {quoted} WHERE seq <= $1"

    async def start(self) -> None:
        """Prepare the pool (no connection yet: the sidecar starts while Postgres is down;
        the table is created on the first successful connection) and the writer."""
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=2, timeout=self.connect_timeout
        )
        self._writer = asyncio.create_task(self._write_forever(), name="cachesvc-audit-writer")

    def record(self, action: str, **fields: Any) -> None:
        """Queue a record (``new_record``'s fields); it is written within moments."""
        self._enqueue(_Queued(new_record(action, **fields), None))

    async def record_now(self, action: str, **fields: Any) -> int:
        """Write a record durably before returning its ``seq``. AuditUnavailable when it was
        not committed within ``record_now_timeout`` (it stays queued, and is written once
        it can be)."""
        written: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._enqueue(_Queued(new_record(action, **fields), written), force=True)
        try:
            return await asyncio.wait_for(asyncio.shield(written), self.record_now_timeout)
        except TimeoutError:
            raise AuditUnavailable(
                f"audit trail: the {action} record was not committed within "
                f"{self.record_now_timeout} s (Postgres down or slow); it stays queued"
            ) from None

    def refused(
        self,
        status: int,
        *,
        actor: str,
        namespace: str | None = None,
        target: str = "",
        client: str | None = None,
    ) -> None:
        """A request refused with ``status`` (401, 403): one record per actor, status,
        namespace, client and minute, with the count, written once the minute is over."""
        record = new_record(
            REFUSED,
            actor=actor,
            namespace=namespace,
            target=target,
            outcome=str(status),
            client=client,
        )
        minute = int(record.at.timestamp() // 60)
        group = (record.actor, record.outcome, record.namespace, record.client, minute)
        held = self._refusals.get(group)
        if held is None:
            self._refusals[group] = _Refusals(record, 1)
        else:
            held.count += 1

    async def close(self) -> None:
        """Write what is queued (refusals of the current minute included), within
        ``close_timeout``, then stop."""
        self.release_refusals(everything=True)
        if self._writer is not None:
            if self._queue:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), self.close_timeout)
            if self._queue:
                log.error("audit trail: %d records not written at stop", len(self._queue))
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()

    def _enqueue(self, queued: _Queued, force: bool = False) -> None:
        if len(self._queue) >= self.max_queued and not force:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error(
                    "audit trail: %d records dropped: %d wait for the database already",
                    self.dropped,
                    len(self._queue),
                )
            return
        self._queue.append(queued)
        self._idle.clear()
        self._wake.set()

    def release_refusals(self, everything: bool = False) -> None:
        """Queue the coalesced refusals of the minutes that are over (``everything``: of
        the current minute too, e.g. before a stop record)."""
        current = int(time.time() // 60)
        for group, held in list(self._refusals.items()):
            if everything or group[-1] < current:
                del self._refusals[group]
                self._enqueue(_Queued(dataclasses.replace(held.first, count=held.count), None))

    async def _write_forever(self) -> None:
        backoff = Backoff(cap=1.0)
        while True:
            self.release_refusals()
            if time.monotonic() >= self._next_prune:
                try:
                    await self.prune()
                except AuditUnavailable as exc:
                    log.warning("%s", exc)
                    self._next_prune = time.monotonic() + 60  # sooner than a full interval
                else:
                    self._next_prune = time.monotonic() + PRUNE_INTERVAL
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                # Woken by a new record, or to release the refusals of a minute now over.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 60 - time.time() % 60 + 0.01)
                continue
            batch = self._queue[: self.batch]
            try:
                first = await self._append([queued.record for queued in batch])
            except AuditUnavailable as exc:
                self._warn(f"{exc}; {len(self._queue)} records wait")
                await backoff.sleep()
                continue
            except Exception:  # the writer must outlive any surprise; the records wait
                log.exception("audit trail: writing failed")
                await backoff.sleep()
                continue
            backoff.reset()
            if self._warned_at:
                log.info("audit trail: writing again")
                self._warned_at = 0.0
            del self._queue[: len(batch)]
            for offset, queued in enumerate(batch):
                if queued.written is not None and not queued.written.done():
                    queued.written.set_result(first + offset)

    def _warn(self, message: str) -> None:
        """A warning when writing starts failing, then once a minute while it still does
        (the writer retries several times a second)."""
        now = time.monotonic()
        if now - self._warned_at >= 60:
            log.warning("%s", message)
            self._warned_at = now
        else:
            log.debug("%s", message)

    async def _append(self, records: Sequence[Record]) -> int:
        """Chain ``records`` onto the head and insert them; the first one's seq."""

        async def append(conn: _Conn) -> int:
            seq, prev = await self._head(conn)
            return await self._insert(conn, seq + 1, prev, records)

        return await self._locked(append, "append")

    async def prune(self, now: datetime | None = None) -> int:
        """Delete the records older than ``retention_days``, and record that; how many went."""
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.retention_days)

        async def prune(conn: _Conn) -> int:
            head, head_hash = await self._head(conn)
            oldest = await conn.fetchval(self._sql_oldest)
            first_kept = await conn.fetchval(self._sql_first_kept, cutoff)
            through = head if first_kept is None else first_kept - 1
            if oldest is None or through < oldest:
                return 0
            through_hash = await conn.fetchval(self._sql_hash_of, through)
            await conn.execute(self._sql_prune, through)
            target = json.dumps({"through": through, "hash": through_hash}, sort_keys=True)
            record = new_record(PRUNE, actor=self.actor, target=target)
            await self._insert(conn, head + 1, head_hash, [record])
            pruned: int = through - oldest + 1
            return pruned

        pruned = await self._locked(prune, "prune")
        if pruned:
            log.info(
                "audit trail: pruned %d records older than %d days", pruned, self.retention_days
            )
        return pruned

    async def _locked(self, operation: Callable[[_Conn], Awaitable[_T]], what: str) -> _T:
        """``operation`` in a transaction holding the chain's lock."""
        if self._pool is None:
            raise AuditUnavailable("audit trail: not started")
        with _mapped(what):
            async with self._pool.acquire() as conn:
                if not self._schema_ready:
                    await create_schema(conn, self.table)
                    self._schema_ready = True
                async with conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1))", self._lock_name
                    )
                    return await operation(conn)

    async def _head(self, conn: _Conn) -> tuple[int, str]:
        head = await conn.fetchrow(self._sql_head)
        return (0, GENESIS) if head is None else (head["seq"], head["hash"])

    async def _insert(
        self,
        conn: _Conn,
        first: int,
        prev: str,
        records: Sequence[Record],
    ) -> int:
        columns: list[list[Any]] = [[] for _ in range(12)]
        for seq, record in enumerate(records, start=first):
            digest = chain_hash(seq, record, prev)
            for column, value in zip(columns, (seq, *record.values(), prev, digest), strict=True):
                column.append(value)
            prev = digest
        await conn.execute(self._sql_insert, *columns)
        return first


async def audit_table_exists(conn: _Conn, table: str = TABLE) -> bool:
    with _mapped("read"):
        exists: bool = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{table}"')
    return exists


async def create_schema(conn: _Conn, table: str = TABLE) -> None:
    """Create the audit table unless it exists (several sidecars at once: one at a time)."""
    if await audit_table_exists(conn, table):
        return  # created beforehand (perhaps by an administrator): used as it is
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"cachesvc:ddl:{table}")
        await conn.execute(ddl(table))


# -- reading and verifying ---------------------------------------------------------------------


async def records(
    conn: _Conn,
    *,
    since: datetime | None = None,
    namespace: str | None = None,
    table: str = TABLE,
) -> AsyncIterator[Stored]:
    """The records in chain order, those at or after ``since`` and of ``namespace`` only
    when given. Must run inside a transaction (a server-side cursor)."""
    query = f'SELECT {_COLUMNS} FROM "{table}" WHERE ($1::timestamptz IS NULL OR at >= $1)'
    query += " AND ($2::text IS NULL OR namespace = $2) ORDER BY seq"
    with _mapped("read"):
        async for row in conn.cursor(query, since, namespace, prefetch=1000):
            yield _stored(row)


class Verdict(NamedTuple):
    whole: bool
    records: int
    message: str  # what is broken, naming the record; or the head's seq and hash
    first_broken: int | None = None  # seq of the first record changed or removed


async def verify(conn: _Conn, table: str = TABLE) -> Verdict:
    """Walk the chain from its oldest record; the first record changed or removed."""
    with _mapped("verify"):
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if not await audit_table_exists(conn, table):
                return Verdict(True, 0, f"no audit table {table} (nothing recorded yet)")
            return await _walk(records(conn, table=table))


async def _walk(chain: AsyncIterator[Stored]) -> Verdict:
    previous: Stored | None = None
    oldest: Stored | None = None
    newest_prune: dict[str, Any] | None = None
    count = 0
    async for stored in chain:
        count += 1
        if chain_hash(stored.seq, stored.record, stored.prev) != stored.hash:
            return _broken(
                count, stored.seq, f"record {stored.seq} was changed (it does not match its hash)"
            )
        if previous is None:
            oldest = stored
            if stored.seq == 1 and stored.prev != GENESIS:
                return _broken(count, 1, "record 1 was changed (it does not start the chain)")
        elif stored.seq != previous.seq + 1:
            missing = _span(previous.seq + 1, stored.seq - 1)
            return _broken(count, previous.seq + 1, f"{missing} removed")
        elif stored.prev != previous.hash:
            return _broken(
                count,
                previous.seq,
                f"record {previous.seq} was changed (record {stored.seq} does not follow from it)",
            )
        if stored.record.action == PRUNE:
            with contextlib.suppress(ValueError):
                newest_prune = json.loads(stored.record.target)
        previous = stored
    if oldest is None or previous is None:
        return Verdict(True, 0, "the audit trail is empty")
    if oldest.seq > 1:
        accounted = newest_prune is not None and (
            newest_prune.get("through") == oldest.seq - 1
            and newest_prune.get("hash") == oldest.prev
        )
        if not accounted:
            through = newest_prune.get("through", 0) if newest_prune else 0
            start = through + 1 if isinstance(through, int) and through < oldest.seq - 1 else 1
            missing = _span(start, oldest.seq - 1)
            return _broken(count, start, f"{missing} removed (no pruning accounts for them)")
    return Verdict(
        True,
        count,
        f"the chain is whole: {count} records, {oldest.seq} to {previous.seq}; "
        f"head hash {previous.hash}",
    )


def _span(first: int, last: int) -> str:
    return f"record {first} was" if first == last else f"records {first} to {last} were"


def _broken(count: int, seq: int, message: str) -> Verdict:
    return Verdict(False, count, message, seq)
