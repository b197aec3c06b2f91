"""A history checker in the style of Jepsen's, for sidecars sharing their tiers.

A *history* is every operation the clients made: its kind and arguments, the interval it
took (``start`` taken before the request was sent, ``end`` after the whole answer was read,
both on one monotonic clock) and the answer. The recorded interval holds the real one, so
"A ended before B started" in the record is true of the real operations, and that is the
only order the checker relies on: versions come from the one wall clock of this host, so
a write that ended before another started has the lower version, whichever sidecars
served them. Operations that overlap may have taken effect in either order, and are never
held against each other.

An operation's outcome is ``ok`` (answered 2xx, or 404 for a read), ``maybe`` (503 or any
5xx, or no answer at all: it may or may not have taken effect) or ``failed`` (any other
answer: it must have had no effect). Only ``ok`` writes, deletes and invalidations are
*acknowledged*; every written value is unique, so a read names the write it came from.

What ``check`` finds:

- **stale reads**: a read that starts more than ``slack`` seconds after the end of an
  acknowledged operation O and returns what O superseded: a value whose write ended before
  O started, where O is a write or delete of the key, an invalidation of the key or of a
  prefix of it, or of a tag the value was written with; or "absent" (404) although an
  acknowledged write W ended more than ``slack`` before the read, and no delete or
  invalidation that may have taken effect explains it (one that did not end before W
  started, and started before the read ended, covering W — or covering a write W' not
  older than W that carried the invalidated tag: a hidden entry hides every older version
  of its key);
- **unknown values**: a value no write of that key could have put there (never written,
  written by a write that failed, or read before its write began);
- **lost writes**: a stale read of the final round (after quiescing) whose superseding
  operation is a write: an acknowledged write is gone;
- **ETag conflicts**: one ETag naming two values, or a value read under another ETag than
  the one its write was answered with;
- **disagreeing keys**: keys for which the sidecars' answers in the final round differ.

Write-behind writes reach the lower tiers asynchronously, and a peer with an in-process top
tier, or any sidecar reading the durable tier only while its invalidation source is lost,
serves what those hold until then: no time bound is promised. So an acknowledged
write-behind write supersedes older values only for reads that start after the history's
``quiesced_at`` (the journal drained); before that, reads it alone would make stale are
counted apart (``write_behind_lag``), not as violations.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["get", "put", "delete", "invalidate"]
Outcome = Literal["ok", "maybe", "failed"]

SLACK = 1.0  # seconds: "always within 1 s" (invalidation events, announcements of writes)


@dataclass(frozen=True)
class Op:
    """One operation of a history. ``key`` for get, put and delete; ``value`` what a put
    wrote or a read returned (200); ``tags`` a put's tags or an invalidation's;
    ``status`` None when no answer came."""

    id: int
    process: str
    sidecar: int
    kind: Kind
    start: float
    end: float
    status: int | None
    key: str = ""
    value: bytes = b""
    strategy: str = ""
    tags: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    etag: str | None = None
    tier: str | None = None
    final: bool = False  # a read of the final round, after quiescing
    detail: str = ""  # the body of an error answer, or why no answer came

    @property
    def outcome(self) -> Outcome:
        if self.status is None or self.status >= 500:
            return "maybe"
        if 200 <= self.status < 300 or (self.kind == "get" and self.status == 404):
            return "ok"
        return "failed"

    @property
    def absent(self) -> bool:
        return self.kind == "get" and self.status == 404

    def covers_key(self, key: str) -> bool:
        """A delete or invalidation that removes ``key`` whatever its tags."""
        if self.kind == "delete":
            return self.key == key
        if self.kind == "invalidate":
            return key in self.keys or any(key.startswith(p) for p in self.prefixes)
        return False

    def describe(self) -> str:
        what = {
            "get": f"GET {self.key}",
            "put": f"PUT {self.key}={self.value.decode(errors='replace')} ({self.strategy}"
            + (f", tags {','.join(self.tags)}" if self.tags else "")
            + ")",
            "delete": f"DELETE {self.key}",
            "invalidate": "INVALIDATE "
            + " ".join(
                [f"keys={','.join(self.keys)}"] * bool(self.keys)
                + [f"prefixes={','.join(self.prefixes)}"] * bool(self.prefixes)
                + [f"tags={','.join(self.tags)}"] * bool(self.tags)
            ),
        }[self.kind]
        answer = "no answer" if self.status is None else str(self.status)
        if self.detail:
            answer += f" ({self.detail})"
        if self.kind == "get" and self.status == 200:
            answer += f" {self.value.decode(errors='replace')} from {self.tier}"
        if self.etag:
            answer += f" ETag {self.etag}"
        return (
            f"#{self.id} {self.process}@sidecar{self.sidecar} [{self.start:.3f}, "
            f"{self.end:.3f}] {what} -> {answer}"
        )


@dataclass(frozen=True)
class Violation:
    read: Op
    because: Op | None  # the operation that makes it a violation, if one does
    reason: str

    def describe(self) -> str:
        lines = [f"{self.reason}:", f"  read   {self.read.describe()}"]
        if self.because is not None:
            lines.append(f"  after  {self.because.describe()}")
        return "\n".join(lines)


@dataclass
class Report:
    operations: int
    stale_reads: list[Violation] = field(default_factory=list)
    unknown_values: list[Violation] = field(default_factory=list)
    lost_writes: list[Violation] = field(default_factory=list)
    etag_conflicts: list[Violation] = field(default_factory=list)
    disagreeing_keys: dict[str, list[Op]] = field(default_factory=dict)
    # Seconds after an acknowledged write-behind write that reads returned what it replaced
    # (before quiescing: not a violation, see the module's docstring).
    write_behind_lag: list[float] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "operations": self.operations,
            "stale reads": len(self.stale_reads),
            "disagreeing keys": len(self.disagreeing_keys),
            "lost writes": len(self.lost_writes),
            "unknown values": len(self.unknown_values),
            "etag conflicts": len(self.etag_conflicts),
        }

    @property
    def violations(self) -> int:
        return sum(count for name, count in self.counts().items() if name != "operations")

    def summary(self) -> str:
        counts = ", ".join(f"{name} {count}" for name, count in self.counts().items())
        lag = self.write_behind_lag
        if lag:
            counts += f"; reads behind a write-behind write {len(lag)} (up to {max(lag):.2f} s)"
        return counts

    def details(self, limit: int = 10) -> str:
        """The first ``limit`` violations of each kind, described."""
        sections = []
        for name, found in (
            ("stale reads", self.stale_reads),
            ("lost writes", self.lost_writes),
            ("unknown values", self.unknown_values),
            ("ETag conflicts", self.etag_conflicts),
        ):
            if found:
                shown = "\n".join(v.describe() for v in found[:limit])
                sections.append(f"{name} ({len(found)}):\n{shown}")
        if self.disagreeing_keys:
            lines = []
            for key, answers in list(self.disagreeing_keys.items())[:limit]:
                lines.append(f"  {key}:")
                lines += [f"    {op.describe()}" for op in answers]
            sections.append(
                f"disagreeing keys ({len(self.disagreeing_keys)}):\n" + "\n".join(lines)
            )
        return "\n\n".join(sections)


class _Running:
    """Operations sorted by ``order``, with the running best (highest ``best``) of each
    prefix: which of the operations whose ``order`` is below ``t`` has the highest ``best``,
    in O(log n)."""

    def __init__(
        self, ops: Iterable[Op], order: Callable[[Op], float], best: Callable[[Op], float]
    ) -> None:
        self.ops = sorted(ops, key=order)
        self.orders = [order(op) for op in self.ops]
        self.leaders: list[Op] = []
        leader: Op | None = None
        for op in self.ops:
            if leader is None or best(op) > best(leader):
                leader = op
            self.leaders.append(leader)

    def best_below(self, t: float) -> Op | None:
        index = bisect.bisect_left(self.orders, t)
        return self.leaders[index - 1] if index else None


def _by_end(ops: Iterable[Op]) -> _Running:
    """Query: of the operations that ended before t, the one that started last."""
    return _Running(ops, lambda op: op.end, lambda op: op.start)


def _by_start(ops: Iterable[Op]) -> _Running:
    """Query: of the operations that started before t, the one that ended last."""
    return _Running(ops, lambda op: op.start, lambda op: op.end)


class _Index:
    """The history arranged for the per-read questions."""

    def __init__(self, ops: Sequence[Op], slack: float) -> None:
        self.slack = slack
        keys = sorted({op.key for op in ops if op.key} | {k for op in ops for k in op.keys})
        removals = [op for op in ops if op.kind in ("delete", "invalidate")]
        puts = [op for op in ops if op.kind == "put"]
        self.max_duration = max((op.end - op.start for op in ops), default=0.0)
        self.writes = {op.value: op for op in puts}

        def acked_puts(key: str, write_behind: bool) -> list[Op]:
            return [
                op
                for op in puts
                if op.key == key
                and op.outcome == "ok"
                and (op.strategy == "write-behind") == write_behind
            ]

        self.superseding: dict[str, _Running] = {}  # acked: not write-behind puts, removals
        self.superseding_wb: dict[str, _Running] = {}  # acked write-behind puts
        self.acked: dict[str, _Running] = {}  # acked puts but write-behind ones
        self.acked_all: dict[str, _Running] = {}  # every acked put
        self.removals: dict[str, _Running] = {}  # removals that may have happened
        self.puts: dict[str, list[Op]] = {}  # puts that may have happened, by end
        self.put_ends: dict[str, list[float]] = {}
        for key in keys:
            covering = [op for op in removals if op.covers_key(key)]
            others = acked_puts(key, write_behind=False)
            behind = acked_puts(key, write_behind=True)
            self.superseding[key] = _by_end(others + [op for op in covering if op.outcome == "ok"])
            self.superseding_wb[key] = _by_end(behind)
            self.acked[key] = _by_end(others)
            self.acked_all[key] = _by_end(others + behind)
            self.removals[key] = _by_start(op for op in covering if op.outcome != "failed")
            self.puts[key] = sorted(
                (op for op in puts if op.key == key and op.outcome != "failed"),
                key=lambda op: op.end,
            )
            self.put_ends[key] = [op.end for op in self.puts[key]]
        tags = {tag for op in ops for tag in op.tags}
        tag_removals = [op for op in removals if op.kind == "invalidate" and op.tags]
        self.tag_superseding = {
            tag: _by_end(op for op in tag_removals if tag in op.tags and op.outcome == "ok")
            for tag in tags
        }
        self.tag_removals = {
            tag: _by_start(op for op in tag_removals if tag in op.tags and op.outcome != "failed")
            for tag in tags
        }

    # -- a read that returned a value ------------------------------------------------

    def superseded_value(self, read: Op, write: Op, with_write_behind: bool) -> Op | None:
        """An acknowledged operation that replaced ``write`` and ended more than the slack
        before ``read`` started."""
        before = read.start - self.slack
        candidates = [self.superseding[read.key].best_below(before)]
        candidates += [self.tag_superseding[tag].best_below(before) for tag in write.tags]
        if with_write_behind:
            candidates.append(self.superseding_wb[read.key].best_below(before))
        return next((op for op in candidates if op is not None and op.start > write.end), None)

    # -- a read that found nothing ----------------------------------------------------

    def unexplained_absence(self, read: Op, with_write_behind: bool) -> Op | None:
        """An acknowledged write that ended more than the slack before ``read`` started
        and that no removal which may have happened explains the absence of."""
        acked = (self.acked_all if with_write_behind else self.acked)[read.key]
        index = bisect.bisect_left(acked.orders, read.start - self.slack)
        if not index:
            return None
        # The latest writes: those that no other write of the set ended before. (A removal
        # that explains the absence of a write explains that of every write before it.)
        latest_start = acked.leaders[index - 1].start
        position = index - 1
        while position >= 0 and acked.ops[position].end >= latest_start:
            write = acked.ops[position]
            if not self._removed(read, write):
                return write
            position -= 1
        return None

    def _removed(self, read: Op, write: Op) -> bool:
        """Whether a removal that may have happened before ``read`` ended, and not before
        ``write`` started, hid ``write``: covering its key, one of its tags, or a tag of a
        write of the key that is not older than ``write`` (which hides the older ones)."""
        removal = self.removals[read.key].best_below(read.end)
        if removal is not None and removal.end >= write.start:
            return True
        if any(self._tag_removed(tag, read, write.start) for tag in write.tags):
            return True
        puts = self.puts[read.key]
        first = bisect.bisect_left(self.put_ends[read.key], write.start)
        for later in puts[first:]:
            if later.start >= read.end:
                if later.end > read.end + self.max_duration:
                    break  # sorted by end: every further write started after the read
                continue
            since = max(write.start, later.start)
            if any(self._tag_removed(tag, read, since) for tag in later.tags):
                return True
        return False

    def _tag_removed(self, tag: str, read: Op, since: float) -> bool:
        removal = self.tag_removals[tag].best_below(read.end)
        return removal is not None and removal.end >= since


def check(ops: Sequence[Op], quiesced_at: float | None = None, slack: float = SLACK) -> Report:
    """Check a history (see the module's docstring). ``quiesced_at``: when every fault was
    healed and the write-behind journal drained (None: never)."""
    index = _Index(ops, slack)
    report = Report(operations=len(ops))
    reads = [op for op in ops if op.kind == "get" and op.outcome == "ok"]
    for read in reads:
        after_quiesce = quiesced_at is not None and read.start >= quiesced_at
        culprit: Op | None
        if read.absent:
            culprit = index.unexplained_absence(read, with_write_behind=after_quiesce)
            lag_culprit = (
                None
                if culprit is not None or after_quiesce
                else index.unexplained_absence(read, with_write_behind=True)
            )
            reason = "absent after an acknowledged write"
        else:
            write = index.writes.get(read.value)
            problem = _unknown(read, write)
            if problem is not None:
                report.unknown_values.append(Violation(read, write, problem))
                continue
            assert write is not None
            culprit = index.superseded_value(read, write, with_write_behind=after_quiesce)
            lag_culprit = (
                None
                if culprit is not None or after_quiesce
                else index.superseded_value(read, write, with_write_behind=True)
            )
            reason = "a value older than an acknowledged operation"
        if culprit is not None:
            late = read.start - culprit.end
            violation = Violation(read, culprit, f"{reason} ({late:.2f} s after it)")
            if read.final and culprit.kind == "put":
                report.lost_writes.append(violation)
            else:
                report.stale_reads.append(violation)
        elif lag_culprit is not None:
            report.write_behind_lag.append(read.start - lag_culprit.end)
    report.etag_conflicts = _etag_conflicts(ops)
    report.disagreeing_keys = _disagreements(ops)
    return report


def _unknown(read: Op, write: Op | None) -> str | None:
    if write is None:
        return "a value nobody wrote"
    if write.key != read.key:
        return f"a value written to another key ({write.key})"
    if write.outcome == "failed":
        return "a value whose write failed"
    if write.start > read.end:
        return "a value read before its write began"
    return None


def _etag_conflicts(ops: Sequence[Op]) -> list[Violation]:
    named: dict[str, Op] = {}  # ETag -> the first operation that showed it with a value
    written: dict[bytes, Op] = {}  # value -> its acknowledged write
    found: list[Violation] = []
    for op in sorted(ops, key=lambda op: op.end):
        if op.etag is None or op.outcome != "ok" or op.kind not in ("get", "put"):
            continue
        if op.kind == "get" and op.status != 200:
            continue
        if op.kind == "put":
            written[op.value] = op
        first = named.setdefault(op.etag, op)
        if first.value != op.value:
            found.append(Violation(op, first, f"ETag {op.etag} names two values"))
            continue
        write = written.get(op.value)
        if op.kind == "get" and write is not None and write.etag != op.etag:
            found.append(Violation(op, write, "a value read under another ETag than its write's"))
    return found


def _disagreements(ops: Sequence[Op]) -> dict[str, list[Op]]:
    answers: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "get" and op.final:
            answers[op.key].append(op)
    return {
        key: sorted(found, key=lambda op: op.sidecar)
        for key, found in sorted(answers.items())
        if len({(op.status, op.value, op.etag) for op in found}) > 1
    }
