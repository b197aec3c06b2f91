"""Invalidation events over Postgres LISTEN/NOTIFY, so a database trigger can invalidate
(see docs/invalidation-trigger.sql). Same JSON payload as the Redis channel."""

from __future__ import annotations

import asyncio

import asyncpg

from invalidation.base import Backoff, EventSink, Listener

_LOST = object()  # put on the queue when the connection terminates


class PostgresNotifyListener(Listener):
    """LISTEN on a dedicated connection (a pooled one would drop its listeners when
    released), checked with ``SELECT 1`` after ``liveness_interval`` seconds of silence."""

    source = "postgres"

    connection_errors = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

    async def listen(self, sink: EventSink, backoff: Backoff) -> None:
        queue: asyncio.Queue[object] = asyncio.Queue()
        connection = await asyncpg.connect(self.url, timeout=2)
        try:
            connection.add_termination_listener(lambda _: queue.put_nowait(_LOST))
            await connection.add_listener(
                self.channel, lambda _conn, _pid, _channel, payload: queue.put_nowait(payload)
            )
            self.state = "up"
            backoff.reset()
            await sink.on_gap(self.source)
            while True:
                # Silent for a third of the liveness interval: ask; no answer within the
                # rest of it: the connection is lost.
                try:
                    payload = await asyncio.wait_for(queue.get(), self.liveness_interval / 3)
                except TimeoutError:
                    await connection.fetchval("SELECT 1", timeout=self.liveness_interval * 2 / 3)
                    continue
                if payload is _LOST:
                    raise OSError("connection terminated")
                assert isinstance(payload, str)
                await self.deliver(payload, sink)
        finally:
            connection.terminate()
