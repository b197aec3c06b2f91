"""Prometheus metrics, one registry per app (tests run several apps in one process).

Tier series carry ``tier="<name>"``. Label children on the hot path are bound once per
tier (``TierMetrics``) instead of looked up per request. Beside cachesvc's own series: the
process collector's (``process_*``), ``cachesvc_build_info``, and the journal's only once
a journal exists (``for_journal``): a sidecar without one exports no journal series
rather than zeros that look like a healthy, empty journal.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def package_version() -> str:
    try:
        return version("cachesvc")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        Info("cachesvc_build", "The running cachesvc.", registry=r).info(
            {"version": package_version()}
        )
        # Per request: plain numbers, turned into Prometheus families when scraped.
        self.requests = RequestStats()
        r.register(self.requests)
        self.tier_reads = TierReads()
        r.register(self.tier_reads)
        self.tier_errors = Counter(
            "cachesvc_tier_errors",
            "Failed tier calls by kind (timeout, unavailable, error).",
            ["tier", "kind"],
            registry=r,
        )
        # Observed once per tier call: plain, as the request series.
        self.tier_duration = PlainHistograms(
            "cachesvc_tier_call_duration_seconds",
            "Latency of one (batched) tier call.",
            ("tier", "operation"),
            _LATENCY_BUCKETS,
        )
        r.register(self.tier_duration)
        self.tier_batch_size = PlainHistograms(
            "cachesvc_tier_batch_keys",
            "Keys per coalesced tier call.",
            ("tier", "operation"),
            (1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        r.register(self.tier_batch_size)
        self.promotions = Counter(
            "cachesvc_promotions",
            "Entries copied into a tier from a lower one on read.",
            ["tier"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "cachesvc_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["tier"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "cachesvc_breaker_transitions",
            "Circuit breaker state changes.",
            ["tier", "state"],
            registry=r,
        )
        self.missed_keys = Gauge(
            "cachesvc_tier_missed_keys",
            "Keys a tier missed writes for and must not serve until repaired.",
            ["tier"],
            registry=r,
        )
        self.repaired_keys = Counter(
            "cachesvc_tier_repaired_keys",
            "Missed keys deleted from a tier after it recovered.",
            ["tier"],
            registry=r,
        )
        self._journal: JournalMetrics | None = None

        self.malformed_requests = Counter(
            "cachesvc_malformed_requests",
            "Requests refused before they could be served, by error code (framing, "
            "limits, timeouts).",
            ["error"],
            registry=r,
        )

        self.invalidation_events = Counter(
            "cachesvc_invalidation_events",
            "Invalidation events received, by source and outcome "
            "(applied, malformed, own = this sidecar's, already applied).",
            ["source", "outcome"],
            registry=r,
        )
        self.invalidation_latency = Histogram(
            "cachesvc_invalidation_latency_seconds",
            "From publishing (the event's sent_at) to applied here.",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def for_tier(self, tier: str) -> TierMetrics:
        return TierMetrics(self, tier)

    def for_journal(self) -> JournalMetrics:
        """The journal's series, registered on the first call (there is one journal)."""
        if self._journal is None:
            self._journal = JournalMetrics(self.registry)
        return self._journal


class JournalMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.depth = Gauge(
            "cachesvc_journal_depth",
            "Write-behind writes recorded and not yet applied.",
            registry=registry,
        )
        self.lag = Gauge(
            "cachesvc_journal_lag_seconds",
            "Age of the oldest write-behind write not yet applied.",
            registry=registry,
        )
        self.flushed = Counter(
            "cachesvc_journal_flushed",
            "Write-behind writes applied to the lower tiers.",
            registry=registry,
        )
        self.retried = Counter(
            "cachesvc_journal_retried",
            "Write-behind writes whose flush failed and is retried.",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "cachesvc_journal_dead_lettered",
            "Write-behind writes moved to the dead-letter stream after repeated refusal.",
            registry=registry,
        )
        self.durable = Gauge(
            "cachesvc_journal_durable",
            "1 when an acknowledged write-behind write survives a crash of the journal's "
            "Redis (appendonly yes with appendfsync always), else 0.",
            registry=registry,
        )


class Buckets:
    """One histogram's counts, observed with a plain increment: how many values fell at or
    below each bound (the last count: above all, +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(bound, values at or below it) pairs, as a Prometheus histogram has them."""
        total = 0
        pairs: list[tuple[str, float]] = []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            pairs.append((bound, total))
        return pairs


