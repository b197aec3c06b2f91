"""The history checker (tests/history.py) on hand-made histories: legitimate ones pass,
each kind of violation is found."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.history import Op, Report, check


class History:
    """Builds a history; times in seconds."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def _add(self, kind: Any, start: float, end: float, status: int | None, **fields: Any) -> Op:
        sidecar = fields.pop("sidecar", 0)
        op = Op(len(self.ops), f"c{len(self.ops)}", sidecar, kind, start, end, status, **fields)
        self.ops.append(op)
        return op

    def put(
        self,
        key: str,
        value: str,
        start: float,
        end: float,
        status: int | None = 204,
        strategy: str = "write-through",
        tags: tuple[str, ...] = (),
        etag: str | None = None,
    ) -> Op:
        if strategy == "write-behind" and status == 204:
            status = 202
        return self._add(
            "put",
            start,
            end,
            status,
            key=key,
            value=value.encode(),
            strategy=strategy,
            tags=tags,
            etag=etag if etag is not None else (f'"{value}"' if status in (202, 204) else None),
        )

    def get(
        self,
        key: str,
        start: float,
        end: float,
        value: str | None = None,
        etag: str | None = None,
        final: bool = False,
        sidecar: int = 0,
    ) -> Op:
        if value is None:
            return self._add("get", start, end, 404, key=key, final=final, sidecar=sidecar)
        return self._add(
            "get",
            start,
            end,
            200,
            key=key,
            value=value.encode(),
            etag=etag if etag is not None else f'"{value}"',
            tier="l1",
            final=final,
            sidecar=sidecar,
        )

    def delete(self, key: str, start: float, end: float, status: int | None = 204) -> Op:
        return self._add("delete", start, end, status, key=key)

    def invalidate(
        self,
        start: float,
        end: float,
        status: int | None = 202,
        keys: tuple[str, ...] = (),
        prefixes: tuple[str, ...] = (),
        tags: tuple[str, ...] = (),
    ) -> Op:
        return self._add("invalidate", start, end, status, keys=keys, prefixes=prefixes, tags=tags)

    def check(self, quiesced_at: float | None = None) -> Report:
        return check(self.ops, quiesced_at)


def clean(report: Report) -> bool:
    return report.violations == 0


# -- legitimate histories ------------------------------------------------------------------


def test_a_read_after_a_write_returns_it() -> None:
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.get("k", 0.2, 0.3, "v1")
    h.get("k", 0.2, 0.3, "v1", final=True, sidecar=1)
    h.get("k", 0.2, 0.3, "v1", final=True, sidecar=2)
    report = h.check()
    assert clean(report), report.details()
    assert report.operations == 4


def test_absent_before_any_write_and_during_overlapping_ones() -> None:
    h = History()
    h.get("k", 0.0, 0.1)
    h.put("k", "v1", 0.2, 0.5)
    h.get("k", 0.3, 0.4)  # overlaps the write
    assert clean(h.check())


def test_an_older_value_within_the_slack_or_overlapping_the_newer_write() -> None:
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.put("k", "v2", 0.2, 0.3)
    h.get("k", 1.2, 1.25, "v1")  # 0.9 s after v2's answer: within the slack
    h.put("k", "v3", 2.0, 3.0)
    h.get("k", 2.5, 3.5, "v2")  # overlaps v3
    assert clean(h.check())


def test_concurrent_writes_may_end_either_way() -> None:
    for last in ("v1", "v2"):
        h = History()
        h.put("k", "v1", 0.0, 0.5)
        h.put("k", "v2", 0.1, 0.6)
        h.get("k", 5.0, 5.1, last, final=True)
        assert clean(h.check()), last


def test_a_maybe_write_may_or_may_not_have_happened() -> None:
    for status in (503, None):
        h = History()
        h.put("k", "v1", 0.0, 0.1)
        h.put("k", "v2", 0.2, 2.2, status=status)
        h.get("k", 5.0, 5.1, "v2")
        h.get("k", 6.0, 6.1, "v2")
        assert clean(h.check()), status
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.put("k", "v2", 0.2, 2.2, status=503)
    h.get("k", 5.0, 5.1, "v1")
    assert clean(h.check())


