"""/metrics: Prometheus text with per-tier series after traffic (issue 7), the process's
own series and the build, and journal series only where there is a journal (issue 18)."""

from __future__ import annotations

from importlib.metadata import version

from prometheus_client.parser import text_string_to_metric_families

from tests.servers import flush_redis
from tests.service.conftest import Client, MakeClient
from tests.service.test_api import path


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_parse_and_carry_per_tier_series(
    three_tier: Client, clean_redis_url: str
) -> None:
    await three_tier.put(path("m"), data=b"v")
    await three_tier.get(path("m"))
    flush_redis(clean_redis_url)
    await three_tier.get(path("m"))  # an l1 miss, an l2 hit and a promotion into l1
    await three_tier.get(path("m"))  # waits for the promotion; an l1 hit
    await three_tier.get(path("absent"))

    response = await three_tier.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    found = samples(await response.text())

    assert found[("cachesvc_tier_hits_total", (("tier", "l1"),))] == 2
    assert found[("cachesvc_tier_hits_total", (("tier", "l2"),))] == 1
    assert found[("cachesvc_tier_misses_total", (("tier", "l1"),))] == 2
    assert found[("cachesvc_tier_misses_total", (("tier", "l3"),))] == 1
    assert found[("cachesvc_promotions_total", (("tier", "l1"),))] == 1
    default = ("namespace", "default")
    requests = "cachesvc_requests_total"
    assert found[(requests, (default, ("operation", "get"), ("status", "200")))] == 3
    assert found[(requests, (default, ("operation", "get"), ("status", "404")))] == 1
    assert found[(requests, (default, ("operation", "put"), ("status", "204")))] == 1
    assert found[("cachesvc_hits_total", (default, ("tier", "l1")))] == 2
    assert found[("cachesvc_hits_total", (default, ("tier", "l2")))] == 1
    assert found[("cachesvc_misses_total", (default,))] == 1
    for tier in ("l1", "l2", "l3"):
        assert found[("cachesvc_breaker_state", (("tier", tier),))] == 0
        count = (
            "cachesvc_tier_call_duration_seconds_count",
            (("operation", "get"), ("tier", tier)),
        )
        assert found[count] >= 1
    latency = ("cachesvc_request_duration_seconds_count", (default, ("operation", "get")))
    assert found[latency] == 4
    # Requests outside any namespace: namespace="" (this scrape counts the one before).
    outside = (("namespace", ""), ("operation", "metrics"), ("status", "200"))
    assert (await scrape(three_tier))[(requests, outside)] == 1


async def scrape(
    client: Client,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    return samples(await response.text())


def names(found: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {name for name, _ in found}


async def test_process_series_and_build_info(make_client: MakeClient) -> None:
    found = await scrape(await make_client())
    assert found[("process_cpu_seconds_total", ())] > 0
    assert found[("process_resident_memory_bytes", ())] > 0
    assert found[("process_open_fds", ())] > 0
    assert found[("cachesvc_build_info", (("version", version("cachesvc")),))] == 1


async def test_no_journal_series_without_a_journal(make_client: MakeClient) -> None:
    found = await scrape(await make_client())  # the embedded default: one memory tier
    assert not {name for name in names(found) if name.startswith("cachesvc_journal")}


async def test_journal_series_with_a_journal(three_tier: Client) -> None:
    journal = {name for name in names(await scrape(three_tier)) if "journal" in name}
    assert {
        "cachesvc_journal_depth",
        "cachesvc_journal_lag_seconds",
        "cachesvc_journal_flushed_total",
        "cachesvc_journal_retried_total",
        "cachesvc_journal_dead_lettered_total",
    } <= journal
