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

from typing import Any, NamedTuple

import msgpack

from tiers.base import VIEWED_SIZE, Payload

DEFAULT_CONTENT_TYPE = "application/octet-stream"


# The envelope's array (5 or 6 elements) and its value's header, as msgpack packs them.
_ARRAYS = {0x95: 5, 0x96: 6}
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}


class Entry(NamedTuple):
    value: Payload  # bytes, or a view of the payload a large value was read from
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
        if len(payload) > VIEWED_SIZE:  # the value not copied: it goes to the socket as it is
            value, content_type, version, expires_at, tags, *sealed = _unpack_viewed(payload)
        else:
            value, content_type, version, expires_at, tags, *sealed = msgpack.unpackb(payload)
        if sealed not in ([], [True]):
            raise ValueError(f"unknown envelope fields {sealed!r}")
        return Entry(value, content_type, version, expires_at, tuple(tags), bool(sealed))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a cachesvc envelope: {exc}") from None


def _unpack_viewed(payload: Payload) -> list[Any]:
    """The envelope's fields, its value a view of ``payload``: msgpack would copy it. The
    fields after the value are unpacked as an array of their own (a copy of a few bytes)."""
    view = memoryview(payload)
    fields = _ARRAYS.get(view[0])
    length_bytes = _BIN_LENGTH_BYTES.get(view[1])
    if fields is None or length_bytes is None:
        return list(msgpack.unpackb(payload))  # not as Entry.encode packs a value
    start = 2 + length_bytes
    end = start + int.from_bytes(view[2:start], "big")
    if end > len(view):
        raise ValueError("the value runs past the end of the envelope")
    rest: list[Any] = msgpack.unpackb(bytes((0x90 + fields - 1,)) + view[end:])
    return [view[start:end], *rest]


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
