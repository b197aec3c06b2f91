"""Tokens, scopes and rates (docs/configuration.md#tokens-and-scopes): every answer — 401
with WWW-Authenticate, 403, 404 unknown_namespace, 413, 429 with Retry-After — through
an HTTP client and byte by byte through the front door."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cachesvc.config import Settings
from tests.service.conftest import Client, MakeClient
from tests.service.test_api import assert_error
from tests.service.test_front_door import Connection, read_answer, request

ORDERS_SECRET = "orders-secret-0123456789"
ADMIN_SECRET = "admin-secret-0123456789"
READER_SECRET = "reader-secret-0123456789"  # configured by its digest only
LIMITED_SECRET = "limited-secret-0123456789"
SECRETS = (ORDERS_SECRET, ADMIN_SECRET, READER_SECRET, LIMITED_SECRET)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def token_settings(rate: float = 20, burst: int = 2) -> Settings:
    return Settings.model_validate(
        {
            "server": {"port": 0},
            "namespaces": [
                {"name": "orders", "max_value_bytes": 16},
                {"name": "catalog"},
            ],
            "tokens": [
                {
                    "name": "orders-api",
                    "secret_env": "ORDERS_API_TOKEN",
                    "scopes": ["orders:read", "orders:write", "catalog:read"],
                },
                {"name": "ops", "secret_env": "OPS_TOKEN", "scopes": ["*:admin"]},
                {
                    "name": "reader",
                    "sha256": hashlib.sha256(READER_SECRET.encode()).hexdigest(),
                    "scopes": ["*:read"],
                },
                {
                    "name": "limited",
                    "secret_env": "LIMITED_TOKEN",
                    "scopes": ["*:read"],
                    "rate": rate,
                    "burst": burst,
                },
            ],
        }
    )


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERS_API_TOKEN", ORDERS_SECRET)
    monkeypatch.setenv("OPS_TOKEN", ADMIN_SECRET)
    monkeypatch.setenv("LIMITED_TOKEN", LIMITED_SECRET)


@pytest.fixture
async def sidecar(make_client: MakeClient, secrets: None) -> Client:
    return await make_client(token_settings())


async def test_401_without_a_known_token(sidecar: Client) -> None:
    for headers in (
        {},
        bearer("wrong"),
        bearer(ORDERS_SECRET[:-1]),
        {"Authorization": f"Basic {ORDERS_SECRET}"},
        {"Authorization": "Bearer"},
    ):
        for target in ("/v1/cache/k", "/v1/ns/orders/cache/k", "/v1/ns/nope/cache/k"):
            response = await sidecar.get(target, headers=headers)
            await assert_error(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), headers
    # The scheme is case-insensitive (RFC 9110 §11.1).
    assert (
        await sidecar.get("/v1/cache/k", headers={"Authorization": f"bearer {ADMIN_SECRET}"})
    ).status == 404
    for open_path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await sidecar.get(open_path)).status == 200


async def test_scopes_decide_per_namespace_and_action(sidecar: Client) -> None:
    orders, ops, reader = bearer(ORDERS_SECRET), bearer(ADMIN_SECRET), bearer(READER_SECRET)
    allowed: list[tuple[dict[str, str], str, str, Any]] = [
        (orders, "PUT", "/v1/ns/orders/cache/k", b"v"),
        (orders, "GET", "/v1/ns/orders/cache/k", None),
        (orders, "DELETE", "/v1/ns/orders/cache/k", None),
        (orders, "POST", "/v1/ns/orders/bulk/set", {"entries": [{"key": "k", "value": "v"}]}),
        (orders, "POST", "/v1/ns/orders/bulk/delete", {"keys": ["k"]}),
        (orders, "GET", "/v1/ns/catalog/cache/k", None),
        (orders, "POST", "/v1/ns/catalog/bulk/get", {"keys": ["k"]}),
        (reader, "GET", "/v1/cache/k", None),  # * covers default
        (reader, "GET", "/v1/ns/orders/cache/k", None),
        (ops, "PUT", "/v1/cache/k", b"v"),
        (ops, "POST", "/v1/ns/catalog/invalidate", {"tags": ["t"]}),
        (ops, "POST", "/v1/invalidate", {"tags": ["t"]}),
    ]
    for headers, method, target, body in allowed:
        response = await _send(sidecar, method, target, headers, body)
        assert response.status < 400 or response.status == 404, (method, target)
        if response.status == 404:
            assert (await response.json())["error"] == "not_found"
    forbidden = [
        (orders, "GET", "/v1/cache/k", None),
        (orders, "PUT", "/v1/ns/catalog/cache/k", b"v"),
        (orders, "DELETE", "/v1/ns/catalog/cache/k", None),
        (orders, "POST", "/v1/ns/catalog/bulk/delete", {"keys": ["k"]}),
        (orders, "POST", "/v1/ns/orders/invalidate", {"keys": ["k"]}),
        (reader, "PUT", "/v1/ns/orders/cache/k", b"v"),
        (reader, "POST", "/v1/bulk/set", {"entries": [{"key": "k", "value": "v"}]}),
    ]
    for headers, method, target, body in forbidden:
        response = await _send(sidecar, method, target, headers, body)
        detail = (await assert_error(response, 403, "forbidden"))["detail"]
        assert ORDERS_SECRET not in detail and READER_SECRET not in detail
    # The reader's writes were refused: nothing is stored.
    assert (await sidecar.get("/v1/ns/orders/cache/k", headers=ops)).status == 404


async def _send(
    client: Client, method: str, target: str, headers: dict[str, str], body: Any
) -> Any:
    if isinstance(body, bytes):
        return await client.request(method, target, headers=headers, data=body)
    return await client.request(method, target, headers=headers, json=body)


async def test_unknown_namespace_is_404_for_a_valid_token(sidecar: Client) -> None:
    response = await sidecar.get("/v1/ns/nope/cache/k", headers=bearer(ADMIN_SECRET))
    await assert_error(response, 404, "unknown_namespace")


async def test_413_over_the_namespaces_largest_value(sidecar: Client) -> None:
    orders = bearer(ORDERS_SECRET)
    big = await sidecar.put("/v1/ns/orders/cache/k", headers=orders, data=b"x" * 17)
    await assert_error(big, 413, "payload_too_large")
    fits = await sidecar.put("/v1/ns/orders/cache/k", headers=orders, data=b"x" * 16)
    assert fits.status == 204


async def test_429_with_retry_after_over_the_rate(sidecar: Client) -> None:
    limited = bearer(LIMITED_SECRET)
    statuses = [(await sidecar.get("/v1/cache/k", headers=limited)).status for _ in range(10)]
    assert statuses[:2] == [404, 404] and 429 in statuses  # a burst of 2 at 20/s
    response = await sidecar.get("/v1/cache/k", headers=limited)
    body = await assert_error(response, 429, "too_many_requests")
    assert "limited" in body["detail"]
    assert int(response.headers["Retry-After"]) >= 1
    # Other tokens are not held back.
    assert (await sidecar.get("/v1/cache/k", headers=bearer(ADMIN_SECRET))).status == 404
    text = await (await sidecar.get("/metrics")).text()
    assert 'cachesvc_token_requests_total{outcome="rate_limited",token="limited"}' in text
    assert 'cachesvc_token_requests_total{outcome="allowed",token="ops"} 1.0' in text
    assert LIMITED_SECRET not in text and ADMIN_SECRET not in text


async def test_a_token_at_100_per_second_driven_hard_is_served_500_in_5_s(
    make_client: MakeClient, secrets: None
) -> None:
    """A count, not a timing: with a burst of 10, five seconds at 100 requests/s serve
    about 510 requests, however many more are sent."""
    client = await make_client(token_settings(rate=100, burst=10))
    await client.put("/v1/cache/k", headers=bearer(ADMIN_SECRET), data=b"v")
    limited = bearer(LIMITED_SECRET)
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + 5.0

    async def drive() -> None:
        while time.monotonic() < deadline:
            response = await client.get("/v1/cache/k", headers=limited)
            statuses[response.status] += 1
            await response.read()

    await asyncio.gather(*(drive() for _ in range(8)))
    served = statuses[200]
    print(f"served {served}, refused {statuses[429]} (429), of {sum(statuses.values())}")
    assert set(statuses) == {200, 429}
    assert statuses[429] > served  # it was driven well past its rate
    assert 450 <= served <= 550


async def test_secrets_are_never_logged(
    make_client: MakeClient, secrets: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = token_settings().model_copy(
        update={"server": Settings().server.model_copy(update={"port": 0, "access_log": True})}
    )
    client = await make_client(settings)
    for secret in (*SECRETS, "wrong-secret"):
        await client.get("/v1/cache/k", headers=bearer(secret))
    await client.get("/metrics")
    assert caplog.records  # the access log wrote something
    for secret in (*SECRETS, "wrong-secret"):
        assert secret not in caplog.text


# -- byte by byte, through the front door ---------------------------------------------------


async def _connect(client: Client) -> Connection:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    return Connection(reader, writer)


async def test_every_answer_at_the_byte_level(sidecar: Client) -> None:
    connection = await _connect(sidecar)
    orders = f"Authorization: Bearer {ORDERS_SECRET}"
    await connection.send(
        request("GET", "/v1/ns/orders/cache/k")  # no token
        + request("GET", "/v1/ns/orders/cache/k", "Authorization: Bearer nope")
        + request("GET", "/v1/cache/k", orders)  # not its namespace
        + request("GET", "/v1/ns/nope/cache/k", orders)
        + request("PUT", "/v1/ns/orders/cache/k", orders, body=b"v")
        + request("GET", "/v1/ns/orders/cache/k", orders)
    )
    answers = [await connection.answer() for _ in range(6)]
    assert [a.status for a in answers] == [401, 401, 403, 404, 204, 200]
    for answer in answers[:2]:
        assert answer.headers["www-authenticate"] == 'Bearer realm="cachesvc"'
    codes = [json.loads(a.body)["error"] for a in answers[:4]]
    assert codes == ["unauthorized", "unauthorized", "forbidden", "unknown_namespace"]
    assert answers[5].body == b"v"

    # 413: the declared length is over the namespace's limit; the body is not read and
    # the connection closes (as for max_body_bytes).
    await connection.send(request("PUT", "/v1/ns/orders/cache/k", orders, body=b"x" * 17))
    too_large = await connection.answer()
    assert too_large.status == 413
    assert json.loads(too_large.body)["error"] == "payload_too_large"
    assert too_large.headers["connection"] == "close"
    assert await connection.closed_by_server()
    connection.close()

    # A chunked body is measured once it is in.
    connection = await _connect(sidecar)
    chunked = (
        "PUT /v1/ns/orders/cache/k HTTP/1.1\r\nHost: sidecar\r\n"
        f"{orders}\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n{'x' * 17}\r\n0\r\n\r\n"
    ).encode()
    await connection.send(chunked + request("GET", "/v1/ns/orders/cache/k", orders))
    assert (await connection.answer()).status == 413
    kept = await connection.answer()
    assert (kept.status, kept.body) == (200, b"v")
    connection.close()


async def test_429_at_the_byte_level(sidecar: Client) -> None:
    connection = await _connect(sidecar)
    limited = f"Authorization: Bearer {LIMITED_SECRET}"
    await connection.send(b"".join(request("GET", "/v1/cache/k", limited) for _ in range(5)))
    answers = [await read_answer(connection.reader) for _ in range(5)]
    connection.close()
    statuses = [a.status for a in answers]
    assert statuses[:2] == [404, 404] and statuses[2:] == [429, 429, 429]
    assert all(a.headers["retry-after"] == "1" for a in answers[2:])
    assert json.loads(answers[2].body)["error"] == "too_many_requests"


async def test_an_unset_secret_env_stops_the_start_naming_the_field(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cachesvc.config import ConfigError

    monkeypatch.delenv("ORDERS_API_TOKEN", raising=False)
    monkeypatch.setenv("OPS_TOKEN", ADMIN_SECRET)
    monkeypatch.setenv("LIMITED_TOKEN", ADMIN_SECRET)
    with pytest.raises(ConfigError) as caught:
        await make_client(token_settings())
    assert caught.value.problems == [
        "tokens[0].secret_env: the variable ORDERS_API_TOKEN is not set "
        "(it holds the token 'orders-api')",
        "tokens[3]: the same token as tokens[1]",
    ]


def test_serve_names_an_unset_secret_env_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "cachesvc.toml"
    config.write_text(
        '[[tokens]]\nname = "orders-api"\nsecret_env = "ORDERS_API_TOKEN"\nscopes = ["*:read"]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
    env.pop("ORDERS_API_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-m", "cachesvc", "serve", "--config", str(config), "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith(
        "config error: tokens[0].secret_env: the variable ORDERS_API_TOKEN is not set "
        "(it holds the token 'orders-api')"
    )
