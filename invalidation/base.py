"""The listener contract: a source of invalidation events that keeps itself connected.

A listener runs until cancelled, reconnecting with backoff, and tells its sink about
every event, every malformed message, and every (re)subscription: between losing a
subscription and regaining it, events may have been missed, so the sink must treat what
it cached before the gap as suspect (``on_gap``).
"""

from __future__ import annotations

import abc
import asyncio
import random
from typing import Literal, Protocol

from invalidation.events import InvalidationEvent, MalformedEvent

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

    @abc.abstractmethod
    async def run(self, sink: EventSink) -> None:
        """Listen until cancelled; never returns or raises on connection trouble."""


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
