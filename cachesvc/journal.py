"""The write-behind journal: a Redis Stream with a consumer group.

Why a stream in Redis, not a local file or a Postgres outbox: the journal must stay
writable while the lower tiers (Postgres) are down, and must outlive the *pod*, not only
the process: a sidecar deleted during an outage leaves its pending writes to its peers,
which claim them (XAUTOCLAIM) once they have been idle for ``reclaim_after`` seconds.

Life of a write-behind write:

1. ``append``: XADD (coalesced: one pipeline per event-loop iteration). The PUT is
   answered 202 only after Redis confirmed it (and the top tier took the value).
2. The flusher reads a batch (XREADGROUP), keeps only the newest version of each key,
   and applies it to the lower tiers (one ``set_many`` per tier). Versions make replays
   and reorderings harmless: a tier never replaces a newer version.
3. Only after the durable tier committed: XACK + XDEL.

Which crash loses what:

- sidecar killed (``kill -9``): nothing; unacknowledged entries stay in its pending list,
  re-read by the same consumer name when it restarts, or claimed by a peer.
- lower tier down: nothing; entries stay pending and are retried with backoff and jitter.
  The journal answers 503 once ``journal_max_pending`` entries wait (back-pressure).
- journal Redis crash: nothing, on a journal that persists every write — ``appendonly yes``
  with ``appendfsync always``, which the journal checks (``CONFIG GET``) at start and every
  ``DURABILITY_CHECK_INTERVAL`` seconds. On any other journal write-behind answers 503
  naming the journal and the fix, unless the operator accepted the loss with
  ``[write] volatile_journal = true`` (then ``/readyz`` and ``cachesvc_journal_durable``
  say so).

Entries that can never be applied (undecodable, or refused by the durable tier
``max_attempts`` times with a non-transient error) move to ``<stream>:dead``, where
``cachesvc dead-letters [--replay]`` shows and re-queues them.

Erasure (``erase``) removes the entries of given keys or tags from both streams. An entry
holds only its key and its payload, and a stream has no index but its ids, so that is a
scan of both streams (XRANGE, ``ERASE_SCAN_BATCH`` entries a round trip, payloads included:
the tags are in the envelope) and an XDEL of what matches. The journal is short while the
lower tiers keep up; at most ``journal_max_pending`` entries are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from redis.exceptions import RedisClusterException, RedisError, ResponseError

from cachesvc.envelope import Entry, decode_envelope
from cachesvc.heap import release_free_memory
from cachesvc.metrics import Metrics
from cachesvc.slot import Batcher, Deadlines, failed_future
from invalidation.base import Backoff
from tiers.base import TierError, TierTimeout, TierUnavailable
from tiers.redis_clients import create_client, hash_tag, is_cluster_url, parse_redis_url
from tiers.resp import RespClient

log = logging.getLogger(__name__)
T = TypeVar("T")

GROUP = "cachesvc-flushers"
DURABILITY_CHECK_INTERVAL = 10.0
# The flusher re-reads its own pending entries this often: one whose read reply was lost
# (a reset connection) is delivered to it and to nobody else until then.
OWN_PENDING_INTERVAL = 1.0
# The longest one read of an idle flusher waits for new entries (XREADGROUP BLOCK): each
# turn is three round trips (the depth, its own pending entries, the read), where an idle
# sidecar's CPU went. A stop cuts the wait short.
IDLE_WAIT = 1.0
# How long an append waits for the replicas' acknowledgement (WAIT) before it fails.
WAIT_MILLISECONDS = 1000
# What a Redis or a Redis Cluster client raises (a cluster's own errors are not RedisErrors).
REDIS_ERRORS = (RedisError, RedisClusterException)
CALL_TIMEOUT = 2.0  # seconds: the longest a journal call waits for Redis' answer
TRIM_INTERVAL = 5.0  # seconds: the least time between two gives of free memory back
ERASE_SCAN_BATCH = 1000


class JournalUnavailable(Exception):
    """The journal could not record a write (Redis down) or is full."""


class Record(NamedTuple):
    id: bytes
    key: str
    payload: bytes
    entry: Entry


Apply = Callable[[Sequence[Record]], Awaitable[None]]


class JournalErasure(NamedTuple):
    entries: int  # removed from the journal and its dead letters
    keys: frozenset[str]  # the keys they were writes of


class Journal:
    def __init__(
        self,
        url: str,
        stream: str,
        *,
        max_pending: int,
        batch: int,
        reclaim_after: float,
        interval: float = 0.0,
        max_attempts: int,
        metrics: Metrics,
        consumer: str,
        volatile: bool = False,
        replicas: int | None = None,
    ) -> None:
        # On a cluster the stream and its dead letters share a slot: replaying moves
        # entries between them in one transaction.
        self.stream = hash_tag(stream) if is_cluster_url(url) else stream
        self.dead_stream = f"{self.stream}:dead"
        self.max_pending = max_pending
        self.batch = batch
        self.interval = interval
        # Whether the last read took every entry there was (fewer than ``batch``, counted
        # before deleted or undecodable ones are dropped): then writes may gather.
        self._took_all = True
        self.reclaim_after = reclaim_after
        self.max_attempts = max_attempts
        self.consumer = consumer
        self.volatile = volatile  # the operator accepts a journal that may lose writes
        # Whether the journal's Redis persists every write; None until checked.
        self.durable: bool | None = None
        self._durability_checked = 0.0
        # Replicas that must have an entry before its write is acknowledged (WAIT): the
        # configured number, or (None) one when the master has a replica at all.
        self.replicas_configured = replicas
        self.replicas = replicas or 0
        self._client = create_client(url, socket_timeout=CALL_TIMEOUT)
        # Appends, the write path's part, go to a single server through tiers/resp.py's
        # lean pipelined client (the Redis tier's); Sentinel and Cluster through redis-py.
        target = parse_redis_url(url)
        self._server = target if target.kind == "server" else None
        # By whether it waits for replicas: see ``_appender``.
        self._appenders: dict[bool, RespClient] = {}
        self._closed = False
        self._appends: Batcher[tuple[str, bytes], bytes] = Batcher(
            self._append_batch, finish=self._appended
        )
        # Bounds every append batch, with one timer for all of them (as a tier's slot).
        self._append_deadlines = Deadlines(
            CALL_TIMEOUT, lambda: TierTimeout(f"no answer within {CALL_TIMEOUT} s")
        )
        # Back-pressure counts the stream exactly, appends racing a count included: a
        # count (XLEN with the newest ID, atomically) holds every append whose ID is not
        # after that newest ID; appends finished since it was asked for and not covered
        # are added, and appends under way are counted until they finish.
        self._depth = 0
        self._counted_up_to = b"0-0"
        self._appending = 0
        self._appended_since_count: list[bytes] = []
        self._last_appended = b"0-0"
        # Every entry this process appended up to this id was in the stream when it was
        # last counted, unless applied (and deleted) before: see ``applied``.
        self._seen_up_to = b"0-0"
        self._group_ready = False
        self._attempts: dict[bytes, int] = {}
        series = metrics.for_journal()
        self.m_depth = series.depth
        self.m_lag = series.lag
        self.m_flushed = series.flushed
        self.m_retried = series.retried
        self.m_dead = series.dead_lettered
        self.m_durable = series.durable

    # -- producer side -------------------------------------------------------------------

    def has_room(self, count: int) -> bool:
        return self._depth + self._appending + count <= self.max_pending

    def refusal(self) -> str | None:
        """Why write-behind must not be acknowledged on this journal, if it must not."""
        if self.volatile or self.durable:
            return None
        if self.durable is None:
            return (
                "the write-behind journal's durability is not known yet (its Redis is unreachable)"
            )
        return (
            "the write-behind journal's Redis does not persist every write (it needs "
            "appendonly yes and appendfsync always): a crash would lose acknowledged "
            "writes. Fix its persistence, write through, or accept the loss with "
            "[write] volatile_journal = true"
        )

    async def check_durability(self) -> None:
        """Whether an acknowledged entry survives the journal Redis's crash: it persists
        every write (appendonly yes, appendfsync always), or replicas acknowledge every
        entry before its write is (WAIT; on a replicated journal a failover then loses
        nothing either)."""
        replication: dict[str, Any] = await self._client.info("replication")
        if self.replicas_configured is None:
            self.replicas = 1 if int(replication.get("connected_slaves", 0)) else 0
        try:
            config = await self._client.config_get("append*")
        except ResponseError as exc:  # CONFIG disabled (a managed Redis): cannot tell
            log.warning("cannot read the journal Redis's persistence settings: %s", exc)
            persists = False
        else:
            settings = {_text(name): _text(value) for name, value in config.items()}
            persists = (
                settings.get("appendonly") == "yes" and settings.get("appendfsync") == "always"
            )
        self.durable = persists or self.replicas > 0
        self._durability_checked = time.monotonic()
        self.m_durable.set(1 if self.durable else 0)

    def applied(self, entry_id: bytes) -> bool:
        """Whether the entry ``entry_id`` (appended by this process) has been applied to
        the lower tiers, by this sidecar or a peer: it was appended before the depth was
        last counted, and the stream's oldest entry is now past it (or the stream was
        empty)."""
        return not _id_after(entry_id, self._seen_up_to) and (
            self._oldest_id is None or _id_after(self._oldest_id, entry_id)
        )

    async def still_pending(self, entry_ids: Sequence[bytes]) -> set[bytes]:
        """Which of ``entry_ids`` are still in the stream: not applied yet, by anyone (an
        applied entry is deleted). Exact, where ``applied`` only knows the stream's oldest
        entry: an older entry a dead peer holds keeps that one old for ``reclaim_after``."""
        if not entry_ids:
            return set()
        async with self._client.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xrange(self.stream, entry_id, entry_id, count=1)
            found: list[Any] = await pipe.execute()
        return {entry_id for entry_id, entries in zip(entry_ids, found, strict=True) if entries}

    def append(self, key: str, payload: bytes) -> asyncio.Future[bytes]:
        """Record a write durably: a future of its entry id, failing with
        JournalUnavailable. (A future, not a coroutine: appending runs no task.)"""
        if not self.has_room(1):
            return failed_future(JournalUnavailable(f"journal full ({self._depth} pending writes)"))
        self._appending += 1
        recorded = self._appends.submit((key, payload))
        # Registered first, so it runs before the caller learns of the entry.
        recorded.add_done_callback(self._recorded)
        return recorded

    def _recorded(self, recorded: asyncio.Future[bytes]) -> None:
        self._appending -= 1
        if recorded.cancelled() or recorded.exception() is not None:
            return
        entry_id = recorded.result()
        self._appended_since_count.append(entry_id)
        if _id_after(entry_id, self._counted_up_to):
            self._depth += 1
        if _id_after(entry_id, self._last_appended):
            self._last_appended = entry_id

    def _append_batch(self, items: list[tuple[str, bytes]]) -> asyncio.Future[list[Any]]:
        """The XADDs of ``items`` (and the WAIT for the replicas), sent: through the lean
        client once the group exists, a call completed from its read callback, so an
        append costs no task; else as a task (the first append, Sentinel, Cluster).
        ``_appended`` makes the entry ids of the replies."""
        sent: asyncio.Future[list[Any]]
        appender = self._appender()
        if self._group_ready and appender is not None:
            sent = appender.pipeline(self._append_commands(items))
        else:
            sent = asyncio.ensure_future(self._append_first(items))
        self._append_deadlines.watch(sent.get_loop(), sent)
        return sent

    def _append_commands(self, items: list[tuple[str, bytes]]) -> list[tuple[Any, ...]]:
        commands: list[tuple[Any, ...]] = [
            ("XADD", self.stream, "*", "k", key, "p", payload) for key, payload in items
        ]
        if self.replicas:
            # WAIT counts the writes of its own connection: in the same request.
            commands.append(("WAIT", self.replicas, WAIT_MILLISECONDS))
        return commands

    async def _append_first(self, items: list[tuple[str, bytes]]) -> list[Any]:
        await self._ensure_group()
        appender = self._appender()
        if appender is not None:
            return await appender.pipeline(self._append_commands(items))
        async with self._client.pipeline(transaction=False) as pipe:
            for key, payload in items:
                pipe.xadd(self.stream, {b"k": key.encode(), b"p": payload})
            if self.replicas:
                # WAIT counts the writes of its own connection: in the same pipeline.
                pipe.execute_command("WAIT", self.replicas, WAIT_MILLISECONDS)
            return list(await pipe.execute())

    def _appended(
        self, items: list[tuple[str, bytes]], sent: asyncio.Future[list[Any]]
    ) -> list[bytes]:
        """The entry ids of an append batch (done), or JournalUnavailable for all."""
        try:
            self._append_deadlines.done(sent)  # raises the TierTimeout of one given up
            results = sent.result()
            for result in results:
                if isinstance(result, TierError):  # an error reply
                    raise result
            if len(results) > len(items):  # a WAIT was sent with them
                acknowledged = results.pop()
                if acknowledged < self.replicas:
                    raise JournalUnavailable(
                        f"{acknowledged} of the {self.replicas} replicas "
                        "[write].journal_replicas asks for took the entries within "
                        f"{WAIT_MILLISECONDS} ms"
                    )
        except (*REDIS_ERRORS, TierError, JournalUnavailable) as exc:
            raise JournalUnavailable(f"journal did not record the write: {exc}") from exc
        return results

    def _appender(self) -> RespClient | None:
        """The lean client for appends (None: redis-py's, on Sentinel and Cluster).

        The one a Redis tier on the same database uses too, so that a write-behind
        write's top-tier write and append go to Redis in one request
        (``RespClient.for_server``). While replicas must acknowledge the entries, one of
        its own: a WAIT holds up its connection until they do, and reads must not queue
        behind it."""
        if self._server is None or self._closed:
            return None
        waits = self.replicas > 0
        appender = self._appenders.get(waits)
        if appender is None:
            appender = RespClient.for_server(self._server, shared=not waits)
            self._appenders[waits] = appender
        return appender

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # -- consumer side -------------------------------------------------------------------

    async def run(self, apply: Apply, stop: asyncio.Event) -> None:
        """Flush until ``stop`` is set and nothing of ours is pending (or cancelled)."""
        backoff = Backoff()
        own_pending = True  # first our own unacknowledged entries (after a crash or retry)
        last_reclaim = last_own = last_trim = 0.0
        flushed = False  # since the memory was last given back
        while True:
            try:
                await self._ensure_group()
                await self._refresh_depth()
                now = time.monotonic()
                if now - self._durability_checked > DURABILITY_CHECK_INTERVAL:
                    await self.check_durability()
                if now - last_own > OWN_PENDING_INTERVAL:
                    own_pending, last_own = True, now
                records = []
                if own_pending:
                    records = await self._read("0", block=None)
                    own_pending = bool(records)
                # Not only on turns without the look at our own entries: an idle turn
                # takes IDLE_WAIT, and every one of them looks.
                if not records and time.monotonic() - last_reclaim > self.reclaim_after / 2:
                    last_reclaim = time.monotonic()
                    records = await self._reclaim()
                if not records and not own_pending:
                    if stop.is_set() and self.drained():
                        return
                    if stop.is_set():
                        records = await self._read(">", block=None)
                        if not records:
                            await asyncio.sleep(0.05)  # what is left is a peer's to apply
                    else:
                        new = await self._read_new_unless(stop)
                        own_pending = new is None  # handed entries, maybe, and gave up
                        records = new or []
                    if not records and flushed and now - last_trim > TRIM_INTERVAL:
                        flushed, last_trim = False, now
                        release_free_memory()
            except REDIS_ERRORS as exc:
                if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
                    self._group_ready = False  # created again on the next round
                    log.error(
                        "the journal's stream %s was deleted (FLUSHDB/FLUSHALL, or Redis "
                        "restarted without persistence?); recreating it. Write-behind writes "
                        "it held and not yet applied to the lower tiers are lost",
                        self.stream,
                    )
                else:
                    log.warning("journal unreachable: %s", exc)
                await backoff.sleep()
                continue
            if not records:
                continue
            try:
                await self._flush(records, apply)
            except TierError as exc:
                self.m_retried.inc(len(records))
                log.warning(
                    "write-behind flush of %d writes will be retried: %s", len(records), exc
                )
                own_pending = True
                await backoff.sleep()
            except REDIS_ERRORS as exc:
                log.warning("journal unreachable while acknowledging: %s", exc)
                own_pending = True
                await backoff.sleep()
            except Exception:  # the flusher must outlive any surprise: PUTs still get 202
                log.exception("write-behind flush failed; retrying")
                own_pending = True
                await backoff.sleep()
            else:
                backoff.reset()
                flushed = True
                if self._took_all and not stop.is_set():
                    await self._gather(stop)

    async def _gather(self, stop: asyncio.Event) -> None:
        """Let writes gather for ``interval`` after a round that took all there was, or
        until ``stop`` (the drain does not wait)."""
        if self.interval > 0:
            await _unless_stopped(stop, asyncio.sleep(self.interval))

    def drained(self) -> bool:
        """Whether everything this process appended has been applied (by anyone)."""
        return self._oldest_id is None or _id_after(self._oldest_id, self._last_appended)

    async def _refresh_depth(self) -> None:
        self._appended_since_count = []
        appended = self._last_appended  # answered before the count is sent
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xlen(self.stream)
            pipe.xrange(self.stream, "-", "+", count=1)
            pipe.xrevrange(self.stream, "+", "-", count=1)
            depth, oldest, newest = await pipe.execute()
        self._counted_up_to = newest[0][0] if newest else b"0-0"
        # An empty stream counts up to nothing, yet every entry appended before it was
        # counted is gone: applied.
        self._seen_up_to = max(self._counted_up_to, appended, key=_id_tuple)
        self._depth = depth + sum(
            _id_after(entry_id, self._counted_up_to) for entry_id in self._appended_since_count
        )
        self._oldest_id = oldest[0][0] if oldest else None
        self.m_depth.set(depth)
        self.m_lag.set(0.0 if not oldest else max(0.0, time.time() - _id_time(oldest[0][0])))

    _oldest_id: bytes | None = None

    async def _read(self, start: str, block: int | None) -> list[Record]:
        return await self._records(await self._read_reply(start, block))

    def _read_reply(self, start: str, block: int | None) -> Awaitable[Any]:
        return self._client.xreadgroup(
            GROUP, self.consumer, {self.stream: start}, count=self.batch, block=block
        )

    async def _records(self, reply: Any) -> list[Record]:
        """The records of an XREADGROUP reply."""
        return await self._took(reply[0][1] if reply else [])

    async def _took(
        self, entries: Sequence[tuple[bytes, dict[bytes, bytes] | None]]
    ) -> list[Record]:
        """The records of entries a read took, noting whether it took all there was."""
        self._took_all = len(entries) < self.batch
        return await self._decode(entries)

    async def _read_new_unless(self, stop: asyncio.Event) -> list[Record] | None:
        """Entries not delivered yet, waited for up to ``IDLE_WAIT``; None once ``stop``
        came first. The read given up then closes its connection: entries Redis handed it
        meanwhile stay pending for this consumer, read again as its own. (Only the read
        is given up, never the decoding, which may dead-letter an entry.)"""
        read = await _unless_stopped(stop, self._read_reply(">", int(IDLE_WAIT * 1000)))
        return None if read is None else await self._records(read.result())

    async def _reclaim(self) -> list[Record]:
        """Entries a crashed (or stuck) peer took and never acknowledged."""
        reply = await self._client.xautoclaim(
            self.stream, GROUP, self.consumer, int(self.reclaim_after * 1000), count=self.batch
        )
        records = await self._took(reply[1])
        if records:
            log.info("reclaimed %d write-behind entries from idle consumers", len(records))
        return records

    async def _decode(
        self, entries: Sequence[tuple[bytes, dict[bytes, bytes] | None]]
    ) -> list[Record]:
        records: list[Record] = []
        broken: list[tuple[bytes, dict[bytes, bytes] | None, str]] = []
        for entry_id, fields in entries:
            if not fields:  # deleted after delivery: nothing left to apply
                await self._ack([entry_id])
                continue
            try:
                key = fields[b"k"].decode()
                payload = fields[b"p"]
                records.append(Record(entry_id, key, payload, decode_envelope(payload)))
            except (KeyError, ValueError) as exc:
                broken.append((entry_id, fields, f"undecodable: {exc}"))
        if broken:
            await self._dead_letter(broken)
        return records

    async def _flush(self, records: Sequence[Record], apply: Apply) -> None:
        try:
            await apply(records)
        except (TierUnavailable, TierTimeout):
            raise
        except TierError as exc:
            # Refused, not unreachable: try each on its own so one bad entry cannot block
            # the rest, and give up on those that keep failing.
            await self._flush_one_by_one(records, apply, exc)
            return
        await self._ack([record.id for record in records])
        self.m_flushed.inc(len(records))

    async def _flush_one_by_one(
        self, records: Sequence[Record], apply: Apply, first: TierError
    ) -> None:
        log.warning("write-behind batch refused (%s); applying one by one", first)
        for record in records:
            try:
                await apply([record])
            except (TierUnavailable, TierTimeout):
                raise
            except TierError as exc:
                attempts = self._attempts.get(record.id, 0) + 1
                self._attempts[record.id] = attempts
                if attempts < self.max_attempts:
                    self.m_retried.inc()
                    raise
                fields = {b"k": record.key.encode(), b"p": record.payload}
                await self._dead_letter([(record.id, fields, f"refused {attempts} times: {exc}")])
                continue
            await self._ack([record.id])
            self.m_flushed.inc()

    async def _ack(self, ids: Sequence[bytes]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()
        for entry_id in ids:
            self._attempts.pop(entry_id, None)

    async def _dead_letter(
        self, entries: Sequence[tuple[bytes, dict[bytes, bytes] | None, str]]
    ) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for entry_id, fields, reason in entries:
                dead = dict(fields or {})
                dead.update({b"reason": reason.encode(), b"journal_id": entry_id})
                pipe.xadd(self.dead_stream, dead)  # type: ignore[arg-type]
            await pipe.execute()
        await self._ack([entry_id for entry_id, _, _ in entries])
        self.m_dead.inc(len(entries))
        log.error("dead-lettered %d write-behind entries to %s", len(entries), self.dead_stream)

    # -- operator commands ---------------------------------------------------------------

    async def dead_letters(self, count: int = 100) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: Any = await self._client.xrange(self.dead_stream, "-", "+", count=count)
        return list(entries)

    async def replay_dead_letters(self) -> int:
        """Move every dead letter back into the journal; returns how many."""
        moved = 0
        while entries := await self.dead_letters(self.batch):
            async with self._client.pipeline(transaction=True) as pipe:
                for entry_id, fields in entries:
                    pipe.xadd(self.stream, {b"k": fields[b"k"], b"p": fields[b"p"]})
                    pipe.xdel(self.dead_stream, entry_id)
                await pipe.execute()
            moved += len(entries)
        return moved

    async def erase(self, keys: Iterable[str], tags: Iterable[str] = ()) -> JournalErasure:
        """Remove from the journal and its dead letters every entry whose key is one of
        ``keys`` or whose entry carries one of ``tags``.

        A flush that read such an entry before and applies it now still writes it to the
        lower tiers: the caller erases those after this (a retried flush does not: it
        re-reads its entries, and finds these deleted)."""
        wanted_keys, wanted_tags = set(keys), set(tags)
        if not wanted_keys and not wanted_tags:
            return JournalErasure(0, frozenset())
        removed = 0
        erased: set[str] = set()
        for stream in (self.stream, self.dead_stream):
            start = "-"
            while True:
                entries: Any = await self._client.xrange(stream, start, "+", count=ERASE_SCAN_BATCH)
                matching = []
                for entry_id, fields in entries:
                    key = fields.get(b"k", b"").decode(errors="replace")
                    if key in wanted_keys or _tagged(fields.get(b"p"), wanted_tags):
                        matching.append(entry_id)
                        erased.add(key)
                if matching:
                    async with self._client.pipeline(transaction=False) as pipe:
                        if stream == self.stream:  # nobody retries what is acknowledged
                            pipe.xack(stream, GROUP, *matching)
                        pipe.xdel(stream, *matching)
                        answers = await pipe.execute()
                    removed += answers[-1]
                if len(entries) < ERASE_SCAN_BATCH:
                    break
                start = "(" + entries[-1][0].decode()  # exclusive: after the last one read
        return JournalErasure(removed, frozenset(erased))

    async def close(self) -> None:
        await self._appends.close()
        self._append_deadlines.cancel()
        self._closed = True  # no appender is made after this: its share would stay taken
        appenders, self._appenders = self._appenders, {}
        for appender in appenders.values():
            await appender.aclose()
        await self._client.aclose()


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> asyncio.Future[T] | None:
    """``work``, done; or None once ``stop`` was set first: ``work`` is then cancelled, and
    what it raised on its way out is no one's."""
    doing = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((doing, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not doing.done():
            doing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await doing
    return None if doing.cancelled() else doing


def _tagged(payload: bytes | None, tags: set[str]) -> bool:
    """Whether the envelope ``payload`` carries one of ``tags`` (they are never sealed)."""
    if not tags or payload is None:
        return False
    try:
        return not tags.isdisjoint(decode_envelope(payload).tags)
    except ValueError:
        return False


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _id_time(entry_id: bytes) -> float:
    return int(entry_id.split(b"-", 1)[0]) / 1000


def _id_tuple(entry_id: bytes) -> tuple[int, int]:
    millis, _, seq = entry_id.partition(b"-")
    return int(millis), int(seq or 0)


def _id_after(candidate: bytes, reference: bytes) -> bool:
    return _id_tuple(candidate) > _id_tuple(reference)


async def drain(task: asyncio.Task[None], stop: asyncio.Event, within: float) -> bool:
    """Ask the flusher to finish what this process appended; True when it did in time."""
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), within)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    return True
