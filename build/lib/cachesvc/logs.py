"""Log records that carry the request they belong to; JSON lines for log collectors.

A request id is the client's ``X-Request-Id`` when it sent one, else made up — lazily,
only when a log line is written during the request, so the hot path pays nothing for it.
Log lines never contain values or tokens: handlers log keys and errors only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from collections.abc import Mapping


class RequestContext:
    """The request a log line belongs to; ``headers`` are looked up by lower-case name."""

    __slots__ = ("_id", "headers")

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.headers = headers
        self._id: str | None = None

    @property
    def id(self) -> str:
        if self._id is None:
            given = self.headers.get("x-request-id", "")[:64]
            self._id = given or uuid.uuid4().hex[:16]
        return self._id


CURRENT_REQUEST: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "cachesvc_request", default=None
)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        context = CURRENT_REQUEST.get()
        record.request_id = context.id if context is not None else None
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            document["request_id"] = rid
        if record.exc_info:
            document["error"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)
