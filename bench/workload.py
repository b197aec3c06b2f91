"""The workload of bench/locustfile.py, from environment variables, without Locust.

Kept apart from the locustfile because importing Locust monkey-patches the process
(gevent), which nothing else (the tests, the soak) may suffer.

=============================  ==============================  ==========================
variable                       meaning                         default
=============================  ==============================  ==========================
CACHESVC_LOAD_KEYS             distinct keys                   10000
CACHESVC_LOAD_ZIPF_S           Zipf exponent s (0 = uniform)   1.0
CACHESVC_LOAD_READ_RATIO       share of GETs, 0..1             0.9
CACHESVC_LOAD_VALUE_SIZE       bytes per PUT: N or MIN-MAX     256
CACHESVC_LOAD_STRATEGY         PUT strategy, or a comma list   write-through
                               to pick from at random
CACHESVC_LOAD_KEY_PREFIX       prefix of every key             locust:
CACHESVC_LOAD_NAMESPACE        the namespace of every request  default
CACHESVC_LOAD_TOKEN            bearer token                    CACHESVC_AUTH_TOKEN
CACHESVC_AUTH_TOKEN            bearer token (the sidecar's)    none
=============================  ==============================  ==========================

The sidecar's configuration skips ``CACHESVC_LOAD_*``, so one shell can run both.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

N = TypeVar("N", int, float)

STRATEGIES = ("write-through", "write-behind", "cache-aside")


class ZipfSampler:
    """Ranks 0..n-1 with P(rank k) proportional to 1/(k+1)^s: rank 0 is the hottest key.

    Any s >= 0 works (s = 0 is uniform), unlike numpy's zipf, which needs s > 1 and is
    unbounded. One binary search over the cumulative weights per sample.
    """

    def __init__(self, n: int, s: float, rng: random.Random | None = None) -> None:
        if n < 1:
            raise ValueError("n must be at least 1")
        if s < 0:
            raise ValueError("s must be >= 0")
        self.n = n
        self.s = s
        self._cumulative = list(itertools.accumulate((k + 1) ** -s for k in range(n)))
        self._total = self._cumulative[-1]
        self._rng = rng or random.Random()

    def probability(self, rank: int) -> float:
        return (rank + 1) ** -self.s / self._total

    def sample(self) -> int:
        point = self._rng.random() * self._total
        return min(bisect.bisect_right(self._cumulative, point), self.n - 1)


@dataclass(frozen=True)
class Workload:
    keys: int = 10_000
    zipf_s: float = 1.0
    read_ratio: float = 0.9
    value_size: tuple[int, int] = (256, 256)
    strategies: tuple[str, ...] = ("write-through",)
    key_prefix: str = "locust:"
    namespace: str = "default"
    token: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Workload:
        """The workload the environment describes; ValueError naming the bad variable."""
        env = os.environ if environ is None else environ
        default = cls()
        keys = _number(env, "CACHESVC_LOAD_KEYS", default.keys, int)
        if keys < 1:
            raise ValueError(f"CACHESVC_LOAD_KEYS must be at least 1, got {keys}")
        zipf_s = _number(env, "CACHESVC_LOAD_ZIPF_S", default.zipf_s, float)
        if not zipf_s >= 0:
            raise ValueError(f"CACHESVC_LOAD_ZIPF_S must be >= 0 (0: uniform), got {zipf_s}")
        read_ratio = _number(env, "CACHESVC_LOAD_READ_RATIO", default.read_ratio, float)
        if not 0 <= read_ratio <= 1:
            raise ValueError(f"CACHESVC_LOAD_READ_RATIO must be between 0 and 1, got {read_ratio}")
        strategies = tuple(
            s.strip() for s in env.get("CACHESVC_LOAD_STRATEGY", "write-through").split(",")
        )
        for strategy in strategies:
            if strategy not in STRATEGIES:
                raise ValueError(
                    f"CACHESVC_LOAD_STRATEGY: unknown strategy {strategy!r} "
                    f"(known: {', '.join(STRATEGIES)})"
                )
        prefix = env.get("CACHESVC_LOAD_KEY_PREFIX", default.key_prefix)
        if any(ch.isspace() or not ch.isprintable() for ch in prefix):
            raise ValueError("CACHESVC_LOAD_KEY_PREFIX must not contain whitespace or controls")
        namespace = env.get("CACHESVC_LOAD_NAMESPACE") or default.namespace
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", namespace):
            raise ValueError(f"CACHESVC_LOAD_NAMESPACE: {namespace!r} is not a namespace name")
        token = env.get("CACHESVC_LOAD_TOKEN") or env.get("CACHESVC_AUTH_TOKEN") or None
        return cls(
            keys=keys,
            zipf_s=zipf_s,
            read_ratio=read_ratio,
            value_size=_size_range(env.get("CACHESVC_LOAD_VALUE_SIZE")),
            strategies=strategies,
            key_prefix=prefix,
            namespace=namespace,
            token=token,
        )

    @property
    def cache_path(self) -> str:
        """The path before each key: ``/v1/cache/``, or the namespace's."""
        if self.namespace == "default":
            return "/v1/cache/"
        return f"/v1/ns/{self.namespace}/cache/"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def _number(env: Mapping[str, str], name: str, default: N, kind: type[N]) -> N:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, got {raw!r}") from None


def _size_range(raw: str | None) -> tuple[int, int]:
    if raw is None or raw.strip() == "":
        return (256, 256)
    low, _, high = raw.partition("-")
    try:
        sizes = (int(low), int(high or low))
    except ValueError:
        raise ValueError(
            f"CACHESVC_LOAD_VALUE_SIZE must be N or MIN-MAX bytes, got {raw!r}"
        ) from None
    if not 1 <= sizes[0] <= sizes[1]:
        raise ValueError(f"CACHESVC_LOAD_VALUE_SIZE must be 1 <= MIN <= MAX, got {raw!r}")
    return sizes


class Values:
    """Request bodies of the configured sizes, sliced from one random buffer."""

    def __init__(self, sizes: tuple[int, int], rng: random.Random | None = None) -> None:
        self.sizes = sizes
        self._rng = rng or random.Random()
        self._buffer = self._rng.randbytes(sizes[1])

    def next(self) -> bytes:
        low, high = self.sizes
        return self._buffer[: self._rng.randint(low, high)]
