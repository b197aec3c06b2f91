"""Invalidation markers: how prefix and tag invalidations reach every tier.

Memcached cannot list its keys and L3 may hold millions, so invalidating a prefix or a
tag does not search the tiers. It records a *marker* — the version at which the prefix
or tag was invalidated — and every read checks the entry it found against the markers: an
entry whose version is not newer than a marker of one of its tags, or of a prefix of its
key, is a miss in every tier, so it cannot come back by promotion either (the FusionCache
approach to tagging). A hidden entry also hides every older version of its key below it
(the read goes on with the hidden entry's version as its floor): the older value, written
before the tag was given, is no less invalidated. A newer one below it is not (the tier
above missed that write).

Costs: a read checks each of its entry's tags (a dict lookup each) and one dict lookup
per distinct prefix length; memory is one marker per invalidated tag/prefix. A marker
can be dropped once every entry it could hide has expired: entries live at most the sum
of the tiers' ttls after their version (each promotion may restart a tier's ttl).
Key markers exist only for keys whose tombstone the durable tier did not take.

Markers are kept where they outlive any cache server (``MarkerStore``): in the durable tier
when it keeps markers (Postgres, Redis), else in the invalidation channel's Redis. A
sidecar that starts, or comes back after missing events, loads them from there; none of
the cache tiers' servers coming back empty can un-invalidate anything.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

from cachesvc.envelope import Entry
from cachesvc.versions import version_at
from tiers.base import Marker, TierError

log = logging.getLogger(__name__)

KINDS = ("k", "p", "t")  # key, prefix, tag


class Markers:
    def __init__(self, max_age: float) -> None:
        self.max_age = max_age
        self.keys: dict[str, int] = {}
        self.tags: dict[str, int] = {}
        self._prefixes: dict[int, dict[str, int]] = defaultdict(dict)  # by prefix length
        self.active = False  # fast path: no marker at all
        # Counts the markers recorded: a read that sees it change knows a marker came
        # while it waited for a tier.
        self.changes = 0

    def add(self, kind: str, name: str, version: int) -> bool:
        """Record a marker; True when it is newer than what was known."""
        table = self._table(kind, name)
        if table.get(name, 0) >= version:
            return False
        table[name] = version
        self.active = True
        self.changes += 1
        return True

    def add_all(self, markers: Sequence[Marker]) -> None:
        for name, version in markers:
            kind, _, rest = name.partition(":")
            if kind in KINDS and rest:
                self.add(kind, rest, version)

    def drop_key(self, key: str, version: int) -> None:
        """Drop the key marker of ``key`` if it is still the one at ``version``."""
        if self.keys.get(key) == version:
            del self.keys[key]
            self.active = bool(self.keys or self.tags or self._prefixes)

    def _table(self, kind: str, name: str) -> dict[str, int]:
        if kind == "k":
            return self.keys
        if kind == "t":
            return self.tags
        if kind == "p":
            return self._prefixes[len(name)]
        raise ValueError(f"unknown marker kind {kind!r}")

    def hiding(self, key: str, entry: Entry) -> int:
        """The version of the newest invalidation that covers ``entry`` (not older than
        it), or 0 when none does."""
        version = entry.version
        found = 0
        if self.keys:
            found = self.keys.get(key, 0)
        if entry.tags and self.tags:
            for tag in entry.tags:
                found = max(found, self.tags.get(tag, 0))
        for length, table in self._prefixes.items():
            found = max(found, table.get(key[:length], 0))
        return found if found >= version else 0

    def prune(self, now: float | None = None) -> None:
        oldest = self.oldest_allowed(now)
        for table in (self.keys, self.tags, *self._prefixes.values()):
            for name in [name for name, version in table.items() if version < oldest]:
                del table[name]
        for length in [length for length, table in self._prefixes.items() if not table]:
            del self._prefixes[length]
        self.active = bool(self.keys or self.tags or self._prefixes)

    def oldest_allowed(self, now: float | None = None) -> int:
        """Markers older than this version hide nothing that may still be stored."""
        return version_at((time.time() if now is None else now) - self.max_age, 0)


class MarkerStore:
    """Where markers outlive any cache server: ``save`` and ``load`` through the durable
    tier's ``save_markers``/``load_markers`` (or the channel Redis's, same shape). Saves
    that fail are kept and tried again by ``flush`` (the tier monitor calls it), so a
    marker applied here while the store was down still reaches it."""

    def __init__(
        self,
        save: Callable[[Sequence[Marker], float], Awaitable[None]],
        load: Callable[[int], Awaitable[list[Marker]]],
        ttl: float,
    ) -> None:
        self._save = save
        self._load = load
        self.ttl = ttl
        self._unsaved: dict[str, int] = {}

    async def save(self, markers: Sequence[Marker]) -> bool:
        """Keep ``markers``; False (they are kept for ``flush``) when the store failed."""
        for name, version in markers:
            self._unsaved[name] = max(version, self._unsaved.get(name, 0))
        return await self.flush()

    async def flush(self) -> bool:
        if not self._unsaved:
            return True
        pending = dict(self._unsaved)
        try:
            await self._save([Marker(name, version) for name, version in pending.items()], self.ttl)
        except TierError as exc:
            log.warning("invalidation markers not saved yet (%d waiting): %s", len(pending), exc)
            return False
        for name, version in pending.items():
            if self._unsaved.get(name) == version:
                del self._unsaved[name]
        return True

    async def load(self, newer_than: int = 0) -> list[Marker]:
        """Every marker kept of a version above ``newer_than`` (raises TierError when the
        store cannot be read)."""
        return await self._load(newer_than)
