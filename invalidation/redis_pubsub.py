"""Invalidation events over Redis pub/sub (SPEC §4)."""

from __future__ import annotations

import redis.asyncio as redis


async def publish(url: str, channel: str, message: str) -> int:
    """Publish ``message`` on ``channel``; returns how many subscribers received it."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        receivers: int = await client.publish(channel, message)
    finally:
        await client.aclose()
    return receivers
