"""Postgres tier: ``postgresql://user@host:5432/db?table=cachesvc_entries&pool_size=4``.

The durable tier. One row per key::

    key text PRIMARY KEY, payload bytea NULL (NULL: a tombstone), version bigint,
    expires_at timestamptz  -- indexed, for the sweep
    tags text[]             -- the entry's tags (TierWrite.tags), GIN-indexed, for erasure

Postgres has no expiry of its own, so reads filter on ``expires_at > now()`` and a
background task deletes expired rows in bounded batches every ``sweep_interval`` seconds
(the ``expires_at`` + index + sweep design of Dapr's ``state/postgresql/v2``). A batch read is
one ``key = ANY($1)`` query; a batch write is one multi-row upsert whose ``ON CONFLICT ...
WHERE`` refuses to replace a live row of a higher version, atomically under the row lock.

The table is created on the first successful connection, not in ``start()``, so the sidecar
starts while Postgres is down. Several sidecars starting at once serialise the DDL on an
advisory lock (concurrent ``CREATE TABLE IF NOT EXISTS`` can otherwise fail on a unique
violation in the catalog). A table of an earlier version, without ``tags``, gets the column
and its index then (``ALTER TABLE ... ADD COLUMN IF NOT EXISTS``: with a constant default,
no rewrite of the rows).

Erasure (``erases``): ``erase`` deletes the rows of the given keys or tags physically, in one
statement that the primary key and the GIN index answer; ``keys_with_tag`` lists a tag's
live keys a page at a time.

Options: ``table`` (a lowercase identifier), ``pool_size`` (default 4), ``sweep_interval``
(seconds, default 60), ``connect_timeout`` (seconds, default 2); the libpq-style options that
asyncpg understands (``sslmode``, ``application_name``, ...) are passed on to it.

Driver exceptions, mapped once in ``_mapped``::

    TimeoutError, QueryCanceledError                  -> TierTimeout
    OSError (refused, reset), InterfaceError,         -> TierUnavailable
    PostgresConnectionError (ConnectionDoesNotExist),
    CannotConnectNow/AdminShutdown/CrashShutdown,
    TooManyConnections
    any other asyncpg error                           -> TierError
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar
from urllib.parse import SplitResult, parse_qsl

import asyncpg
import asyncpg.pool

from tiers.base import (
    Marker,
    Payload,
    Tier,
    TierError,
    TierTimeout,
    TierUnavailable,
    TierWrite,
    driver_url,
    url_options,
)

log = logging.getLogger(__name__)

_OWN_OPTIONS: dict[str, type] = {
    "table": str,
    "pool_size": int,
    "sweep_interval": float,
    "connect_timeout": float,
}
# The DSN query parameters asyncpg reads itself (asyncpg.connect_utils). asyncpg would send
# any other one to the server as a setting, so a typo would only fail at the first connect.
_DRIVER_OPTIONS: dict[str, type] = dict.fromkeys(
    [
        "host",
        "port",
        "user",
        "password",
        "passfile",
        "dbname",
        "database",
        "service",
        "application_name",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "sslpassword",
        "sslnegotiation",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "target_session_attrs",
        "krbsrvname",
        "gsslib",
    ],
    str,
)
_DEFAULTS: dict[str, Any] = {
    "table": "cachesvc_entries",
    "pool_size": 4,
    "sweep_interval": 60.0,
    "connect_timeout": 2.0,
}
# Lowercase so that the quoted name is the one psql users type unquoted; short enough that
# "<table>_expires_at_idx" stays within Postgres' 63-byte identifiers.
_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_SWEEP_BATCH = 1000
_SWEEP_MAX_BATCHES = 100  # per sweep; the rest waits for the next one

_T = TypeVar("_T")
if TYPE_CHECKING:  # the proxy class is generic only in asyncpg-stubs
    _Conn: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

# Errors after which the same call is tried once more on a fresh connection: a pooled
# connection that a Postgres restart closed, or a table dropped under us.
_RETRY_ONCE = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    ConnectionResetError,
    BrokenPipeError,
    asyncpg.UndefinedTableError,
)


class PostgresTier(Tier):
    schemes = ("postgresql", "postgres")
    keeps_markers = True
    erases = True
    # A write is a commit (WAL flush), and the first call of a fresh pool connection pays
    # for the connect; both take longer than a network cache's round trip.
    default_timeout = 1.0

    def __init__(self, name: str, url: SplitResult, ttl: float) -> None:
        super().__init__(name, url, ttl)
        options = {**_DEFAULTS, **_own_options(url)}
        self.table: str = options["table"]
        self.pool_size: int = options["pool_size"]
        self.sweep_interval: float = options["sweep_interval"]
        self.connect_timeout: float = options["connect_timeout"]
        self._dsn = database_url(url)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._schema_ready = False
        self._schema_lock: asyncio.Lock | None = None
        self._calls: set[asyncio.Task[Any]] = set()

        table = f'"{self.table}"'
        markers = f'"{self.table}_markers"'
        tags_index = f'"{self.table}_tags_idx"'
        self._ddl = f"""
            CREATE TABLE IF NOT EXISTS {table} (
                key text PRIMARY KEY,
                payload bytea,
                version bigint NOT NULL,
                expires_at timestamptz NOT NULL,
                tags text[] NOT NULL DEFAULT '{{}}'
            );
            CREATE INDEX IF NOT EXISTS "{self.table}_expires_at_idx" ON {table} (expires_at);
            CREATE INDEX IF NOT EXISTS {tags_index} ON {table} USING gin (tags);
            CREATE TABLE IF NOT EXISTS {markers} (
                name text PRIMARY KEY,
                version bigint NOT NULL,
                expires_at timestamptz NOT NULL
            );
            CREATE INDEX IF NOT EXISTS "{self.table}_markers_version_idx" ON {markers} (version);
        """
        # Invalidation markers (cachesvc.markers): the newest version of each name, kept
        # while it could hide an entry; expired ones go with the sweep.
        self._sql_save_markers = f"""
            INSERT INTO {markers} AS m (name, version, expires_at)
            SELECT n, v, now() + $3 * interval '1 second'
            FROM unnest($1::text[], $2::int8[]) AS w(n, v)
            ON CONFLICT (name) DO UPDATE
            SET version = EXCLUDED.version, expires_at = EXCLUDED.expires_at
            WHERE m.version < EXCLUDED.version OR m.expires_at <= now()
        """
        # Whether both tables exist, and whether the entries have their tags column.
        self._sql_schema_state = f"""
            SELECT to_regclass('{table}') IS NOT NULL AND to_regclass('{markers}') IS NOT NULL,
                EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('{table}')
                    AND attname = 'tags' AND NOT attisdropped)
        """
        # A table created by an earlier version. Only run when the column is missing:
        # ALTER TABLE needs the table's ownership even when it changes nothing.
        self._migration = f"""
            ALTER TABLE {table} ADD COLUMN IF NOT EXISTS tags text[] NOT NULL DEFAULT '{{}}';
            CREATE INDEX IF NOT EXISTS {tags_index} ON {table} USING gin (tags);
        """
        self._sql_load_markers = (
            f"SELECT name, version FROM {markers} WHERE expires_at > now() AND version > $1"
        )
        self._sql_sweep_markers = f"DELETE FROM {markers} WHERE expires_at <= now()"
        self._sql_get = f"""
            SELECT key, payload FROM {table}
            WHERE key = ANY($1::text[]) AND expires_at > now()
        """
        # An expired row that the sweep has not reached yet protects nothing. Each row's
        # tags come as one JSON array (NULL: none): unnest flattens a two-dimensional
        # array, and the rows' tag lists differ in length.
        self._sql_set = f"""
            INSERT INTO {table} AS t (key, payload, version, expires_at, tags)
            SELECT w.key, w.payload, w.version, now() + w.ttl * interval '1 second',
                ARRAY(SELECT jsonb_array_elements_text(w.tags::jsonb))
            FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::float8[], $5::text[])
                AS w(key, payload, version, ttl, tags)
            ON CONFLICT (key) DO UPDATE
            SET payload = EXCLUDED.payload,
                version = EXCLUDED.version,
                expires_at = EXCLUDED.expires_at,
                tags = EXCLUDED.tags
            WHERE t.version <= EXCLUDED.version OR t.expires_at <= now()
        """
        # The primary key answers the keys, the GIN index the tags (a BitmapOr of both).
        self._sql_erase = f"""
            DELETE FROM {table} WHERE key = ANY($1::text[]) OR tags && $2::text[]
            RETURNING payload IS NOT NULL
        """
        self._sql_keys_with_tag = f"""
            SELECT key FROM {table}
            WHERE tags @> ARRAY[$1::text] AND payload IS NOT NULL AND expires_at > now()
                AND ($3::text IS NULL OR key > $3::text)
            ORDER BY key LIMIT $2
        """
        # SKIP LOCKED: sweeps of several sidecars share the work instead of queueing on it.
        self._sql_sweep = f"""
            DELETE FROM {table} WHERE key IN (
                SELECT key FROM {table} WHERE expires_at <= now()
                LIMIT $1 FOR UPDATE SKIP LOCKED
            )
        """

    @classmethod
    def validate_url(cls, url: SplitResult) -> None:
        _own_options(url)
        url.port  # noqa: B018 - raises ValueError for a port that is not a number in range
        if not url.hostname and "host" not in dict(parse_qsl(url.query)):
            raise ValueError(f"{url.scheme}:// needs a host, e.g. {url.scheme}://user@host/db")

    async def start(self) -> None:
        self._schema_lock = asyncio.Lock()
        # min_size=0: creating the pool opens no connection, so a Postgres that is down does
        # not stop the sidecar from starting; connections are made on demand.
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self.pool_size,
            timeout=self.connect_timeout,
            reset=_nothing_to_reset,
        )
        self._sweeper = asyncio.create_task(
            self._sweep_forever(), name=f"cachesvc-sweep-{self.name}"
        )

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]:
        if not keys:
            return []

        async def query(conn: _Conn) -> list[asyncpg.Record]:
            return await conn.fetch(self._sql_get, list(keys))

        found: dict[str, bytes | None] = {row[0]: row[1] for row in await self._run(query)}
        return [found.get(key) for key in keys]

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        latest: dict[str, TierWrite] = {}
        for write in writes:
            # Postgres refuses an upsert that touches a row twice: one write per key, the
            # highest version (the last of equal ones) winning.
            if write.key not in latest or write.version >= latest[write.key].version:
                latest[write.key] = write
        if not latest:
            return
        # Rows locked in the same order by every writer cannot deadlock.
        batch = [latest[key] for key in sorted(latest)]
        columns = (
            [w.key for w in batch],
            [w.payload for w in batch],
            [w.version for w in batch],
            [w.ttl for w in batch],
            [json.dumps(w.tags) if w.tags else None for w in batch],
        )

        async def upsert(conn: _Conn) -> None:
            await conn.execute(self._sql_set, *columns)

        await self._run(upsert)

    async def ping(self) -> None:
        async def select_one(conn: _Conn) -> None:
            await conn.fetchval("SELECT 1")

        await self._run(select_one)

    async def save_markers(self, markers: Sequence[Marker], ttl: float) -> None:
        newest: dict[str, int] = {}
        for name, version in markers:  # one row per name in one upsert
            newest[name] = max(version, newest.get(name, 0))
        if not newest:
            return
        names = sorted(newest)  # rows locked in one order by every writer

        async def upsert(conn: _Conn) -> None:
            await conn.execute(self._sql_save_markers, names, [newest[name] for name in names], ttl)

        await self._run(upsert)

    async def load_markers(self, newer_than: int = 0) -> list[Marker]:
        async def select(conn: _Conn) -> list[asyncpg.Record]:
            return await conn.fetch(self._sql_load_markers, newer_than)

        return [Marker(row[0], row[1]) for row in await self._run(select)]

    async def erase(self, keys: Sequence[str], tags: Sequence[str]) -> int:
        if not keys and not tags:
            return 0

        async def delete(conn: _Conn) -> list[asyncpg.Record]:
            return await conn.fetch(self._sql_erase, list(keys), list(tags))

        return sum(1 for row in await self._run(delete) if row[0])

    async def keys_with_tag(self, tag: str, limit: int, after: str | None = None) -> list[str]:
        async def select(conn: _Conn) -> list[asyncpg.Record]:
            return await conn.fetch(self._sql_keys_with_tag, tag, limit, after)

        return [row[0] for row in await self._run(select)]

    async def sweep(self) -> int:
        """Delete expired rows in bounded batches; returns how many went."""

        async def delete(conn: _Conn) -> str:
            return await conn.execute(self._sql_sweep, _SWEEP_BATCH)

        async def delete_markers(conn: _Conn) -> str:
            return await conn.execute(self._sql_sweep_markers)

        await self._run(delete_markers)
        total = 0
        for _ in range(_SWEEP_MAX_BATCHES):
            deleted = int((await self._run(delete)).rpartition(" ")[2])  # "DELETE <n>"
            total += deleted
            if deleted < _SWEEP_BATCH:
                break
        return total

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()  # a hung server must not hold up shutdown
        # Calls whose caller gave up end once their connection is closed.
        await asyncio.gather(*self._calls, return_exceptions=True)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                deleted = await self.sweep()
            except TierError as exc:  # down or slow: the next sweep catches up
                log.warning("postgres tier %r: expiry sweep failed: %s", self.name, exc)
            else:
                log.debug("postgres tier %r: swept %d expired rows", self.name, deleted)

    async def _run(self, operation: Callable[[_Conn], Awaitable[_T]]) -> _T:
        """Run ``operation`` on a pooled connection, creating the schema on first use."""
        if self._pool is None or self._schema_lock is None:
            raise TierError(f"postgres tier {self.name!r} is not started")
        # asyncpg gives a connection whose query was cancelled back to the pool only once the
        # server has confirmed the cancellation, and it shields that wait; so a caller's
        # timeout would wait for a hung server too. The call runs in its own task instead: a
        # cancelled caller leaves at once, the task cancels the query and returns the
        # connection whenever the server answers (or close() terminates it).
        task = asyncio.create_task(self._attempt(operation, self._pool, self._schema_lock))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def _attempt(
        self,
        operation: Callable[[_Conn], Awaitable[_T]],
        pool: asyncpg.Pool[asyncpg.Record],
        schema_lock: asyncio.Lock,
    ) -> _T:
        for attempt in (1, 2):
            with self._mapped(retrying=attempt == 1):
                async with pool.acquire() as conn:
                    if not self._schema_ready:
                        await self._create_schema(conn, schema_lock)
                    return await operation(conn)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _create_schema(self, conn: _Conn, lock: asyncio.Lock) -> None:
        async with lock:
            if self._schema_ready:
                return
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext($1))", f"cachesvc:ddl:{self.table}"
                )
                # CREATE TABLE IF NOT EXISTS needs CREATE on the schema even when the table
                # exists: tables an administrator created beforehand are used as they are.
                created, tagged = await self._schema_state(conn)
                if not created:
                    await conn.execute(self._ddl)  # the entries may be an earlier version's
                    created, tagged = await self._schema_state(conn)
                if not tagged:
                    await self._migrate(conn)
            self._schema_ready = True

    async def _schema_state(self, conn: _Conn) -> tuple[bool, bool]:
        state = await conn.fetchrow(self._sql_schema_state)
        assert state is not None  # a SELECT without FROM: one row
        return state[0], state[1]

    async def _migrate(self, conn: _Conn) -> None:
        log.info("postgres tier %r: adding the tags column to %s", self.name, self.table)
        try:
            await conn.execute(self._migration)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise TierError(
                f"postgres tier {self.name!r}: the table {self.table} lacks the tags column "
                f"that this version needs, and this role may not add it ({exc}); as the "
                f"table's owner, run: {' '.join(self._migration.split())}"
            ) from exc

    @contextlib.contextmanager
    def _mapped(self, *, retrying: bool) -> Iterator[None]:
        """Map driver errors; swallow a retryable one when another attempt follows."""
        try:
            yield
        except _RETRY_ONCE as exc:
            if isinstance(exc, asyncpg.UndefinedTableError):
                self._schema_ready = False  # dropped under us: create it again
            if not retrying:
                raise self._error(exc) from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> TierError:
        message = f"postgres tier {self.name!r}: {exc}"
        if isinstance(exc, (TimeoutError, asyncpg.QueryCanceledError)):
            return TierTimeout(message)
        if isinstance(
            exc,
            (
                OSError,
                asyncpg.InterfaceError,
                asyncpg.PostgresConnectionError,
                asyncpg.CannotConnectNowError,
                asyncpg.AdminShutdownError,
                asyncpg.CrashShutdownError,
                asyncpg.TooManyConnectionsError,
            ),
        ):
            return TierUnavailable(message)
        return TierError(message)


def database_url(url: SplitResult) -> str:
    """The tier's database, as a URL for another client of it (the audit trail): the tier's
    own options removed, those asyncpg reads kept."""
    return driver_url(url, _OWN_OPTIONS)


def _own_options(url: SplitResult) -> dict[str, Any]:
    options = url_options(url, {**_OWN_OPTIONS, **_DRIVER_OPTIONS})
    own = {name: options[name] for name in _OWN_OPTIONS if name in options}
    if "table" in own and not _TABLE_NAME.fullmatch(own["table"]):
        raise ValueError(
            f"option table={own['table']!r} must be a lowercase identifier "
            "(letters, digits, _; at most 48 characters)"
        )
    if own.get("pool_size", 1) <= 0:
        raise ValueError("option pool_size must be a positive integer")
    for name in ("sweep_interval", "connect_timeout"):
        if name in own and not own[name] > 0:
            raise ValueError(f"option {name} must be a positive number of seconds")
    return own


async def _nothing_to_reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """What the pool runs on a connection it takes back, after asyncpg's own clean-up (an
    open transaction rolled back). asyncpg's default adds a round trip per call
    (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) for session
    state this tier never creates: no SET, cursor, LISTEN or session-level lock (the DDL's
    advisory lock is transaction-scoped)."""
