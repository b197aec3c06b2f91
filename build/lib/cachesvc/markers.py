"""Invalidation markers: how prefix and tag invalidations reach every tier.

Memcached cannot list its keys and L3 may hold millions, so invalidating a prefix or a
tag does not search the tiers. It records a *marker* — the version at which the prefix
or tag was invalidated — and every read checks the entry it found against the markers: an
entry whose version is not newer than a marker of one of its tags, or of a prefix of its
key, is a miss in every tier, so it cannot come back by promotion either (the FusionCache
approach to tagging).

Costs: a read checks each of its entry's tags (a dict lookup each) and one dict lookup
per distinct prefix length; memory is one marker per invalidated tag/prefix. A marker
can be dropped once every entry it could hide has expired: entries live at most the sum
of the tiers' ttls after their version (each promotion may restart a tier's ttl).
Key markers exist only for keys whose tombstone the durable tier did not take.

Markers are shared through a Redis sorted set next to the pub/sub channel, so a sidecar
that starts, or reconnects after missing events, learns the invalidations it missed.
"""

from __future__ import annotations

import time
from collections import defaultdict

from cachesvc.envelope import Entry

KINDS = ("k", "p", "t")  # key, prefix, tag


class Markers:
    def __init__(self, max_age: float) -> None:
        self.max_age_us = int(max_age * 1_000_000)
        self.keys: dict[str, int] = {}
        self.tags: dict[str, int] = {}
        self._prefixes: dict[int, dict[str, int]] = defaultdict(dict)  # by prefix length
        self.active = False  # fast path: no marker at all

    def add(self, kind: str, name: str, version: int) -> bool:
        """Record a marker; True when it is newer than what was known."""
        table = self._table(kind, name)
        if table.get(name, 0) >= version:
            return False
        table[name] = version
        self.active = True
        return True

    def _table(self, kind: str, name: str) -> dict[str, int]:
        if kind == "k":
            return self.keys
        if kind == "t":
            return self.tags
        if kind == "p":
            return self._prefixes[len(name)]
        raise ValueError(f"unknown marker kind {kind!r}")

    def hides(self, key: str, entry: Entry) -> bool:
        """Whether an invalidation newer than ``entry`` covers it."""
        version = entry.version
        if self.keys and self.keys.get(key, 0) >= version:
            return True
        if entry.tags and self.tags:
            for tag in entry.tags:
                if self.tags.get(tag, 0) >= version:
                    return True
        for length, table in self._prefixes.items():
            if table.get(key[:length], 0) >= version:
                return True
        return False

    def prune(self, now: float | None = None) -> None:
        oldest = int((time.time() if now is None else now) * 1_000_000) - self.max_age_us
        for table in (self.keys, self.tags, *self._prefixes.values()):
            for name in [name for name, version in table.items() if version < oldest]:
                del table[name]
        for length in [length for length, table in self._prefixes.items() if not table]:
            del self._prefixes[length]
        self.active = bool(self.keys or self.tags or self._prefixes)

    @property
    def oldest_allowed_us(self) -> int:
        return int(time.time() * 1_000_000) - self.max_age_us
