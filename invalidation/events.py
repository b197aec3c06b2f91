"""The invalidation event: ``{"keys": [...], "prefixes": [...], "tags": [...]}``, and
``"namespace"`` naming the namespace they are in (absent: ``default``; docs/invalidation.md
is the publishers' reference).

Every field is optional and unknown fields are ignored, so publishers can add their own;
but an event must name something to invalidate: one that names no key, prefix or tag
(``{}``, ``{"keyz": [...]}``) is a mistake of its publisher, reported as malformed rather
than counted as applied.

cachesvc's own publishers add three fields: ``origin`` (the sending sidecar, which skips
its own event: it applied it to the shared tiers before publishing), ``version`` (the
invalidation's version, used by every receiver) and ``sent_at`` (epoch seconds, for the
end-to-end latency metric). An external publisher may send ``sent_at`` too: receivers
then version the invalidation by it instead of by when they received it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

MAX_ITEMS = 10_000  # per field: a bigger event is a mistake, not an invalidation
MAX_VERSION = 2**63  # versions are 63-bit integers (a Postgres bigint)
# sent_at becomes a version when an event carries none: times up to 2090.
MAX_SENT_AT = 3_800_000_000
KNOWN_FIELDS = frozenset(
    ("keys", "prefixes", "tags", "namespace", "origin", "sent_at", "version", "written")
)
DEFAULT_NAMESPACE = "default"
NAMESPACE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


class MalformedEvent(ValueError):
    """The message is not an invalidation event."""


@dataclass(frozen=True, slots=True)
class InvalidationEvent:
    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    # The namespace of the keys, prefixes and tags (not of ``written``: those pairs name
    # keys as the tiers store them).
    namespace: str = DEFAULT_NAMESPACE
    origin: str | None = field(default=None, compare=False)
    sent_at: float | None = field(default=None, compare=False)
    # The publishing sidecar's version of the invalidation: receivers tombstone and mark
    # at it, so a write acknowledged after the invalidation is never hidden by it.
    version: int | None = field(default=None, compare=False)
    # Keys a sidecar wrote, each at its version: peers drop older copies from their
    # in-process tiers (the shared tiers hold the new value already).
    written: tuple[tuple[str, int], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.keys or self.prefixes or self.tags or self.written)

    def to_json(self) -> str:
        document: dict[str, Any] = {
            "keys": list(self.keys),
            "prefixes": list(self.prefixes),
            "tags": list(self.tags),
        }
        if self.namespace != DEFAULT_NAMESPACE:
            document["namespace"] = self.namespace
        if self.origin is not None:
            document["origin"] = self.origin
        if self.sent_at is not None:
            document["sent_at"] = self.sent_at
        if self.version is not None:
            document["version"] = self.version
        if self.written:
            document["written"] = [list(pair) for pair in self.written]
        return json.dumps(document, ensure_ascii=False)


def parse_event(raw: bytes | str, namespace: str = DEFAULT_NAMESPACE) -> InvalidationEvent:
    """Parse a published message; MalformedEvent says what is wrong with it. ``namespace``:
    the namespace of an event that names none."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedEvent(f"expected a JSON object, got {type(document).__name__}")
    origin = document.get("origin")
    sent_at = document.get("sent_at")
    version = document.get("version")
    event = InvalidationEvent(
        keys=_strings(document, "keys"),
        prefixes=_strings(document, "prefixes"),
        tags=_strings(document, "tags"),
        namespace=_namespace(document.get("namespace", namespace)),
        origin=origin if isinstance(origin, str) else None,
        sent_at=_timestamp(sent_at),
        version=version if isinstance(version, int) and 0 < version < MAX_VERSION else None,
        written=_written(document.get("written")),
    )
    if not event:
        unknown = sorted(set(document) - KNOWN_FIELDS)
        ignored = f" (unknown fields ignored: {', '.join(unknown)[:200]})" if unknown else ""
        raise MalformedEvent(f"nothing to invalidate: give keys, prefixes or tags{ignored}")
    return event


def _written(value: Any) -> tuple[tuple[str, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise MalformedEvent(f"written must be a list of at most {MAX_ITEMS} [key, version] pairs")
    pairs = []
    for pair in value:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and pair[0]
            and isinstance(pair[1], int)
            and 0 < pair[1] < MAX_VERSION
        ):
            raise MalformedEvent("written must be a list of [key, version] pairs")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _namespace(value: Any) -> str:
    if not isinstance(value, str) or not NAMESPACE_NAME.fullmatch(value):
        raise MalformedEvent(
            f"namespace must be a namespace's name ([a-z0-9][a-z0-9_-]{{0,62}}), got {value!r:.80}"
        )
    return value


def _timestamp(value: Any) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value) and 0 < value < MAX_SENT_AT:
        return float(value)
    return None


def _strings(document: dict[str, Any], name: str) -> tuple[str, ...]:
    value = document.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise MalformedEvent(f"{name} must be a list of non-empty strings")
    if len(value) > MAX_ITEMS:
        raise MalformedEvent(f"{name} has {len(value)} items; at most {MAX_ITEMS}")
    return tuple(value)