def test_absent_after_a_delete_or_an_invalidation() -> None:
    removals: list[Callable[[History], Op]] = [
        lambda h: h.delete("user:1", 1.0, 1.1),
        lambda h: h.invalidate(1.0, 1.1, keys=("user:1",)),
        lambda h: h.invalidate(1.0, 1.1, prefixes=("user:",)),
        lambda h: h.invalidate(1.0, 1.1, tags=("t",)),
        lambda h: h.delete("user:1", 1.0, 3.0, status=503),  # maybe: it may have happened
        lambda h: h.delete("user:1", 0.05, 0.2),  # overlaps the write
    ]
    for remove in removals:
        h = History()
        h.put("user:1", "v1", 0.1, 0.2, tags=("t",))
        remove(h)
        h.get("user:1", 5.0, 5.1, final=True)
        assert clean(h.check()), h.ops[1].describe()


def test_a_tag_invalidation_hides_the_older_values_below_a_tagged_one() -> None:
    """v1 has no tag, v2 (a write that may have happened) has tag t; invalidating t hides
    v2 and, below it, v1."""
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.put("k", "v2", 0.2, 2.2, status=503, tags=("t",))
    h.invalidate(2.5, 2.6, tags=("t",))
    h.get("k", 5.0, 5.1, final=True)
    assert clean(h.check())


def test_an_invalidation_of_another_tag_or_prefix_leaves_a_value() -> None:
    h = History()
    h.put("a:1", "v1", 0.0, 0.1, tags=("t",))
    h.invalidate(0.2, 0.3, tags=("u",), prefixes=("b:",))
    h.get("a:1", 5.0, 5.1, "v1", final=True)
    assert clean(h.check())


def test_a_write_after_an_invalidation_is_not_hidden() -> None:
    h = History()
    h.invalidate(0.0, 0.1, tags=("t",), prefixes=("k",))
    h.put("k", "v1", 0.2, 0.3, tags=("t",))
    h.get("k", 5.0, 5.1, "v1", final=True)
    assert clean(h.check())


def test_write_behind_counts_only_after_quiescing() -> None:
    """Before the journal is drained a write-behind write may not have reached what a
    reader reads: measured as lag, not a violation."""
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.put("k", "v2", 0.2, 0.3, strategy="write-behind")
    h.get("k", 3.3, 3.4, "v1")
    h.get("k", 3.5, 3.6)  # but v1 was acknowledged, and nothing removed it
    report = h.check(quiesced_at=10.0)
    assert len(report.stale_reads) == 1
    assert report.write_behind_lag == [3.0]


# -- violations ----------------------------------------------------------------------------


def test_an_older_value_after_the_slack_is_stale() -> None:
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    newer = h.put("k", "v2", 0.2, 0.3, strategy="cache-aside")
    read = h.get("k", 1.4, 1.5, "v1")
    report = h.check()
    assert [(v.read, v.because) for v in report.stale_reads] == [(read, newer)]
    assert "1.10 s after" in report.stale_reads[0].reason


def test_a_value_after_a_delete_or_invalidation_is_stale() -> None:
    removals: list[Callable[[History], Op]] = [
        lambda h: h.delete("user:1", 1.0, 1.1),
        lambda h: h.invalidate(1.0, 1.1, keys=("user:1",)),
        lambda h: h.invalidate(1.0, 1.1, prefixes=("us",)),
        lambda h: h.invalidate(1.0, 1.1, tags=("t2",)),
    ]
    for remove in removals:
        h = History()
        h.put("user:1", "v1", 0.0, 0.1, tags=("t1", "t2"))
        remove(h)
        h.get("user:1", 2.5, 2.6, "v1")
        report = h.check()
        assert len(report.stale_reads) == 1, h.ops[1].describe()


