"""Invalidation from rows committed in Postgres, read from its write-ahead log (logical
decoding with the built-in ``pgoutput`` plugin; no trigger, no NOTIFY).

The sidecar creates, idempotently (several sidecars may start at once), a publication of
the configured tables and a logical replication slot. The slot keeps every change not yet
confirmed, so changes committed while no sidecar runs are applied when one runs again.

How the slot is read (the client was chosen by measuring; see bench/sources.py): psycopg 3
has no replication protocol support and asyncpg none either, so the listener polls the
slot over an ordinary asyncpg connection: ``pg_logical_slot_peek_binary_changes`` up to
the WAL flushed at the start of the poll, then — after ``originate`` returned for what it
read — ``pg_replication_slot_advance`` to that position. Peeking does not consume: a
reader that dies before advancing leaves the changes for the next one, so nothing
committed is skipped (an event may be applied twice, which is harmless).

One reader at a time: a slot is held only while a function reads it, so the reader holds
a session advisory lock instead; the other sidecars are standbys that try to take the lock
every ``standby_poll`` seconds. The lock goes with the reader's connection (a sidecar that
dies, ``pg_terminate_backend``), so a standby takes over within ``standby_poll`` seconds.

Each change becomes keys and tags from the table's templates (``"user:{id}"``) over the old
and the new row: an UPDATE that changes the key column invalidates both keys. The old row
has the columns of the table's REPLICA IDENTITY only, so the listener makes sure it holds
every column the templates use (setting ``REPLICA IDENTITY FULL`` when it does not), or
names the problem.
"""

from __future__ import annotations

import asyncio
import logging
import string
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from invalidation.base import Backoff, EventSink, Listener
from invalidation.events import MAX_ITEMS, InvalidationEvent

log = logging.getLogger(__name__)

DEFAULT_NAME = "cachesvc_invalidation"  # of the slot, the publication and the lock
_POSTGRES_EPOCH = 946_684_800  # 2000-01-01 in Unix seconds: pgoutput's timestamps count from it


class SourceUnusable(Exception):
    """The database cannot be a source as configured (a missing table or column, no
    logical decoding); the message says what to change. Retried with backoff, so fixing
    the database is enough."""


