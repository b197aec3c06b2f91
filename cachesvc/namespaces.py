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

An encrypted namespace (``encryption_keys_env``) has a ``cipher``: the request layer seals
its values before the engine sees them and opens them on every hit (cachesvc.crypto), so
that every tier and the journal hold ciphertext only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cachesvc.config import ConfigError, Settings, Strategy
from cachesvc.crypto import Cipher, namespace_cipher, open_entry
from cachesvc.engine import Engine, Hit, NewValue
from invalidation.events import DEFAULT_NAMESPACE, InvalidationEvent

SEPARATOR = "\x1e"


def scope_of(namespace: str) -> str:
    """What the tiers put before a name of ``namespace``."""
    return "" if namespace == DEFAULT_NAMESPACE else f"{SEPARATOR}{namespace}{SEPARATOR}"


class Namespace:
    __slots__ = (
        "cipher",
        "engine",
        "hits",
        "max_value_bytes",
        "name",
        "scope",
        "strategy",
        "ttl",
    )

    def __init__(
        self,
        name: str,
        engine: Engine,
        strategy: Strategy,
        ttl: float | None = None,
        max_value_bytes: int | None = None,
        cipher: Cipher | None = None,
    ) -> None:
        self.name = name
        self.scope = scope_of(name)
        self.engine = engine
        self.strategy = strategy  # for writes that name none
        self.ttl = ttl  # the longest lifetime of any entry
        self.max_value_bytes = max_value_bytes
        self.cipher = cipher  # None: its values are stored as they are
        # Keys read that a tier held, by tier (cachesvc_hits_total reads it at scrape).
        self.hits: dict[str, int] = {}

    def held(self, names: Iterable[str]) -> tuple[str, ...]:
        """Keys or tags of this namespace as the tiers hold them."""
        scope = self.scope
        return tuple(scope + name for name in names) if scope else tuple(names)

    def sealed(self, new: NewValue) -> NewValue:
        """``new`` as the tiers get it: its value sealed when the namespace is encrypted,
        bound to the namespace and the client's key."""
        cipher = self.cipher
        if cipher is None:
            return new
        value = cipher.seal(self.name, new.key[len(self.scope) :], new.value)
        return new._replace(value=value, sealed=True)

    def opened(self, key: str, hit: Hit | None) -> Hit | None:
        """``hit`` (of the held ``key``) as the client wrote it, or None, a miss: a value
        that does not open (a key no longer listed, altered, copied), or one stored sealed
        or in clear while the namespace is the other way (``open_entry``)."""
        if hit is None or not (hit.entry.sealed or self.cipher is not None):
            return hit  # a plain value of a plain namespace: every L1 hit of most
        entry = open_entry(self.cipher, self.name, key[len(self.scope) :], hit.entry)
        return None if entry is None else hit._replace(entry=entry)

    def lifetime(self, ttl: float | None) -> float | None:
        """The lifetime of an entry written with ``ttl``: at most the namespace's cap."""
        cap = self.ttl
        if cap is None or (ttl is not None and ttl < cap):
            return ttl
        return cap


def build_ciphers(settings: Settings, environ: Mapping[str, str]) -> dict[str, Cipher]:
    """The cipher of every encrypted namespace, by name, its keys read from ``environ``.
    ConfigError names the ``encryption_keys_env`` of each namespace whose variable is not
    set or not a key list (never a key's bytes)."""
    ciphers: dict[str, Cipher] = {}
    problems = []
    for position, config in enumerate(settings.namespaces):
        try:
            cipher = namespace_cipher(config.classification, config.encryption_keys_env, environ)
        except ValueError as exc:
            problems.append(f"namespaces[{position}].encryption_keys_env: {exc}")
            continue
        if cipher is not None:
            ciphers[config.name] = cipher
    if problems:
        raise ConfigError(problems)
    return ciphers


def build_namespaces(
    settings: Settings, engine: Engine, ciphers: Mapping[str, Cipher] | None = None
) -> dict[str, Namespace]:
    """Every namespace by name, ``default`` (the top-level policy) first; ``ciphers``:
    those of the encrypted ones (``build_ciphers``)."""
    ciphers = ciphers or {}
    slots = {slot.name: slot for slot in engine.slots}
    strategy = settings.write.strategy
    namespaces = {DEFAULT_NAMESPACE: Namespace(DEFAULT_NAMESPACE, engine, strategy)}
    for config in settings.namespaces:
        own = engine
        if config.tiers is not None and len(config.tiers) < len(engine.slots):
            own = engine.view([slots[name] for name in config.tiers], scope_of(config.name))
        namespaces[config.name] = Namespace(
            config.name,
            own,
            config.strategy or strategy,
            config.ttl,
            config.max_value_bytes,
            ciphers.get(config.name),
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
