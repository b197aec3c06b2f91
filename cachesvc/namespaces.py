"""Namespaces at run time: each one's keys apart from every other's, in every tier, and its
own policy (tiers, ttl cap, default strategy, largest value).

Isolation is by name. The tiers, the markers and the journal hold the key ``k`` of the
namespace ``orders`` as ``"\\x1eorders\\x1ek"`` (its *scope* and the key), and its tags and
prefixes alike; a key of ``default`` is held as it is, so what was stored before
namespaces existed is still served. The API refuses control characters in keys, tags and
prefixes, so no client name starts with the separator (ASCII record separator, 0x1e): no
key, tag or prefix of one namespace equals, or is a prefix of, one of another namespace,
and a prefix invalidation (``p:<prefix>`` markers match the start of a key) stays inside
its namespace. Each server sees distinct keys: Redis and Postgres store the text as it
is; memcached, which takes no control characters, stores a digest of it.

A namespace with its own ``tiers`` reads and writes through a view of the engine over
those tiers (``Engine.view``); the others share the engine itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from cachesvc.config import Settings, Strategy
from cachesvc.engine import Engine
from invalidation.events import DEFAULT_NAMESPACE, InvalidationEvent

SEPARATOR = "\x1e"


def scope_of(namespace: str) -> str:
    """What the tiers put before a name of ``namespace``."""
    return "" if namespace == DEFAULT_NAMESPACE else f"{SEPARATOR}{namespace}{SEPARATOR}"


class Namespace:
    __slots__ = ("engine", "hits", "max_value_bytes", "name", "scope", "strategy", "ttl")

    def __init__(
        self,
        name: str,
        engine: Engine,
        strategy: Strategy,
        ttl: float | None = None,
        max_value_bytes: int | None = None,
    ) -> None:
        self.name = name
        self.scope = scope_of(name)
        self.engine = engine
        self.strategy = strategy  # for writes that name none
        self.ttl = ttl  # the longest lifetime of any entry
        self.max_value_bytes = max_value_bytes
        # Keys read that a tier held, by tier (cachesvc_hits_total reads it at scrape).
        self.hits: dict[str, int] = {}

    def held(self, names: Iterable[str]) -> tuple[str, ...]:
        """Keys or tags of this namespace as the tiers hold them."""
        scope = self.scope
        return tuple(scope + name for name in names) if scope else tuple(names)

    def lifetime(self, ttl: float | None) -> float | None:
        """The lifetime of an entry written with ``ttl``: at most the namespace's cap."""
        cap = self.ttl
        if cap is None or (ttl is not None and ttl < cap):
            return ttl
        return cap


def build_namespaces(settings: Settings, engine: Engine) -> dict[str, Namespace]:
    """Every namespace by name, ``default`` (the top-level policy) first."""
    slots = {slot.name: slot for slot in engine.slots}
    strategy = settings.write.strategy
    namespaces = {DEFAULT_NAMESPACE: Namespace(DEFAULT_NAMESPACE, engine, strategy)}
    for config in settings.namespaces:
        own = engine
        if config.tiers is not None and len(config.tiers) < len(engine.slots):
            own = engine.view([slots[name] for name in config.tiers], scope_of(config.name))
        namespaces[config.name] = Namespace(
            config.name, own, config.strategy or strategy, config.ttl, config.max_value_bytes
        )
    return namespaces


def scoped(event: InvalidationEvent) -> InvalidationEvent:
    """``event``'s keys, prefixes and tags as the tiers and markers hold them (``written``
    pairs are already). A name with the separator in it names nothing a client can have
    stored, and could reach into another namespace: it is left out."""
    scope = scope_of(event.namespace)

    def held(names: Iterable[str]) -> tuple[str, ...]:
        return tuple(scope + name for name in names if SEPARATOR not in name)

    return InvalidationEvent(
        held(event.keys),
        held(event.prefixes),
        held(event.tags),
        origin=event.origin,
        sent_at=event.sent_at,
        version=event.version,
        written=event.written,
    )