# -- templates -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Template:
    """A key or tag template over a row's columns: ``"user:{id}"``; ``{{`` and ``}}`` are
    literal braces."""

    text: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, column or None)

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(column for _, column in self.parts if column is not None)

    @property
    def prefix(self) -> str:
        """The literal text before the first column."""
        return self.parts[0][0] if self.parts else ""

    @classmethod
    def parse(cls, text: str) -> Template:
        """ValueError saying what is wrong with ``text``."""
        if not text:
            raise ValueError("a template must not be empty")
        parts: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
        for literal, column, spec, conversion in parsed:
            if column is not None:
                if not column:
                    raise ValueError(f"{text!r}: '{{}}' must name a column")
                if spec or conversion or any(mark in column for mark in ".[]"):
                    raise ValueError(
                        f"{text!r}: '{{{column}{'!' + conversion if conversion else ''}"
                        f"{':' + spec if spec else ''}}}' is not a column name"
                    )
            parts.append((literal, column))
        return cls(text, tuple(parts))

    def render(self, row: Mapping[str, str | None]) -> str | None:
        """The key for ``row``; None when a column it uses is NULL or not in the row."""
        pieces: list[str] = []
        for literal, column in self.parts:
            pieces.append(literal)
            if column is not None:
                value = row.get(column)
                if value is None:
                    return None
                pieces.append(value)
        return "".join(pieces)


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One ``[[invalidation.tables]]`` entry, its templates parsed."""

    table: str  # as configured: "public.users" or "users"
    keys: tuple[Template, ...]
    tags: tuple[Template, ...] = ()
    namespace: str = "default"  # of the keys and tags: the events' namespace

    @classmethod
    def parse(
        cls, table: str, keys: Sequence[str], tags: Sequence[str] = (), namespace: str = "default"
    ) -> TableSpec:
        """ValueError naming the template (``keys[1]: ...``) that is wrong."""
        if not keys and not tags:
            raise ValueError(f"{table}: name at least one key or tag template")
        parsed: dict[str, list[Template]] = {"keys": [], "tags": []}
        for name, templates in (("keys", keys), ("tags", tags)):
            for position, text in enumerate(templates):
                try:
                    parsed[name].append(Template.parse(text))
                except ValueError as exc:
                    raise ValueError(f"{name}[{position}]: {exc}") from None
        return cls(table, tuple(parsed["keys"]), tuple(parsed["tags"]), namespace)

    @property
    def columns(self) -> frozenset[str]:
        return frozenset().union(*(template.columns for template in self.keys + self.tags))


# -- pgoutput ------------------------------------------------------------------------------
# Message formats: "Logical Replication Message Formats" in the PostgreSQL documentation
# (protocol version 1). Only what invalidation needs is decoded; the rest is skipped.


@dataclass(slots=True)
class Relation:
    namespace: str
    name: str
    columns: list[str]


Row = dict[str, str | None]


@dataclass(slots=True)
class Change:
    relation_id: int
    old: Row | None  # DELETE, and UPDATE when the replica identity sent it
    new: Row | None  # INSERT, UPDATE


@dataclass(slots=True)
class Truncate:
    relation_ids: list[int]


@dataclass(slots=True)
class Commit:
    end_lsn: int
    committed_at: float  # Unix seconds


class PgOutputDecoder:
    """Turns pgoutput messages into changes; remembers the relations it was told about
    (pgoutput sends a Relation message before a relation's first change in a session)."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, data: bytes) -> Change | Truncate | Commit | None:
        kind = data[:1]
        if kind == b"R":
            self._relation(data)
        elif kind == b"I":
            relation_id = _INT32.unpack_from(data, 1)[0]
            new, _ = self._tuple(relation_id, data, 6)  # after the 'N'
            return Change(relation_id, None, _known(new))
        elif kind == b"U":
            relation_id = _INT32.unpack_from(data, 1)[0]
            old = None
            offset = 5
            if data[offset : offset + 1] in (b"K", b"O"):
                old, offset = self._tuple(relation_id, data, offset + 1)
            new, _ = self._tuple(relation_id, data, offset + 1)  # after the 'N'
            # Unchanged TOASTed values are not sent again: the old row has them, if any.
            if old is not None:
                new = {name: old.get(name) if value is _UNCHANGED else value
                       for name, value in new.items()}  # fmt: skip
            return Change(relation_id, _known(old), _known(new))
        elif kind == b"D":
            relation_id = _INT32.unpack_from(data, 1)[0]
            old, _ = self._tuple(relation_id, data, 6)  # after the 'K' or 'O'
            return Change(relation_id, _known(old), None)
        elif kind == b"T":
            count = _INT32.unpack_from(data, 1)[0]
            ids = [_INT32.unpack_from(data, 6 + 4 * i)[0] for i in range(count)]
            return Truncate(ids)
        elif kind == b"C":
            end_lsn, timestamp = struct.unpack_from("!xQq", data, 9)
            return Commit(end_lsn, _POSTGRES_EPOCH + timestamp / 1_000_000)
        return None  # Begin, Type, Origin, Message: nothing to invalidate

    def _relation(self, data: bytes) -> None:
        relation_id = _INT32.unpack_from(data, 1)[0]
        namespace, offset = _string(data, 5)
        name, offset = _string(data, offset)
        offset += 1  # replica identity setting
        count = _INT16.unpack_from(data, offset)[0]
        offset += 2
        columns = []
        for _ in range(count):
            column, offset = _string(data, offset + 1)  # after the flags
            columns.append(column)
            offset += 8  # type oid, type modifier
        self.relations[relation_id] = Relation(namespace, name, columns)

    def _tuple(self, relation_id: int, data: bytes, offset: int) -> tuple[dict[str, object], int]:
        columns = self.relations[relation_id].columns
        count = _INT16.unpack_from(data, offset)[0]
        offset += 2
        row: dict[str, object] = {}
        for position in range(count):
            kind = data[offset : offset + 1]
            offset += 1
            value: object
            if kind == b"n":
                value = None
            elif kind == b"u":
                value = _UNCHANGED
            else:  # 't' (text; 'b', binary, only when asked for)
                length = _INT32.unpack_from(data, offset)[0]
                offset += 4
                value = data[offset : offset + length].decode()
                offset += length
            row[columns[position]] = value
        return row, offset


_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UNCHANGED = object()  # an unchanged TOASTed value: not in the message


def _string(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(b"\0", offset)
    return data[offset:end].decode(), end + 1


def _known(row: dict[str, object] | None) -> Row | None:
    if row is None:
        return None
    return {name: value for name, value in row.items() if isinstance(value, str) or value is None}


# -- the listener --------------------------------------------------------------------------


@dataclass
class _Pending:
    """Keys and tags of one namespace read but not yet originated."""

    namespace: str
    keys: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)

    def events(self) -> Iterable[InvalidationEvent]:
        keys, prefixes, tags = sorted(self.keys), sorted(self.prefixes), sorted(self.tags)
        for start in range(0, max(len(keys), len(prefixes), len(tags)), MAX_ITEMS):
            end = start + MAX_ITEMS
            yield InvalidationEvent(
                keys=tuple(keys[start:end]),
                prefixes=tuple(prefixes[start:end]),
                tags=tuple(tags[start:end]),
                namespace=self.namespace,
                sent_at=time.time(),
            )


class PostgresWalListener(Listener):
    """Reads the changes of ``tables`` (all in the database at ``url``) from the slot
    ``slot``; passes each batch of them to ``sink.originate``."""

    connection_errors = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError,
                         SourceUnusable)  # fmt: skip

    def __init__(
        self,
        url: str,
        tables: Sequence[TableSpec],
        *,
        source: str = "postgres-wal",
        slot: str = DEFAULT_NAME,
        publication: str = DEFAULT_NAME,
        poll_interval: float = 0.1,
        standby_poll: float = 1.0,
        batch: int = 1000,
        query_timeout: float = 10.0,
    ) -> None:
        super().__init__(url, slot)
        if not tables:
            raise ValueError("name at least one table")
        self.source = source
        self.tables = list(tables)
        self.slot = slot
        self.publication = publication
        self.poll_interval = poll_interval
        self.standby_poll = standby_poll
        self.batch = batch
        self.query_timeout = query_timeout
        self.reading = False  # this sidecar reads the slot; the others stand by
        self._behind_at: float | None = None  # commit time of the last batch, while behind
        self._caught_up_at = time.time()

    @property
    def lag(self) -> float:
        now = time.time()
        if self.state != "up":
            return max(0.0, now - self._caught_up_at)
        if not self.reading or self._behind_at is None:
            return 0.0
        return max(0.0, now - self._behind_at)

    async def listen(self, sink: EventSink, backoff: Backoff) -> None:
        connection = await asyncpg.connect(self.url, timeout=self.query_timeout)
        try:
            try:
                specs = await self._prepare(connection)
                created = await self._create_slot(connection)
            except SourceUnusable as exc:
                if str(exc) != self.error:
                    log.error("invalidation source %s: %s", self.source, exc)
                self.error = str(exc)
                raise
            self.error = None
            self.state = "up"
            backoff.reset()
            await self._stand_by(connection, sink)
            await self._read(connection, specs, created, sink)
        finally:
            self.reading = False
            connection.terminate()

    # -- set-up

    async def _prepare(self, connection: asyncpg.Connection) -> dict[int, TableSpec]:
        """Check the server and the tables, make sure the old rows carry the templates'
        columns, and publish the tables; the specs by table OID."""
        wal_level = await connection.fetchval("SHOW wal_level")
        if wal_level != "logical":
            raise SourceUnusable(
                f"the server at {_where(self.url)} has wal_level={wal_level}: reading changes "
                "needs wal_level=logical (set it in postgresql.conf and restart the server)"
            )
        specs: dict[int, TableSpec] = {}
        names: list[str] = []
        for spec in self.tables:
            oid, name = await self._table(connection, spec)
            specs[oid] = spec
            names.append(name)
        # Concurrent sidecars: one creates it, the others find it; each sets the same tables.
        try:
            await connection.execute(
                f"CREATE PUBLICATION {_ident(self.publication)} FOR TABLE {', '.join(names)}"
            )
        except asyncpg.DuplicateObjectError:
            await connection.execute(
                f"ALTER PUBLICATION {_ident(self.publication)} SET TABLE {', '.join(names)}"
            )
        return specs

    async def _table(self, connection: asyncpg.Connection, spec: TableSpec) -> tuple[int, str]:
        row = await connection.fetchrow(
            "SELECT c.oid, c.oid::regclass::text AS name, c.relreplident::text,"
            " ARRAY(SELECT attname FROM pg_attribute"
            "       WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped) AS columns,"
            " ARRAY(SELECT a.attname FROM pg_index i"
            "       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            "       WHERE i.indrelid = c.oid AND CASE c.relreplident"
            "         WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident END) AS identity"
            " FROM pg_class c WHERE c.oid = to_regclass($1)",
            spec.table,
        )
        if row is None:
            raise SourceUnusable(f"table {spec.table} does not exist in {_where(self.url)}")
        missing = spec.columns - set(row["columns"])
        if missing:
            raise SourceUnusable(
                f"table {row['name']} has no column {', '.join(sorted(missing))} "
                "(used by its key and tag templates)"
            )
        uncovered = spec.columns - set(row["identity"])
        if row["relreplident"] != "f" and uncovered:
            # Otherwise an UPDATE or DELETE would not say the old row's value of these.
            try:
                await connection.execute(f"ALTER TABLE {row['name']} REPLICA IDENTITY FULL")
            except asyncpg.PostgresError as exc:
                raise SourceUnusable(
                    f"table {row['name']}: its replica identity lacks "
                    f"{', '.join(sorted(uncovered))}, which the templates use, and setting "
                    f"REPLICA IDENTITY FULL failed ({exc}); run ALTER TABLE {row['name']} "
                    "REPLICA IDENTITY FULL as its owner"
                ) from exc
            log.info("table %s: replica identity set to FULL for its templates", row["name"])
        return int(row["oid"]), str(row["name"])

    async def _create_slot(self, connection: asyncpg.Connection) -> bool:
        """True when this call created the slot: changes before it were not kept."""
        try:
            await connection.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", self.slot
            )
        except asyncpg.DuplicateObjectError:
            return False
        except asyncpg.ObjectNotInPrerequisiteStateError as exc:
            raise SourceUnusable(f"cannot create the replication slot: {exc}") from exc
        log.warning(
            "created the replication slot %s: rows changed before now are not invalidated",
            self.slot,
        )
        return True

    async def _stand_by(self, connection: asyncpg.Connection, sink: EventSink) -> None:
        """Return once this sidecar holds the reader's lock; until then, check every
        ``standby_poll`` seconds (which also keeps the connection checked)."""
        told = False
        while not await connection.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            f"cachesvc-wal:{self.slot}",
            timeout=self.query_timeout,
        ):
            if not told:
                # Nothing to catch up on here: the reader applies the changes for everyone.
                await sink.on_gap(self.source, lost=False)
                told = True
            await asyncio.sleep(self.standby_poll)
        self.reading = True
        log.info("reading the replication slot %s", self.slot)

    # -- reading

    async def _read(
        self,
        connection: asyncpg.Connection,
        specs: dict[int, TableSpec],
        created: bool,
        sink: EventSink,
    ) -> None:
        decoder = PgOutputDecoder()  # pgoutput sends relations anew to each decoding session
        retry = Backoff(base=self.poll_interval)
        gap: bool | None = created
        while True:
            upto = await connection.fetchval(
                "SELECT pg_current_wal_flush_lsn()", timeout=self.query_timeout
            )
            rows = await connection.fetch(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2, $3,"
                " 'proto_version', '1', 'publication_names', $4)",
                self.slot,
                upto,
                self.batch,
                self.publication,
                timeout=self.query_timeout,
            )
            pending: dict[str, _Pending] = {}  # by namespace
            last_commit: Commit | None = None
            for row in rows:
                message = decoder.decode(row["data"])
                if isinstance(message, Commit):
                    last_commit = message
                elif message is not None:
                    self._collect(message, decoder, specs, pending)
            # Stopped at ``batch`` changes: up to the last commit read; else all flushed WAL.
            full = len(rows) >= self.batch and last_commit is not None
            position = last_commit.end_lsn if full and last_commit else upto
            try:
                for events in pending.values():
                    for event in events.events():
                        await sink.originate(event, self.source)
            except Exception as exc:  # the sink's failure, whatever it is: read them again
                log.warning("invalidation source %s: originate failed, retrying: %r",
                            self.source, exc)  # fmt: skip
                await retry.sleep()
                continue
            retry.reset()
            await connection.execute(
                "SELECT pg_replication_slot_advance($1, $2)",
                self.slot,
                position,
                timeout=self.query_timeout,
            )
            if full:
                self._behind_at = last_commit.committed_at if last_commit else None
                continue
            self._behind_at = None
            self._caught_up_at = time.time()
            if gap is not None:
                await sink.on_gap(self.source, lost=gap)
                gap = None
            await asyncio.sleep(self.poll_interval)

    def _collect(
        self,
        message: Change | Truncate,
        decoder: PgOutputDecoder,
        specs: dict[int, TableSpec],
        by_namespace: dict[str, _Pending],
    ) -> None:
        if isinstance(message, Truncate):
            for relation_id in message.relation_ids:
                spec = specs.get(relation_id)
                if spec is not None:
                    self._truncated(spec, _pending(by_namespace, spec))
            return
        spec = specs.get(message.relation_id)
        if spec is None:
            return  # a table dropped from the configuration but still published
        pending = _pending(by_namespace, spec)
        for row in (message.old, message.new):
            if row is None:
                continue
            for template in spec.keys:
                if (key := template.render(row)) is not None:
                    pending.keys.add(key)
            for template in spec.tags:
                if (tag := template.render(row)) is not None:
                    pending.tags.add(tag)
        # An UPDATE without the old row (its identity columns unchanged): the templates'
        # columns are all in the identity, so the old row's keys are the new row's.

    def _truncated(self, spec: TableSpec, pending: _Pending) -> None:
        """Every row is gone: invalidate the keys by their templates' literal prefixes.
        Tags cannot be enumerated: entries tagged from the table's rows stay until they
        expire, which the log says."""
        for template in spec.keys:
            if template.prefix:
                pending.prefixes.add(template.prefix)
            else:
                log.warning("TRUNCATE %s: key template %r has no literal prefix to invalidate",
                            spec.table, template.text)  # fmt: skip
        if spec.tags:
            log.warning("TRUNCATE %s: its rows' tags cannot be invalidated", spec.table)


def _pending(by_namespace: dict[str, _Pending], spec: TableSpec) -> _Pending:
    found = by_namespace.get(spec.namespace)
    if found is None:
        found = by_namespace[spec.namespace] = _Pending(spec.namespace)
    return found


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _where(url: str) -> str:
    """The URL without its password, for messages."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.partition(':')[0]}@{tail}"
