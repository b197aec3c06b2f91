"""The listener contract: a source of invalidation events that keeps itself connected.

A listener runs until cancelled, reconnecting with backoff, and tells its sink about
every event, every malformed message, and every (re)subscription: between losing a
subscription and regaining it, events may have been missed, so the sink must treat what
it cached before the gap as suspect (``on_gap``).

Three kinds of source, by who applies an event to which tiers:

- broadcast (Redis pub/sub, Postgres NOTIFY, the Redis Stream): every sidecar receives
  every event (``on_event``) and applies it in its own process;
- broadcast that also picks one applier (the Redis Stream's consumer group,
  ``picks_applier = True``): besides ``on_event`` everywhere, exactly one sidecar gets
  ``on_shared`` for the event and applies it to the shared tiers, so one external event
  costs the shared tiers one application whatever the number of sidecars;
- single reader (Postgres logical decoding): only one sidecar sees the event
  (``originate``) and must apply it everywhere and pass it on to its peers.

Durable sources (the stream, the replication slot) record their progress only after the
sink returned, so an event whose application was cut short is delivered again.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
from typing import Literal, Protocol

from invalidation.events import InvalidationEvent, MalformedEvent, parse_event

log = logging.getLogger(__name__)

State = Literal["connecting", "up", "down"]


class EventSink(Protocol):
    """What a listener tells. Each coroutine returns once the event is applied; a durable
    listener records its progress only after that, and delivers again what raised."""

    async def on_event(self, event: InvalidationEvent, source: str) -> None:
        """An event every sidecar receives: apply it in this process (in-process tiers,
        markers). Whether this call also applies it to the shared tiers is the sink's
        decision: a source whose listener ``picks_applier`` sends those in ``on_shared``."""

    async def on_shared(self, event: InvalidationEvent, source: str) -> None:
        """The source picked this sidecar, and no other, to apply ``event`` to the shared
        tiers (only from listeners with ``picks_applier``). Never for an event with an
        ``origin``: its publisher applied it to the shared tiers before publishing."""

    async def originate(self, event: InvalidationEvent, source: str) -> None:
        """Only this sidecar saw ``event`` (e.g. a change read from the write-ahead log):
        apply it to every tier and hand it to the peers. Returning means done; raising
        means not done: the listener delivers it again later."""

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None: ...

    async def on_gap(self, source: str, lost: bool = True) -> None:
        """Subscribed (again), or caught up after a reconnect. ``lost``: events published
        meanwhile may have been missed, so what the in-process tiers cached is suspect.
        ``lost=False``: a durable source resumed exactly where it left off and delivered
        everything published meanwhile (before this call), so they need no clearing."""

    def on_disconnect(self, source: str) -> None:
        """The subscription is lost: from now on events may be missed."""


class SinkFailed(Exception):
    """The sink raised while applying an event: a durable listener has not recorded it as
    applied, and handles this like a lost connection (reconnect, deliver it again)."""


class Listener(abc.ABC):
    source: str  # for metrics and logs: "redis" or "postgres"
    # Whether the source picks one sidecar per event for the shared tiers (``on_shared``).
    picks_applier: bool = False

    def __init__(self, url: str, channel: str, liveness_interval: float = 5.0) -> None:
        self.url = url
        self.channel = channel
        # A subscription silent for this long is checked; one that fails it is replaced.
        self.liveness_interval = liveness_interval
        self.state: State = "connecting"
        # Why the source cannot work as configured (a missing table, a server without
        # logical decoding), for readiness; None while nothing is known to be wrong.
        self.error: str | None = None

    @property
    def lag(self) -> float:
        """Seconds between now and the newest event applied, while events wait to be
        read; 0 when caught up. Sources without a backlog are always caught up."""
        return 0.0

    # What losing the connection raises: logged, then reconnect after a backoff.
    connection_errors: tuple[type[BaseException], ...]

    async def run(self, sink: EventSink) -> None:
        """Listen until cancelled; never returns or raises on connection trouble."""
        backoff = Backoff()
        while True:
            raise_if_cancelled()
            try:
                await self.listen(sink, backoff)
            except self.connection_errors as exc:
                log.warning("%s invalidation source %s lost: %s", self.source, self.channel, exc)
            except Exception as exc:
                # The loop must outlive any surprise (a transport's RuntimeError after a
                # partition ended in resets, a bug in a sink): say why, and start over.
                log.error(
                    "%s invalidation source %s failed (%r); restarting it",
                    self.source,
                    self.channel,
                    exc,
                    exc_info=exc,
                )
            finally:
                if self.state == "up":
                    sink.on_disconnect(self.source)
                self.state = "down"
            await backoff.sleep()

    async def deliver(self, raw: bytes | str, sink: EventSink) -> None:
        """Hand one received message to ``sink``: an event, or a malformed one."""
        try:
            event = parse_event(raw)
        except MalformedEvent as exc:
            sink.on_malformed(raw, exc, self.source)
            return
        await sink.on_event(event, self.source)

    @abc.abstractmethod
    async def listen(self, sink: EventSink, backoff: Backoff) -> None:
        """Connect, subscribe (then set ``state = "up"``, reset ``backoff`` and call
        ``sink.on_gap``) and deliver events until the connection fails."""


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task was asked to stop. redis-py 8.2 lets a
    command cancelled while it waits for its reply return normally and drops the request
    (measured: a task cancelled during HSET carried on), so a loop of Redis commands calls
    this once per turn, or a sidecar's shutdown would wait for it forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Backoff:
    """Exponential backoff with full jitter, so sidecars reconnecting after an outage
    spread out instead of arriving at the server together."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base = base
        self.cap = cap
        self._attempt = 0

    async def sleep(self) -> None:
        delay = random.uniform(0, min(self.cap, self.base * 2**self._attempt))
        self._attempt = min(self._attempt + 1, 16)
        await asyncio.sleep(delay)

    def reset(self) -> None:
        self._attempt = 0
