"""The per-entry envelope the engine stores in every tier.

An envelope is a msgpack array ``[value, content_type, version, expires_at, tags]``:
arrays decode faster than maps and the schema is private to this module. ``expires_at``
is wall-clock epoch seconds (``None``: the entry lives as long as each tier's ttl), so a
promoted entry keeps its remaining lifetime across tiers and processes.

An entry of an encrypted namespace has a sixth element, ``true``: its value is sealed
(cachesvc.crypto), so that a namespace no longer encrypted never serves it as a value.
Plain envelopes stay five elements, byte for byte as before.
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack

from tiers.base import Payload

DEFAULT_CONTENT_TYPE = "application/octet-stream"


class Entry(NamedTuple):
    value: bytes
    content_type: str
    version: int
    expires_at: float | None
    tags: tuple[str, ...] = ()
    sealed: bool = False  # the value is ciphertext (cachesvc.crypto)

    def encode(self) -> bytes:
        fields = (self.value, self.content_type, self.version, self.expires_at, self.tags)
        payload: bytes = msgpack.packb((*fields, True) if self.sealed else fields)
        return payload

    def remaining(self, now: float) -> float | None:
        return None if self.expires_at is None else self.expires_at - now

    def ttl_in(self, tier_ttl: float, now: float) -> float:
        """How long a tier whose own limit is ``tier_ttl`` should keep this entry."""
        remaining = self.remaining(now)
        return tier_ttl if remaining is None else min(remaining, tier_ttl)


def decode_envelope(payload: Payload) -> Entry:
    """The entry in ``payload``; ValueError when it is not one of ours."""
    try:
        value, content_type, version, expires_at, tags, *sealed = msgpack.unpackb(payload)
        if sealed not in ([], [True]):
            raise ValueError(f"unknown envelope fields {sealed!r}")
        return Entry(value, content_type, version, expires_at, tuple(tags), bool(sealed))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a cachesvc envelope: {exc}") from None


def decode_live(payload: Payload | None, now: float) -> Entry | None:
    """The entry in ``payload`` unless it is absent, expired or unreadable.

    An unreadable payload (another program's data under our key, or a future format) is
    a miss: the lower tiers or the application still have the truth.
    """
    if payload is None:
        return None
    try:
        entry = decode_envelope(payload)
    except ValueError:
        return None
    if entry.expires_at is not None and entry.expires_at <= now:
        return None
    return entry
