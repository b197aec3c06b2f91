"""Invalidation events from a Redis Stream: a source no sidecar can miss an event of.

Each entry has one field, ``event``, holding the JSON event (``append`` writes them).

- Every sidecar applies every entry in its own process (``on_event``): it reads the stream
  with XREAD from its cursor, the id of the last entry it applied. The cursor is kept in
  the hash ``<stream>:cursors`` under the sidecar's identity, on the stream's own server,
  so it survives the sidecar's restart and is lost only together with the stream (a
  Redis restarted empty): a separate store could outlive the stream and point into a
  stream that no longer has those entries. The listener also keeps it in memory, which
  wins while the process lives.
- One sidecar per entry applies it to the shared tiers (``on_shared``): the consumer group
  ``cachesvc-appliers``, in which each sidecar is the consumer named by its identity,
  delivers each entry to one of them; it is acknowledged (XACK) after ``on_shared``
  returned. Entries left pending by a consumer that died are claimed (XAUTOCLAIM) by a
  live one after ``claim_idle`` seconds. Entries with an ``origin`` were applied to the
  shared tiers by the sidecar that appended them: they are acknowledged without
  ``on_shared``.
- Gaps: resuming from the cursor after a reconnect loses nothing, so the sink hears
  ``on_gap(lost=False)`` once the listener has caught up. Entries trimmed (or deleted)
  after the cursor before they were read are lost: the stream's ``max-deleted-entry-id``
  (Redis 7) is read in the same transaction as the entries, so any deletion past the
  cursor is seen, and the sink hears ``on_gap(lost=True)``. So does a sidecar with no
  cursor yet (it cannot know what it missed), and one whose stream was recreated (ids
  went backwards: a Redis restarted without its data).

A connection is read with short blocking reads (``block``) under a socket timeout of
``socket_timeout``, so a lost or hung server is noticed within about a second, and
redis-py's own retries are off: the listener's reconnect, which resumes from the cursor
and re-reads this consumer's pending entries, is the one retry mechanism.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from invalidation.base import Backoff, EventSink, Listener, SinkFailed, raise_if_cancelled
from invalidation.events import InvalidationEvent, MalformedEvent, parse_event
from tiers.redis_clients import RedisClient

log = logging.getLogger(__name__)

DEFAULT_GROUP = "cachesvc-appliers"
FIELD = b"event"

StreamId = tuple[int, int]  # (milliseconds, sequence), ordered as Redis orders entry ids
START: StreamId = (0, 0)
Entry = tuple[bytes, dict[bytes, bytes]]


# -- appending -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MaxLength:
    """Keep about this many entries (``XADD ... MAXLEN ~ n``)."""

    entries: int


@dataclass(frozen=True, slots=True)
class MaxAge:
    """Keep entries about this many seconds (``XADD ... MINID ~ <now - seconds>``)."""

    seconds: float


Trimming = MaxLength | MaxAge


async def append(
    client: RedisClient, stream: str, event: InvalidationEvent, trimming: Trimming
) -> bytes:
    """Append ``event`` to ``stream``, trimming old entries as ``trimming`` says; returns
    the new entry's id. Approximate trimming (``~``) removes whole radix-tree nodes, which
    is what makes it cheap: the stream keeps somewhat more than the bound."""
    fields: dict[Any, Any] = {FIELD: event.to_json()}
    if isinstance(trimming, MaxLength):
        entry_id = await client.xadd(stream, fields, maxlen=trimming.entries, approximate=True)
    else:
        # The sidecar's clock against the server's: skew only shifts the age bound.
        oldest_ms = int((time.time() - trimming.seconds) * 1000)
        entry_id = await client.xadd(stream, fields, minid=oldest_ms, approximate=True)
    return entry_id if isinstance(entry_id, bytes) else entry_id.encode()


# -- reading -------------------------------------------------------------------------------


def parse_id(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    milliseconds, _, sequence = text.partition("-")
    return int(milliseconds), int(sequence or 0)


def format_id(entry_id: StreamId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last entry a sidecar applied: its id, and how many entries had been appended to
    the stream up to it (which tells trimmed entries from ids that were never used).
    Stored as ``"<id> <number>"``."""

    id: StreamId
    number: int

    def __str__(self) -> str:
        return f"{format_id(self.id)} {self.number}"

    @classmethod
    def parse(cls, stored: bytes | str) -> Cursor | None:
        text = stored.decode() if isinstance(stored, bytes) else stored
        try:
            entry_id, number = text.split()
            return cls(parse_id(entry_id), int(number))
        except ValueError:
            return None  # not one of ours: start over, as without a cursor


