"""Log lines carry the request id and never the value or the token."""

from __future__ import annotations

import json
import logging

from aiohttp.test_utils import make_mocked_request

from cachesvc.logs import (
    CURRENT_REQUEST,
    JsonFormatter,
    RequestContext,
    RequestIdFilter,
    TextFormatter,
)


def emit(formatter: logging.Formatter, message: str) -> str:
    record = logging.LogRecord("cachesvc", logging.WARNING, __file__, 1, message, None, None)
    assert RequestIdFilter().filter(record)
    return formatter.format(record)


def test_json_line_carries_the_clients_request_id() -> None:
    request = make_mocked_request(
        "PUT", "/v1/cache/k", headers={"X-Request-Id": "abc-123", "Authorization": "Bearer s3"}
    )
    token = CURRENT_REQUEST.set(RequestContext(request.headers))
    try:
        line = json.loads(emit(JsonFormatter(), "tier l2 timed out"))
    finally:
        CURRENT_REQUEST.reset(token)
    assert line["request_id"] == "abc-123"
    assert line["level"] == "warning" and line["message"] == "tier l2 timed out"
    assert "s3" not in json.dumps(line)


def test_request_id_is_made_up_once_per_request() -> None:
    request = make_mocked_request("GET", "/v1/cache/k")
    token = CURRENT_REQUEST.set(RequestContext(request.headers))
    try:
        first, second = emit(TextFormatter(), "one"), emit(TextFormatter(), "two")
    finally:
        CURRENT_REQUEST.reset(token)
    first_id = first.rsplit("[request ", 1)[1]
    assert len(first_id.strip("]")) == 16
    assert second.endswith(f"[request {first_id}")


def test_outside_a_request_there_is_no_id() -> None:
    assert "request" not in emit(TextFormatter(), "started")
    assert "request_id" not in json.loads(emit(JsonFormatter(), "started"))