class PlainHistograms:
    """A labelled histogram whose children are ``Buckets``: read out at scrape time."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], bounds: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = list(labels)
        self.bounds = bounds
        self.children: dict[tuple[str, ...], Buckets] = {}

    def child(self, *values: str) -> Buckets:
        """The histogram of these label values (bind it once, observe it often)."""
        buckets = self.children.get(values)
        if buckets is None:
            buckets = self.children[values] = Buckets(self.bounds)
        return buckets

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, buckets in sorted(self.children.items()):
            family.add_metric(list(values), buckets.cumulative(), buckets.sum)
        yield family


class RequestStats:
    """``cachesvc_requests_total`` and ``cachesvc_request_duration_seconds`` by namespace
    and operation, and ``cachesvc_hits_total`` / ``cachesvc_misses_total`` (keys read) by
    namespace, counted in plain dicts and read out at scrape time.

    prometheus-client's labelled children take a label lookup and a lock per call; on an
    L1 hit that measured about 15% of the sidecar's throughput (wrk, 64 connections). The
    event loop is one thread, so plain increments are safe here. The namespace label is a
    configured namespace's name (or "" for requests outside any: operations, unknown
    paths and namespaces), so the series stay bounded whatever clients send.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}
        self.latencies = PlainHistograms(
            "cachesvc_request_duration_seconds",
            "HTTP request latency by namespace and operation.",
            ("namespace", "operation"),
            _LATENCY_BUCKETS,
        )
        # namespace -> tier -> count; each namespace counts its hits in its own dict.
        self.hits: dict[str, dict[str, int]] = {}
        self.misses: dict[str, int] = {}

    def record(self, namespace: str, operation: str, status: int, seconds: float) -> None:
        key = (namespace, operation, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.latencies.child(namespace, operation).observe(seconds)

    def miss(self, namespace: str) -> None:
        self.misses[namespace] = self.misses.get(namespace, 0) + 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "cachesvc_requests",
            "HTTP requests by namespace, operation and status.",
            labels=["namespace", "operation", "status"],
        )
        for (namespace, operation, status), count in sorted(self.counts.items()):
            requests.add_metric([namespace, operation, str(status)], count)
        yield requests
        yield from self.latencies.collect()
        hits = CounterMetricFamily(
            "cachesvc_hits",
            "Keys read (GET, bulk get) that a tier held, by namespace and tier.",
            labels=["namespace", "tier"],
        )
        for namespace, by_tier in sorted(self.hits.items()):
            for tier, count in sorted(by_tier.items()):
                hits.add_metric([namespace, tier], count)
        yield hits
        misses = CounterMetricFamily(
            "cachesvc_misses",
            "Keys read (GET, bulk get) that no tier held, by namespace.",
            labels=["namespace"],
        )
        for namespace, count in sorted(self.misses.items()):
            misses.add_metric([namespace], count)
        yield misses


class TierReads:
    """``cachesvc_tier_hits_total`` and ``cachesvc_tier_misses_total``, read at scrape time
    from the plain counts of each ``TierMetrics`` (every L1 hit counts one: a labelled
    child's lock costs more than the increment)."""

    def __init__(self) -> None:
        self.tiers: list[TierMetrics] = []

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily("cachesvc_tier_hits", "Reads a tier answered.", labels=["tier"])
        misses = CounterMetricFamily(
            "cachesvc_tier_misses", "Reads a tier did not hold.", labels=["tier"]
        )
        by_tier: dict[str, list[int]] = {}
        for tier in self.tiers:
            counts = by_tier.setdefault(tier.tier, [0, 0])
            counts[0] += tier.hits
            counts[1] += tier.misses
        for name, (hit, missed) in sorted(by_tier.items()):
            hits.add_metric([name], hit)
            misses.add_metric([name], missed)
        yield hits
        yield misses


class TierMetrics:
    def __init__(self, metrics: Metrics, tier: str) -> None:
        self.tier = tier
        self.hits = 0
        self.misses = 0
        metrics.tier_reads.tiers.append(self)
        self.promotions = metrics.promotions.labels(tier)
        self.get_duration = metrics.tier_duration.child(tier, "get")
        self.set_duration = metrics.tier_duration.child(tier, "set")
        self.get_batch = metrics.tier_batch_size.child(tier, "get")
        self.set_batch = metrics.tier_batch_size.child(tier, "set")
        self.missed_keys = metrics.missed_keys.labels(tier)
        self.repaired_keys = metrics.repaired_keys.labels(tier)
        self._errors = metrics.tier_errors
        self._breaker_state = metrics.breaker_state.labels(tier)
        self._transitions = metrics.breaker_transitions
        self._breaker_state.set(0)

    def error(self, kind: str) -> None:
        self._errors.labels(self.tier, kind).inc()

    def breaker(self, state: str) -> None:
        self._breaker_state.set(BREAKER_STATES[state])
        self._transitions.labels(self.tier, state).inc()
