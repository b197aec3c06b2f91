"""SPEC §3 and §5 through HTTP, on the embedded default (one memory tier)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
from yarl import URL

from cachesvc.config import Settings
from tests.service.conftest import Client, MakeClient, settings_for


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


def path(key: str, query: str = "") -> URL:
    # Dots too, or the client would resolve a key ".." as a path segment.
    encoded = "/v1/cache/" + quote(key, safe="").replace(".", "%2E")
    return URL(encoded + ("?" + query if query else ""), encoded=True)


async def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, str]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body: dict[str, str] = await response.json()
    assert set(body) >= {"error", "detail"} and body["detail"]
    if code is not None:
        assert body["error"] == code
    return body


async def test_put_get_delete_round_trip(client: Client) -> None:
    put = await client.put(
        path("user:42"), data=b'{"n": 1}', headers={"Content-Type": "application/json"}
    )
    assert put.status == 204
    etag = put.headers["ETag"]
    assert etag.startswith('"') and etag.strip('"').isdigit()

    got = await client.get(path("user:42"))
    assert got.status == 200
    assert await got.read() == b'{"n": 1}'
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Cache-Tier"] == "l1"
    assert got.headers["ETag"] == etag

    assert (await client.delete(path("user:42"))).status == 204
    await assert_error(await client.get(path("user:42")), 404, "not_found")
    assert (await client.delete(path("user:42"))).status == 204  # absent: still 204


async def test_default_content_type_and_binary_value(client: Client) -> None:
    value = bytes(range(256)) * 256  # 64 KiB, every byte value
    assert (await client.put(path("bin"), data=value, headers={"Content-Type": ""})).status == 204
    got = await client.get(path("bin"))
    assert await got.read() == value
    assert got.headers["Content-Type"] == "application/octet-stream"


async def test_empty_value_is_a_value(client: Client) -> None:
    assert (await client.put(path("empty"), data=b"")).status == 204
    got = await client.get(path("empty"))
    assert got.status == 200 and await got.read() == b""


async def test_later_write_wins_and_etag_grows(client: Client) -> None:
    first = await client.put(path("k"), data=b"1")
    second = await client.put(path("k"), data=b"2")
    assert int(second.headers["ETag"].strip('"')) > int(first.headers["ETag"].strip('"'))
    assert await (await client.get(path("k"))).read() == b"2"


async def test_if_none_match_answers_304(client: Client) -> None:
    etag = (await client.put(path("k"), data=b"v")).headers["ETag"]
    got = await client.get(path("k"), headers={"If-None-Match": etag})
    assert got.status == 304 and await got.read() == b""
    for header in (f'"1", W/{etag}', "*"):
        assert (await client.get(path("k"), headers={"If-None-Match": header})).status == 304
    assert (await client.get(path("k"), headers={"If-None-Match": '"1"'})).status == 200


@pytest.mark.parametrize(
    "key",
    ["a/b?c=d#e", "100%", "ключ:ü", "a+b&c=d;e", "x" * 250, "é" * 125, "😀:emoji", "..", "%2F"],
)
async def test_utf8_keys_with_reserved_characters(client: Client, key: str) -> None:
    value = key.encode()
    assert (await client.put(path(key), data=value)).status == 204
    got = await client.get(path(key))
    assert got.status == 200 and await got.read() == value


async def test_encoded_and_literal_slash_name_the_same_key(client: Client) -> None:
    await client.put("/v1/cache/a%2Fb", data=b"v")
    assert await (await client.get("/v1/cache/a/b")).read() == b"v"


@pytest.mark.parametrize(
    "raw_path",
    [
        "/v1/cache/",  # empty
        "/v1/cache/" + "x" * 251,  # too long
        "/v1/cache/" + "é" * 126,  # 252 bytes
        "/v1/cache/a%20b",  # space
        "/v1/cache/a%09b",  # tab
        "/v1/cache/a%0Ab",  # newline
        "/v1/cache/a%00b",  # NUL
        "/v1/cache/a%7Fb",  # DEL
        "/v1/cache/a%C2%85b",  # NEL (C1 control)
        "/v1/cache/a%E2%80%A8b",  # line separator (Unicode whitespace)
        "/v1/cache/%FF%FE",  # not UTF-8
    ],
)
async def test_bad_keys_are_400(client: Client, raw_path: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = await client.request(method, raw_path, data=b"v" if method == "PUT" else None)
        await assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "query",
    [
        "ttl=0",
        "ttl=-1",
        "ttl=abc",
        "ttl=nan",
        "ttl=inf",
        "ttl=",
        "strategy=bogus",
        "tll=5",
        "tags=a,,b",
        "tags=a%20b",
    ],
)
async def test_bad_put_parameters_are_400(client: Client, query: str) -> None:
    response = await client.put(path("k", query), data=b"v")
    await assert_error(response, 400, "bad_request")
    await assert_error(await client.get(path("k")), 404)  # nothing was stored


async def test_unknown_strategy_header_is_400(client: Client) -> None:
    response = await client.put(path("k"), data=b"v", headers={"X-Cache-Strategy": "nope"})
    await assert_error(response, 400)


async def test_body_over_limit_is_413(make_client: MakeClient) -> None:
    client = await make_client(Settings.model_validate({"server": {"max_body_bytes": 1024}}))
    await assert_error(await client.put(path("k"), data=b"x" * 1025), 413, "payload_too_large")

    async def chunks() -> Any:
        for _ in range(10):
            yield b"y" * 200

    await assert_error(await client.put(path("k"), data=chunks()), 413)

    async def one_past_the_limit() -> Any:
        yield b"z" * 1000
        yield b"z" * 25

    await assert_error(await client.put(path("k"), data=one_past_the_limit()), 413)
    assert (await client.put(path("k"), data=b"x" * 1024)).status == 204
    assert len(await (await client.get(path("k"))).read()) == 1024


async def test_unknown_route_and_method_are_json(client: Client) -> None:
    await assert_error(await client.get("/nope"), 404)
    response = await client.post(path("k"), data=b"v")
    await assert_error(response, 405)
    assert "PUT" in response.headers["Allow"]


async def test_ttl_expires(client: Client) -> None:
    assert (await client.put(path("short", "ttl=0.3"), data=b"v")).status == 204
    written = time.monotonic()
    assert (await client.get(path("short"))).status == 200
    while (status := (await client.get(path("short"))).status) == 200:
        assert time.monotonic() - written < 2.0, "the entry outlived its ttl"
        await asyncio.sleep(0.02)
    assert status == 404
    assert time.monotonic() - written >= 0.3


async def test_cache_aside_and_explicit_strategies(client: Client) -> None:
    for strategy in ("write-through", "cache-aside"):
        response = await client.put(path(strategy, f"strategy={strategy}"), data=b"v")
        assert response.status == 204
        assert (await client.get(path(strategy))).status == 200


async def test_write_behind_on_a_single_tier_is_202(client: Client) -> None:
    # Nothing below the top tier to fill later: the write is complete at once.
    response = await client.put(path("k", "strategy=write-behind"), data=b"v")
    assert response.status == 202
    assert await (await client.get(path("k"))).read() == b"v"


async def test_write_behind_without_a_journal_is_503(make_client: MakeClient) -> None:
    client = await make_client(settings_for("memory://", "memory://"))
    response = await client.put(path("k", "strategy=write-behind"), data=b"v")
    body = await assert_error(response, 503, "unavailable")
    assert "journal" in body["detail"]
    await assert_error(await client.get(path("k")), 404)


# -- bulk ------------------------------------------------------------------------------------


async def test_bulk_json(client: Client) -> None:
    entries = [
        {"key": "a", "value": "text é", "content_type": "text/plain; charset=utf-8"},
        {"key": "b", "value_base64": base64.b64encode(b"\x00\xff").decode(), "tags": ["t"]},
    ]
    response = await client.post("/v1/bulk/set", json={"entries": entries})
    assert response.status == 200
    versions = (await response.json())["versions"]
    assert set(versions) == {"a", "b"}

    response = await client.post("/v1/bulk/get", json={"keys": ["a", "missing", "b"]})
    body = await response.json()
    assert body["missing"] == ["missing"]
    by_key = {entry["key"]: entry for entry in body["entries"]}
    assert base64.b64decode(by_key["a"]["value_base64"]) == "text é".encode()
    assert by_key["a"]["content_type"] == "text/plain; charset=utf-8"
    assert base64.b64decode(by_key["b"]["value_base64"]) == b"\x00\xff"
    assert by_key["b"]["version"] == versions["b"] and by_key["b"]["tier"] == "l1"

    assert (await client.post("/v1/bulk/delete", json={"keys": ["a", "b"]})).status == 204
    assert (await client.get(path("a"))).status == 404


async def test_bulk_msgpack(client: Client) -> None:
    headers = {"Content-Type": "application/msgpack"}
    body = msgpack.packb({"entries": [{"key": "m", "value": b"\x01\x02"}]})
    assert (await client.post("/v1/bulk/set", data=body, headers=headers)).status == 200
    response = await client.post(
        "/v1/bulk/get", data=msgpack.packb({"keys": ["m"]}), headers=headers
    )
    assert response.content_type == "application/msgpack"
    document = msgpack.unpackb(await response.read())
    assert document["entries"][0]["value"] == b"\x01\x02"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"keys": []}',
        b'{"keys": "a"}',
        b'{"keys": ["a b"]}',
        b'{"keys": ["ok"], "extra": 1}',
        json.dumps({"keys": ["k"] * 1001}).encode(),
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting must not crash the parser
    ],
)
async def test_bad_bulk_get_bodies_are_400(client: Client, body: bytes) -> None:
    response = await client.post(
        "/v1/bulk/get", data=body, headers={"Content-Type": "application/json"}
    )
    await assert_error(response, 400)


@pytest.mark.parametrize(
    "entry",
    [
        {"key": "k"},  # no value
        {"key": "k", "value": "a", "value_base64": "YQ=="},
        {"key": "k", "value_base64": "***"},
        {"key": "k", "value": "v", "ttl": 0},
        {"key": "k", "value": "v", "ttl": -5},
        {"key": "", "value": "v"},
        {"key": "k", "value": "v", "tags": ["a b"]},
        {"key": "k", "value": "v", "bogus": 1},
    ],
)
async def test_bad_bulk_set_entries_are_400_and_store_nothing(
    client: Client, entry: dict[str, Any]
) -> None:
    good = {"key": "good", "value": "v"}
    response = await client.post("/v1/bulk/set", json={"entries": [good, entry]})
    await assert_error(response, 400)
    assert (await client.get(path("good"))).status == 404


async def test_bad_msgpack_is_400(client: Client) -> None:
    headers = {"Content-Type": "application/msgpack"}
    for body in (b"\xc1", b"\x91", msgpack.packb({1: 2}), msgpack.packb([1])):
        await assert_error(await client.post("/v1/bulk/get", data=body, headers=headers), 400)


# -- operations ------------------------------------------------------------------------------


async def test_health_and_readiness(client: Client) -> None:
    assert (await client.get("/healthz")).status == 200
    response = await client.get("/readyz")
    assert response.status == 200
    assert (await response.json())["tiers"] == [{"name": "l1", "state": "up", "missed_keys": 0}]


async def test_auth_token(make_client: MakeClient) -> None:
    client = await make_client(Settings.model_validate({"server": {"auth_token": "s3cret"}}))
    await assert_error(await client.put(path("k"), data=b"v"), 401, "unauthorized")
    wrong = {"Authorization": "Bearer s3cre"}
    await assert_error(await client.get(path("k"), headers=wrong), 401)
    good = {"Authorization": "Bearer s3cret"}
    assert (await client.put(path("k"), data=b"v", headers=good)).status == 204
    assert (await client.get(path("k"), headers=good)).status == 200
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert (await client.get(open_path)).status == 200


def test_settings_for_builds_ordered_tiers() -> None:
    settings = settings_for("memory://", "memory://?max_items=10")
    assert [tier.name for tier in settings.tiers] == ["l1", "l2"]
    assert [tier.ttl for tier in settings.tiers] == [300, 3600]


@pytest.mark.parametrize("content_type", ["foo", "text/plain\r\nX-Evil: 1", "tëxt/plain", "a/b/c"])
async def test_bad_content_types_are_400(client: Client, content_type: str) -> None:
    response = await client.post(
        "/v1/bulk/set", json={"entries": [{"key": "k", "value": "v", "content_type": content_type}]}
    )
    await assert_error(response, 400)
    await assert_error(await client.get(path("k")), 404)


async def test_bad_put_content_type_is_400(client: Client) -> None:
    await assert_error(await client.put(path("k"), data=b"v", headers={"Content-Type": "foo"}), 400)


async def test_lower_tiers_past_the_deadline_answer_503(make_client: MakeClient) -> None:
    from tests.unit.test_fill_races import SlowFillTier

    client = await make_client(
        Settings.model_validate(
            {
                "server": {"request_timeout": 0.2},
                "tiers": [{"url": "memory://"}, {"url": "memory://"}],
            }
        )
    )
    engine = client.server.api.engine
    slow = SlowFillTier()  # answers only when released: never, here
    engine.slots[1].tier = slow
    body = await assert_error(await client.get(path("k")), 503, "unavailable")
    assert "request_timeout" in body["detail"]
    slow.release.set()


async def test_a_single_network_tier_that_is_down_answers_503_not_404(
    make_client: MakeClient,
) -> None:
    client = await make_client(settings_for("redis://127.0.0.1:1/0"))  # nothing listens
    body = await assert_error(await client.get(path("k")), 503, "unavailable")
    assert body["tier"] == "l1"