class RedisStreamListener(Listener):
    """Reads ``stream`` on ``url`` as the sidecar named ``identity`` (stable across its
    restarts, unique among the sidecars: it names the cursor and the group consumer)."""

    picks_applier = True
    connection_errors = (RedisError, OSError, SinkFailed)

    def __init__(
        self,
        url: str,
        stream: str,
        identity: str,
        *,
        source: str = "redis-stream",
        group: str = DEFAULT_GROUP,
        batch: int = 100,
        block: float = 0.4,
        socket_timeout: float = 0.9,
        claim_idle: float = 2.0,
    ) -> None:
        super().__init__(url, stream)
        if not identity:
            raise ValueError("a stream listener needs the sidecar's identity")
        if block >= socket_timeout:
            raise ValueError("block must be shorter than socket_timeout")
        self.source = source
        self.stream = stream
        self.identity = identity
        self.group = group
        self.batch = batch
        self.block = block
        self.socket_timeout = socket_timeout
        self.claim_idle = claim_idle
        self.cursors_key = f"{stream}:cursors"
        self._cursor: Cursor | None = None
        self._told_deleted: StreamId = START
        self._claim_start = "0-0"
        self._next_claim = 0.0
        # Entries applied to the shared tiers whose acknowledgement may not have arrived.
        self._unacked: set[bytes] = set()
        # For ``lag``: the entry time (epoch s) of the newest applied entry while behind,
        # None while caught up; and when the listener was last caught up.
        self._behind_at: float | None = None
        self._caught_up_at = time.time()

    @property
    def lag(self) -> float:
        now = time.time()
        if self.state != "up":
            return max(0.0, now - self._caught_up_at)
        if self._behind_at is None:
            return 0.0
        return max(0.0, now - self._behind_at)

    async def listen(self, sink: EventSink, backoff: Backoff) -> None:
        client = redis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.socket_timeout,
            socket_timeout=self.socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            await self._follow(client, sink, backoff)
        finally:
            await client.aclose()

    async def _follow(self, client: redis.Redis, sink: EventSink, backoff: Backoff) -> None:
        await self._join_group(client)
        lost = await self._resume_cursor(client)
        self.state = "up"
        backoff.reset()
        # Told once caught up: before that, the events published meanwhile are not applied.
        gap: bool | None = lost
        await self._apply_own_pending(client, sink)
        while True:
            raise_if_cancelled()
            entries, info = await self._read(client)
            if self._lost_entries(info):
                if gap is None:
                    await sink.on_gap(self.source, lost=True)
                else:
                    gap = True
            await self._broadcast(client, entries, info, sink)
            await self._apply_shared(client, sink)
            if len(entries) == self.batch:
                continue  # more are waiting
            self._behind_at = None
            self._caught_up_at = time.time()
            if gap is not None:
                await sink.on_gap(self.source, lost=gap)
                gap = None
            await self._wait_for_entries(client)

    # -- the cursor and the broadcast read

    async def _resume_cursor(self, client: redis.Redis) -> bool:
        """Where to read from; True when events may have been missed before it."""
        if self._cursor is None:
            stored = await client.hget(self.cursors_key, self.identity)
            self._cursor = Cursor.parse(stored) if stored is not None else None
        if self._cursor is not None:
            return False  # the read's checks find what was trimmed or recreated since
        # Never ran (or its cursor went with the stream): start at the end, knowing nothing.
        info = await client.xinfo_stream(self.stream)
        self._cursor = Cursor(parse_id(info["last-generated-id"]), _appended(info))
        # Stored now, so that what is appended before its first entry is not missed.
        await client.hset(self.cursors_key, self.identity, str(self._cursor))
        log.info("stream %s: %s starts at its end", self.stream, self.identity)
        return True

    async def _read(self, client: redis.Redis) -> tuple[list[Entry], dict[str, Any] | None]:
        """The next entries after the cursor and the stream's state, read in one MULTI so
        that no trimming can slip between them unseen."""
        assert self._cursor is not None
        async with client.pipeline(transaction=True) as pipe:
            pipe.xread({self.stream: format_id(self._cursor.id)}, count=self.batch)
            pipe.xinfo_stream(self.stream)
            replies = await pipe.execute(raise_on_error=False)
        read, info = replies
        if isinstance(read, Exception):
            raise read
        if isinstance(info, ResponseError):
            info = None  # deleted since we joined the group: the next read recreates it
        elif isinstance(info, Exception):
            raise info
        return _entries(read), info

    def _lost_entries(self, info: dict[str, Any] | None) -> bool:
        """Whether entries after the cursor went before they were read; moves the cursor
        past them (to the start, for a recreated stream) so each loss is told once.

        XTRIM does not move ``max-deleted-entry-id`` (only XDEL does), so trimming is found
        by counting: the cursor knows how many entries had been appended up to it; the
        stream's first entry is entry number ``entries-added - length + 1``. When that is
        past the cursor's successor, entries in between were trimmed unread.
        """
        cursor = self._cursor
        assert cursor is not None
        if info is None or parse_id(info["last-generated-id"]) < cursor.id:
            self._cursor = Cursor(START, 0)
            if cursor.id == START:
                return False
            log.warning("stream %s was recreated: events may have been lost", self.stream)
            return True
        deleted = info.get("max-deleted-entry-id")
        deleted_id = START if deleted is None else parse_id(deleted)
        if deleted_id > cursor.id and deleted_id > self._told_deleted:
            # XDEL by someone: entries after the cursor may be gone. Said once per XDEL'd id.
            self._told_deleted = deleted_id
            log.warning("stream %s: entries after the cursor were deleted", self.stream)
            return True
        first = info.get("first-entry")
        appended = _appended(info)
        if first is not None and parse_id(first[0]) <= cursor.id:
            return False  # the cursor's successor, if any, is still there
        first_number = appended - int(info["length"]) + 1
        if first_number <= cursor.number + 1:
            return False
        log.warning(
            "stream %s: %d entries were trimmed before %s read them",
            self.stream,
            first_number - cursor.number - 1,
            self.identity,
        )
        self._cursor = Cursor(cursor.id, first_number - 1)
        return True

    async def _broadcast(
        self,
        client: redis.Redis,
        entries: list[Entry],
        info: dict[str, Any] | None,
        sink: EventSink,
    ) -> None:
        if not entries:
            return
        cursor = self._cursor
        assert cursor is not None
        try:
            for entry_id, fields in entries:
                event = self._parse(fields, sink)
                if event is not None:
                    await sink.on_event(event, self.source)
                cursor = Cursor(parse_id(entry_id), cursor.number + 1)
        except Exception as exc:
            raise SinkFailed(f"applying a stream entry failed: {exc!r}") from exc
        finally:
            if cursor is not self._cursor:
                if info is not None and cursor.id == parse_id(info["last-generated-id"]):
                    # The newest entry: its number is exact even after XDELs in between.
                    cursor = Cursor(cursor.id, _appended(info))
                self._cursor = cursor
                self._behind_at = cursor.id[0] / 1000
                await client.hset(self.cursors_key, self.identity, str(cursor))

    async def _wait_for_entries(self, client: redis.Redis) -> None:
        """Block until an entry follows the cursor, or ``block`` seconds passed."""
        assert self._cursor is not None
        await client.xread(
            {self.stream: format_id(self._cursor.id)}, count=1, block=int(self.block * 1000)
        )

    # -- the consumer group: one applier per entry for the shared tiers

    async def _join_group(self, client: redis.Redis) -> None:
        # From the stream's first entry: an event appended before any sidecar created the
        # group must reach the shared tiers too (applying an invalidation twice is harmless).
        try:
            await client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise  # several sidecars starting at once: one creates it, none fails

    async def _apply_own_pending(self, client: redis.Redis, sink: EventSink) -> None:
        """Entries delivered to this consumer before it restarted or reconnected, and never
        acknowledged."""
        after = "0"
        while True:
            reply = await client.xreadgroup(
                self.group, self.identity, {self.stream: after}, count=self.batch
            )
            entries = _entries(reply)
            if not entries:
                # The rest were claimed by other consumers meanwhile: theirs now.
                self._unacked.clear()
                return
            await self._share(client, entries, sink)
            after = entries[-1][0].decode()

    async def _apply_shared(self, client: redis.Redis, sink: EventSink) -> None:
        reply = await client.xreadgroup(
            self.group, self.identity, {self.stream: ">"}, count=self.batch
        )
        await self._share(client, _entries(reply), sink)
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.claim_idle / 2
            await self._claim_abandoned(client, sink)

    async def _claim_abandoned(self, client: redis.Redis, sink: EventSink) -> None:
        """Take over entries another consumer (a sidecar that died, or this one before its
        restart under the same identity) left unacknowledged for ``claim_idle`` seconds."""
        reply = await client.xautoclaim(
            self.stream,
            self.group,
            self.identity,
            min_idle_time=int(self.claim_idle * 1000),
            start_id=self._claim_start,
            count=self.batch,
        )
        next_start, claimed = reply[0], reply[1]
        self._claim_start = next_start.decode() if isinstance(next_start, bytes) else next_start
        if len(reply) > 2 and reply[2]:
            # Redis 7 drops them from the pending list: trimmed before anyone applied them.
            log.warning(
                "stream %s: %d entries were trimmed before the shared tiers applied them",
                self.stream,
                len(reply[2]),
            )
        await self._share(client, claimed, sink)

    async def _share(self, client: redis.Redis, entries: Sequence[Entry], sink: EventSink) -> None:
        done: list[bytes] = []
        try:
            for entry_id, fields in entries:
                # Deleted entries and malformed ones (reported by the broadcast read) are
                # acknowledged as they are: there is nothing to apply.
                event = self._parse(fields, None) if fields else None
                if event is not None and event.origin is None and entry_id not in self._unacked:
                    await sink.on_shared(event, self.source)
                done.append(entry_id)
        except Exception as exc:
            raise SinkFailed(
                f"applying a stream entry to the shared tiers failed: {exc!r}"
            ) from exc
        finally:
            if done:
                # Remembered until acknowledged, so an acknowledgement lost with the
                # connection does not apply them again when they are read back.
                self._unacked.update(done)
                await client.xack(self.stream, self.group, *done)
                self._unacked.difference_update(done)

    def _parse(
        self, fields: dict[bytes, bytes], sink: EventSink | None
    ) -> InvalidationEvent | None:
        raw = fields.get(FIELD)
        try:
            if raw is None:
                raise MalformedEvent(f"no field {FIELD.decode()!r}")
            return parse_event(raw)
        except MalformedEvent as exc:
            if sink is not None:
                sink.on_malformed(raw if raw is not None else repr(fields), exc, self.source)
            return None


def _entries(reply: Any) -> list[Entry]:
    """The entries of a one-stream XREAD/XREADGROUP reply (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
    for entries in streams:
        # RESP3 replies wrap the list once more (redis-py's parse_xread_resp3).
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        return [(entry_id, fields or {}) for entry_id, fields in entries]
    return []


def _appended(info: dict[str, Any]) -> int:
    """How many entries were ever appended to the stream (Redis 7's ``entries-added``)."""
    appended = info.get("entries-added")
    if appended is None:
        raise RedisError("the stream source needs Redis 7 or newer (XINFO STREAM entries-added)")
    return int(appended)
