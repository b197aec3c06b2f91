"""What the circuit breaker logs: the tier's name and the last failure's cause, once per
outage, with the probes in between kept out of the warnings (issue 18)."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from cachesvc.metrics import Metrics
from cachesvc.slot import TierSlot
from tests.polling import until
from tests.servers import RedisServer
from tiers.base import TierError
from tiers.redis import RedisTier


@pytest.fixture
async def slot(redis_server: RedisServer) -> AsyncIterator[TierSlot]:
    tier = RedisTier("l3", urlsplit(redis_server.url), 300)
    await tier.start()
    slot = TierSlot(
        tier,
        timeout=2,
        breaker_failures=3,
        breaker_reset=0.01,
        metrics=Metrics().for_tier("l3"),
    )
    yield slot
    await slot.close()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def fail(slot: TierSlot) -> None:
    with pytest.raises(TierError):
        await slot.get_many(["k"])


async def test_opening_names_the_tier_and_the_cause_and_closing_is_said_too(
    slot: TierSlot, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cachesvc.slot")
    redis_server.stop()
    for _ in range(3):
        await fail(slot)
    assert slot.state == "open"
    (opened,) = warnings(caplog)
    assert opened.startswith("tier l3: circuit breaker open after 3 failures (last: ")
    # The driver's own words: the refused connect, with its address.
    assert f"[Errno {errno.ECONNREFUSED}]" in opened
    assert f"('127.0.0.1', {redis_server.port})" in opened

    # The monitor's probes while the tier stays down: debug lines, no more warnings.
    for _ in range(3):
        await asyncio.sleep(slot.breaker.reset)  # the breaker admits a probe only after it
        assert not await slot.probe()
    assert warnings(caplog) == [opened]
    assert any("tier l3: probe failed" in r.getMessage() for r in caplog.records)

    redis_server.restart()
    await until(slot.probe, 5.0, "the breaker closes once the tier answers")
    closing = [r for r in caplog.records if "closed" in r.getMessage()]
    assert [r.levelno for r in closing] == [logging.INFO]
    assert (
        closing[0]
        .getMessage()
        .startswith("tier l3: circuit breaker closed, the tier answers again (after ")
    )


async def test_a_long_outage_is_said_again_now_and_then(
    slot: TierSlot,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("cachesvc.slot.STILL_DOWN_LOG_INTERVAL", 0.0)
    caplog.set_level(logging.WARNING, logger="cachesvc.slot")
    redis_server.stop()
    for _ in range(3):
        await fail(slot)
    await asyncio.sleep(slot.breaker.reset)
    assert not await slot.probe()
    still = warnings(caplog)[1]
    assert still.startswith("tier l3: still unreachable after "), still
    assert f"(last: [Errno {errno.ECONNREFUSED}] Connect call failed ('127.0.0.1', " in still


async def test_a_timeout_is_named_as_the_cause(
    slot: TierSlot, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cachesvc.slot")
    slot = TierSlot(  # its own: a slot keeps the timeout it was made with
        slot.tier, timeout=0.05, breaker_failures=3, breaker_reset=0.01, metrics=slot.metrics
    )
    redis_server.hang()
    try:
        for _ in range(3):
            await fail(slot)
    finally:
        redis_server.resume()
    assert warnings(caplog) == [
        "tier l3: circuit breaker open after 3 failures (last: no answer within 0.05 s)"
    ]
