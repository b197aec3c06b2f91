"""What the sidecar tells its operator at start and about bad events (issue 18): the
tiers and where they came from, a tier that does not answer, events that name nothing."""

from __future__ import annotations

import errno
import json
import logging
from typing import Any

import pytest
from redis.asyncio import Redis

from cachesvc.config import Settings
from tests.polling import until
from tests.servers import free_port
from tests.service.conftest import MakeClient
from tests.service.test_api import assert_error
from tests.service.test_metrics import samples
from tests.sidecar import Sidecar, tiers_config


async def logged(sidecar: Sidecar, text: str) -> bool:
    return text in sidecar.log


async def test_an_unreachable_tier_is_said_once_at_start_without_delaying_it(
    redis_url: str,
) -> None:
    port = free_port()  # nothing listens there
    dead = f"memcached://127.0.0.1:{port}"
    config = tiers_config("memory://", redis_url, dead) + f'[invalidation]\nurl = "{redis_url}"\n'
    with Sidecar(config) as sidecar:
        # Sidecar.start returned: /healthz answered while the probe was under way.
        await until(
            lambda: logged(sidecar, "tier l3 is unreachable at start ("),
            10.0,
            "the start-up warning",
        )
        assert sidecar.terminate() == 0
    (line,) = [line for line in sidecar.log.splitlines() if "unreachable at start" in line]
    assert "WARNING" in line and f"([Errno {errno.ECONNREFUSED}] " in line, line  # the cause
    assert line.endswith("requests use the other tiers until it answers")


def test_indexed_tier_variables_override_the_embedded_default() -> None:
    with Sidecar(env={"CACHESVC_TIERS__0__TTL": "60"}) as sidecar:
        assert sidecar.terminate() == 0
    assert "tiers (from the environment): l1=memory:// (ttl 60 s)" in sidecar.log
    assert "embedded default" not in sidecar.log


def test_a_configured_memory_tier_is_not_called_the_embedded_default() -> None:
    with Sidecar(tiers_config("memory://")) as sidecar:
        assert sidecar.terminate() == 0
    assert f"tiers (from {sidecar.config_path}): l1=memory://" in sidecar.log
    assert "embedded default" not in sidecar.log


async def test_events_that_name_nothing_are_counted_as_malformed(
    make_client: MakeClient, clean_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await subscribed(make_client, clean_redis_url)
    publisher = Redis.from_url(clean_redis_url)
    try:
        for event in ({}, {"keyz": ["user:42"]}):
            assert await publisher.publish("cachesvc:invalidate", json.dumps(event)) == 1
    finally:
        await publisher.aclose()

    async def counted() -> dict[str, float]:
        found = samples(await (await client.get("/metrics")).text())
        outcomes = {
            labels[0][1]: value
            for (name, labels), value in found.items()
            if name == "cachesvc_invalidation_events_total"
        }
        return outcomes if outcomes.get("malformed") == 2 else {}

    outcomes = await until(counted, 5.0, "both events counted as malformed")
    assert outcomes.get("applied", 0) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "malformed invalidation event from redis (nothing to invalidate: give keys, prefixes "
        "or tags (unknown fields ignored: keyz))" in message
        for message in messages
    ), messages


async def test_invalidate_without_anything_to_invalidate_is_a_clear_400(
    make_client: MakeClient,
) -> None:
    client = await make_client()
    for body in ({}, {"keyz": ["user:42"]}):
        error = await assert_error(await client.post("/v1/invalidate", json=body), 400)
        assert error["detail"].startswith("nothing to invalidate: give keys, prefixes or tags")


async def ready(client: Any) -> bool:
    return (await client.get("/readyz")).status == 200


async def subscribed(make_client: MakeClient, redis_url: str) -> Any:
    """A sidecar with one memory tier, subscribed to invalidations on ``redis_url``."""
    settings = Settings.model_validate(
        {"tiers": [{"url": "memory://"}], "invalidation": {"url": redis_url}}
    )
    client = await make_client(settings)
    await until(lambda: ready(client), 5.0, "subscribed")
    return client


async def test_a_clean_stop_does_not_say_the_invalidation_source_was_lost(
    make_client: MakeClient, clean_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = await subscribed(make_client, clean_redis_url)
    await client.close()
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert lost == []