def test_absent_after_an_acknowledged_write_is_stale_and_finally_a_lost_write() -> None:
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.get("k", 1.5, 1.6)
    h.get("k", 5.0, 5.1, final=True)
    report = h.check()
    assert len(report.stale_reads) == 1
    assert len(report.lost_writes) == 1


def test_a_removal_that_ended_before_the_write_began_explains_nothing() -> None:
    h = History()
    h.put("k", "v0", 0.0, 0.1, tags=("t",))
    h.delete("k", 0.2, 0.3)
    h.invalidate(0.2, 0.3, tags=("t",))
    h.put("k", "v1", 0.4, 0.5, tags=("t",))
    h.get("k", 5.0, 5.1, final=True)
    assert len(h.check().lost_writes) == 1


def test_a_tag_invalidation_older_than_the_tagged_write_explains_nothing() -> None:
    """v1 (no tag) acknowledged; v2 (tag t) written after an invalidation of t: that
    invalidation cannot have hidden v2, nor v1 below it."""
    h = History()
    h.invalidate(0.0, 0.1, tags=("t",))
    h.put("k", "v1", 0.0, 0.2)
    h.put("k", "v2", 0.3, 0.4, status=503, tags=("t",))
    h.get("k", 5.0, 5.1, final=True)
    assert len(h.check().lost_writes) == 1


def test_a_lost_write_behind_write_after_quiescing() -> None:
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.put("k", "v2", 0.2, 0.3, strategy="write-behind")
    h.get("k", 11.0, 11.1, "v1", final=True)
    report = h.check(quiesced_at=10.0)
    assert len(report.lost_writes) == 1
    assert report.write_behind_lag == []


def test_a_value_resurrected_after_quiescing_is_a_stale_read() -> None:
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.delete("k", 0.2, 0.3)
    h.get("k", 11.0, 11.1, "v1", final=True)
    report = h.check(quiesced_at=10.0)
    assert (len(report.stale_reads), len(report.lost_writes)) == (1, 0)


def test_values_nobody_could_have_written() -> None:
    h = History()
    h.put("k", "v1", 1.0, 1.1)
    h.put("k", "bad", 1.0, 1.1, status=400)
    h.put("other", "o1", 0.0, 0.1)
    h.get("k", 0.0, 0.5, "v1")  # before its write began
    h.get("k", 2.0, 2.1, "bad")
    h.get("k", 2.0, 2.1, "o1")
    h.get("k", 2.0, 2.1, "never")
    reasons = [v.reason for v in h.check().unknown_values]
    assert reasons == [
        "a value read before its write began",
        "a value whose write failed",
        "a value written to another key (other)",
        "a value nobody wrote",
    ]


def test_one_etag_names_one_value() -> None:
    h = History()
    h.put("k", "v1", 0.0, 0.1, etag='"7"')
    h.put("k", "v2", 0.0, 0.1, etag='"7"')
    assert len(h.check().etag_conflicts) == 1
    h = History()
    h.put("k", "v1", 0.0, 0.1, etag='"7"')
    h.get("k", 0.2, 0.3, "v1", etag='"8"')
    assert len(h.check().etag_conflicts) == 1
    h = History()
    h.put("k", "v1", 0.0, 0.1, etag='"7"')
    h.put("k", "v2", 0.2, 0.3, status=503)
    h.get("k", 0.4, 0.5, "v2", etag='"7"')
    assert len(h.check().etag_conflicts) == 1


def test_sidecars_that_answer_differently_in_the_final_round() -> None:
    h = History()
    h.put("k", "v1", 0.0, 0.1)
    h.put("k", "v2", 0.0, 0.1)
    h.get("k", 5.0, 5.1, "v1", final=True, sidecar=0)
    h.get("k", 5.0, 5.1, "v2", final=True, sidecar=1)
    report = h.check()
    assert list(report.disagreeing_keys) == ["k"]
    assert report.violations == 1
