"""docs/grafana-dashboard.json queries only metrics that cachesvc exports, so that a renamed
or removed metric fails here instead of leaving an empty panel."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cachesvc.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
# Names the dashboard may query before cachesvc exports them (a panel for a metric that is
# being added). Remove a name once metrics.py registers it:
# test_allow_listed_names_are_still_missing fails until then.
NOT_YET_EXPORTED: frozenset[str] = frozenset()

_METRIC_NAME = re.compile(r"\bcachesvc_[a-z0-9_]+\b")
# The series each metric type exposes (prometheus-client's text format): a Counter named
# "x" is exposed as x_total, a Histogram as x_bucket, x_sum and x_count.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """Every PromQL text: panel targets (rows nest theirs) and template variable queries."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield query["query"] if isinstance(query, dict) else query


def queried_names() -> set[str]:
    return {name for query in queries(load_dashboard()) for name in _METRIC_NAME.findall(query)}


def exported_names() -> set[str]:
    """What a sidecar with a journal exports."""
    metrics = Metrics()
    metrics.for_journal()
    names = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def test_the_dashboard_queries_cachesvc_metrics() -> None:
    assert len(queried_names()) >= 10


def test_every_queried_metric_is_exported() -> None:
    unknown = queried_names() - exported_names() - NOT_YET_EXPORTED
    assert not unknown, f"the dashboard queries metrics cachesvc does not export: {sorted(unknown)}"


def test_allow_listed_names_are_still_missing() -> None:
    exported = NOT_YET_EXPORTED & exported_names()
    assert not exported, f"exported now, remove from NOT_YET_EXPORTED: {sorted(exported)}"


def test_every_panel_uses_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
