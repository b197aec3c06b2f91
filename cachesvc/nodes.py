"""A tier of independent nodes (``Tier.nodes()``), as the engine sees one ``TierSlot``.

A prototype for the engine side of "a node that fails affects only the keys it holds":
``NodeSlots`` has the ``TierSlot`` calls the engine makes (``readable``, ``get``, ``set``,
``set_many``, ``miss``, ``repair``, ``probe``, ``state``, ``missed``, ``close``) and is made
of one ``TierSlot`` per node, plus one for the gutter, each with its own timeout, circuit
breaker and record of missed keys (``parts``). Every call goes to the node that holds its
key (``Tier.node_for``), so a hung node opens its own breaker and no other.

While a node's breaker is not closed, its keys go to the gutter, if the tier has one:

- reads are answered by the gutter, once ``gutter.ttl`` has passed since that node last
  came back. The gutter keeps no value longer than its ttl, so by then it holds nothing
  from an earlier outage that a write the node took since would have replaced; until
  then reads of the node's keys go to the node, which refuses them at once (breaker open)
  and the engine reads the tiers below, as without a gutter;
- writes, deletes and fills are stored in the gutter (its ttl caps their lifetime), and the
  call still raises ``TierUnavailable``: the node did not take them. So the engine records
  a write as missed by the tier (``miss``, kept by the node) and the node is repaired once
  it is back, as any tier; a fill's failure it ignores, as always. What the gutter could
  not take it records as missed itself, and is not read for that key until repaired.

Without a gutter, a node that is down refuses its keys' calls at once and the engine falls
through to the tiers below for those keys only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from cachesvc.metrics import TierMetrics
from cachesvc.slot import PartlyFailed, TierSlot
from tiers.base import Payload, Tier, TierError, TierUnavailable, TierWrite


class NodeSlots:
    def __init__(
        self, tier: Tier, slot_for: Callable[[Tier], TierSlot], metrics: TierMetrics
    ) -> None:
        """``slot_for`` makes the ``TierSlot`` of one node (or of the gutter) with the
        tier's timeout and breaker settings and metrics labelled with the node's name;
        ``metrics`` are the whole tier's (its hits, misses and promotions)."""
        if not tier.nodes():
            raise ValueError(f"tier {tier.name!r} has no nodes")
        self.tier = tier
        self.name = tier.name
        self.ttl = tier.ttl
        self.metrics = metrics
        self.suspended = False  # only in-process tiers miss invalidation events
        self.nodes = [slot_for(node) for node in tier.nodes()]
        gutter = tier.gutter()
        self.gutter = None if gutter is None else slot_for(gutter)
        # Per node: whether it was seen down, and when (monotonic) it was seen back. Seen
        # on the way of a call: later than the breaker closed, so never too early to read
        # the gutter again. At start, as if every node had just come back: the gutter may
        # hold what another sidecar put there during an outage that is over.
        self._down = [False] * len(self.nodes)
        self._back_at = [time.monotonic()] * len(self.nodes)

    @property
    def parts(self) -> Sequence[TierSlot]:
        """The slots this is made of: the nodes', then the gutter's."""
        return self.nodes + ([self.gutter] if self.gutter is not None else [])

    # -- routing -------------------------------------------------------------------------

    def _up(self, index: int) -> bool:
        up = self.nodes[index].state == "closed"
        if not up:
            self._down[index] = True
        elif self._down[index]:
            self._down[index] = False
            self._back_at[index] = time.monotonic()
        return up

    def _reader(self, key: str) -> TierSlot:
        """The slot that answers reads of ``key`` now."""
        index = self.tier.node_for(key)
        gutter = self.gutter
        if self._up(index) or gutter is None:
            return self.nodes[index]
        if time.monotonic() < self._back_at[index] + gutter.ttl:
            return self.nodes[index]  # refuses at once: the engine reads below
        return gutter

    # -- reads ---------------------------------------------------------------------------

    def readable(self, key: str) -> bool:
        return self._reader(key).readable(key)

    def get(self, key: str) -> asyncio.Future[Payload | None]:
        return self._reader(key).get(key)

    def get_now(self, key: str) -> Payload | None:
        return self._reader(key).get_now(key)

    async def get_many(self, keys: Sequence[str]) -> list[Payload | None]:
        """One call per slot the keys go to; fails when any of those fails."""
        by_slot: dict[TierSlot, list[str]] = {}
        for key in dict.fromkeys(keys):
            by_slot.setdefault(self._reader(key), []).append(key)
        slots = list(by_slot)
        answers = await asyncio.gather(*(slot.get_many(by_slot[slot]) for slot in slots))
        found: dict[str, Payload | None] = {}
        for slot, answered in zip(slots, answers, strict=True):
            found.update(zip(by_slot[slot], answered, strict=True))
        return [found[key] for key in keys]

    # -- writes --------------------------------------------------------------------------

    def set(self, write: TierWrite) -> Awaitable[None]:
        return self._set(write)

    async def _set(self, write: TierWrite) -> None:
        index = self.tier.node_for(write.key)
        node, gutter = self.nodes[index], self.gutter
        if self._up(index) or gutter is None:
            await node.set(write)
            return
        try:
            await gutter.set(write)
        except TierError:
            gutter.miss(write.key, write.version)
            raise
        raise TierUnavailable(f"tier {node.name}: down, the write went to the gutter only")

    async def set_many(self, writes: Sequence[TierWrite]) -> None:
        """One call per node (and the gutter for the nodes that are down). Raises
        ``PartlyFailed`` naming the writes a node did not take."""
        to_node: dict[int, list[TierWrite]] = {}
        for write in writes:
            to_node.setdefault(self.tier.node_for(write.key), []).append(write)
        calls: list[Awaitable[None]] = []
        groups: list[list[TierWrite]] = []
        to_gutter: list[TierWrite] = []
        for index, group in to_node.items():
            if self._up(index) or self.gutter is None:
                calls.append(self.nodes[index].set_many(group))
                groups.append(group)
            else:
                to_gutter += group
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        failed: list[TierWrite] = []
        for group, outcome in zip(groups, outcomes, strict=True):
            if isinstance(outcome, TierError):
                failed += group
            elif isinstance(outcome, BaseException):
                raise outcome
        if to_gutter:
            assert self.gutter is not None
            failed += to_gutter
            try:
                await self.gutter.set_many(to_gutter)
            except TierError:
                for write in to_gutter:
                    self.gutter.miss(write.key, write.version)
        if failed:
            raise PartlyFailed(
                f"tier {self.name}: {len(failed)} of {len(writes)} writes not taken by their node",
                failed,
            )

    def miss(self, key: str, version: int) -> None:
        """Remember that the node holding ``key`` missed its write at ``version``."""
        self.nodes[self.tier.node_for(key)].miss(key, version)

    # -- state, recovery -----------------------------------------------------------------

    @property
    def state(self) -> str:
        """ "closed" when every node's breaker is, "open" when none is, else "degraded"."""
        closed = sum(node.state == "closed" for node in self.nodes)
        if closed == len(self.nodes):
            return "closed"
        return "open" if closed == 0 else "degraded"

    @property
    def missed(self) -> dict[str, int]:
        """Every node's missed keys (the gutter's are its own business)."""
        return {key: version for node in self.nodes for key, version in node.missed.items()}

    @property
    def missed_changed(self) -> bool:
        return any(part.missed_changed for part in self.parts)

    @missed_changed.setter
    def missed_changed(self, changed: bool) -> None:
        for part in self.parts:
            part.missed_changed = changed

    async def probe(self) -> bool:
        """Ping every part (an open breaker only once its reset time passed); True when
        some node answered, so that those that did get repaired (``repair``)."""
        answered = await asyncio.gather(*(part.probe() for part in self.parts))
        return any(answered[: len(self.nodes)])

    async def repair(self) -> None:
        """Repair every part that is up; the first failure is raised once all were tried."""
        errors: list[TierError] = []
        for part in self.parts:
            if part.state == "closed" and part.missed:
                try:
                    await part.repair()
                except TierError as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    async def close(self) -> None:
        for part in self.parts:
            await part.close()
        await self.tier.close()
