"""The OpenAPI document (cachesvc/openapi.json): valid OpenAPI, in step with the routes the app
registers, and true of a running sidecar (schemathesis generates requests from it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from typing import Any

import hypothesis
import msgpack
import pytest
import schemathesis
from openapi_spec_validator import validate

from cachesvc.api import routes
from tests.service.conftest import MakeClient
from tests.sidecar import Sidecar

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
TOKEN = "openapi-test-token"


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        (resources.files("cachesvc") / "openapi.json").read_bytes()
    )
    return document


def documented_operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in load_document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def registered_operations() -> set[tuple[str, str]]:
    return {(method, path) for method, path, _ in routes()}


def test_document_is_valid_openapi() -> None:
    validate(load_document())


def test_every_route_is_documented() -> None:
    assert registered_operations() - documented_operations() == set()


def test_every_documented_operation_is_routed() -> None:
    assert documented_operations() - registered_operations() == set()


def test_v1_operations_need_the_bearer_token_and_operations_do_not() -> None:
    """SPEC §5: the token guards /v1/... only; probes and scrapers go without."""
    document = load_document()
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            expected = [{"bearerAuth": []}] if path.startswith("/v1/") else None
            assert operation.get("security") == expected, (method, path)
            if expected:
                assert "401" in operation["responses"], (method, path)


async def test_served_document_is_the_packaged_file(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == load_document()


# -- schemathesis against a running sidecar ------------------------------------------------


# msgpack is the bulk endpoints' second body format; schemathesis knows only JSON-like ones.
@schemathesis.serializer("application/msgpack")
def _pack(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    # JSON integers are unbounded, msgpack's are 64-bit: a generated integer beyond that
    # goes as a string (still not what the schema asks for, so still invalid input).
    def fit(item: Any) -> Any:
        if isinstance(item, int) and not isinstance(item, bool):
            return item if -(2**63) <= item < 2**64 else str(item)
        if isinstance(item, dict):
            return {key: fit(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [fit(inner) for inner in item]
        return item

    packed: bytes = msgpack.packb(fit(value))
    return packed


@schemathesis.deserializer("application/msgpack")
def _unpack(ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    # JSON Schema has no bytes: OpenAPI 3.1 spells binary as a string with
    # contentMediaType, so msgpack bin values are checked as strings.
    def as_json(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.decode("latin-1")
        if isinstance(value, dict):
            return {key: as_json(item) for key, item in value.items()}
        if isinstance(value, list):
            return [as_json(item) for item in value]
        return value

    return as_json(msgpack.unpackb(response.content))


# Generated from the packaged file, which test_served_document_is_the_packaged_file shows is
# what the server serves. (Not schemathesis.pytest.from_fixture + from_url: that lazy loader
# writes pytest's private Node._nodeid, which pytest 9 no longer has.)
api_schema = schemathesis.openapi.from_dict(
    load_document(),
    config=schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"bearerAuth": {"bearer": TOKEN}}},
            # Hypothesis' only wall-clock health check: on a loaded machine it would fail a
            # run that generates exactly the same cases as a passing one.
            "suppress-health-check": ["too_slow"],
            "generation": {
                "mode": "all",  # valid and invalid input: neither may cause a 5xx
                "max-examples": 50,
                # Reproducible: the same cases on every run, none replayed from earlier runs.
                "deterministic": True,
                "database": "none",
            },
            "checks": {
                "enabled": False,
                "not_a_server_error": {"enabled": True},
                "status_code_conformance": {"enabled": True},
                "content_type_conformance": {"enabled": True},
                "response_headers_conformance": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
                "ignored_auth": {"enabled": True},
            },
        }
    ),
)


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Sidecar]:
    """The embedded default (one memory tier), with a token so that auth is checked too."""
    with Sidecar(env={"CACHESVC_AUTH_TOKEN": TOKEN}) as sidecar:
        yield sidecar


@api_schema.parametrize()
def test_generated_requests_get_documented_answers(
    case: schemathesis.Case, sidecar: Sidecar
) -> None:
    """No generated input, valid or not, gets a 5xx; every answer is the documented one
    (status, Content-Type, headers, body schema), and /v1/... refuses a missing token."""
    case.call_and_validate(base_url=sidecar.url)


def test_sequences_of_requests_get_documented_answers(sidecar: Sidecar) -> None:
    """The same checks along the document's links (PUT or bulk set, then GET or DELETE of
    that key): a stored entry must come back, whatever was stored, as a documented answer."""

    class Workflow(api_schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": sidecar.url}

    Workflow.run(
        settings=hypothesis.settings(
            max_examples=40,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            # A failure is reported as found: shrinking a sequence of HTTP calls against a
            # live server can outlast any test timeout.
            phases=[hypothesis.Phase.generate],
            suppress_health_check=[hypothesis.HealthCheck.too_slow],
        )
    )
