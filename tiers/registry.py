"""URL scheme -> tier class.

Built-in backends are imported lazily, so a missing driver only matters when a config
uses its scheme, and then it is reported by name. Third-party backends register through
the ``cachesvc.tiers`` entry-point group (``scheme = "package.module:Class"``), with no
change to the engine.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from tiers.base import Tier

_BUILTIN: dict[str, str] = {
    "memory": "tiers.memory:MemoryTier",
    "redis": "tiers.redis:RedisTier",
    "rediss": "tiers.redis:RedisTier",
    "redis-sentinel": "tiers.redis:RedisTier",
    "redis-cluster": "tiers.redis_cluster:RedisClusterTier",
    "memcached": "tiers.memcached:MemcachedTier",
    "postgresql": "tiers.postgres:PostgresTier",
    "postgres": "tiers.postgres:PostgresTier",
}


def known_schemes() -> list[str]:
    plugins = {ep.name for ep in entry_points(group="cachesvc.tiers")}
    return sorted(set(_BUILTIN) | plugins)


def tier_class(scheme: str) -> type[Tier]:
    """The tier class for ``scheme``; ValueError when unknown or its driver is missing."""
    target = _BUILTIN.get(scheme)
    if target is None:
        plugin = next(iter(entry_points(group="cachesvc.tiers", name=scheme)), None)
        if plugin is None:
            raise ValueError(f"unknown scheme {scheme!r} (known: {', '.join(known_schemes())})")
        target = plugin.value
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"scheme {scheme!r} needs the missing package {exc.name!r}; install it"
        ) from exc
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Tier)):
        raise ValueError(f"scheme {scheme!r}: {target} is not a Tier")
    return cls
