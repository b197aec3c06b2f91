"""The listener contract: a source of invalidation events that keeps itself connected.

A listener runs until cancelled, reconnecting with backoff, and tells its sink about
every event, every malformed message, and every (re)subscription: between losing a
subscription and regaining it, events may have been missed, so the sink must treat what
it cached before the gap as suspect (``on_gap``).
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
    async def on_event(self, event: InvalidationEvent, source: str) -> None: ...

    def on_malformed(self, raw: bytes | str, error: MalformedEvent, source: str) -> None: ...

    async def on_gap(self, source: str) -> None:
        """Subscribed (again): events published while not subscribed were missed."""

    def on_disconnect(self, source: str) -> None:
        """The subscription is lost: from now on events may be missed."""


class Listener(abc.ABC):
    source: str  # for metrics and logs: "redis" or "postgres"

    def __init__(self, url: str, channel: str, liveness_interval: float = 5.0) -> None:
        self.url = url
        self.channel = channel
        # A subscription silent for this long is checked; one that fails it is replaced.
        self.liveness_interval = liveness_interval
        self.state: State = "connecting"

    # What losing the connection raises: logged, then reconnect after a backoff.
    connection_errors: tuple[type[BaseException], ...]

    async def run(self, sink: EventSink) -> None:
        """Listen until cancelled; never returns or raises on connection trouble."""
        backoff = Backoff()
        while True:
            try:
                await self.listen(sink, backoff)
            except self.connection_errors as exc:
                log.warning("%s invalidation source %s lost: %s", self.source, self.channel, exc)
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
