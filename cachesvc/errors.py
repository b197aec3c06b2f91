"""Errors the service answers with, each mapped once to a status and a JSON body.

ServiceError                       {"error": code, "detail": text}
├── BadRequest            400      bad key, TTL, strategy, body; a framing error
├── Unauthorized          401      missing or wrong bearer token (+ WWW-Authenticate)
├── Forbidden             403      the token has no scope for this in this namespace
├── NotFound              404      no endpoint at this path
│   └── UnknownNamespace  404      no such namespace
├── MethodNotAllowed      405      (+ Allow)
├── RequestTimeout        408      the head or body stopped arriving
├── Unsupported           409      the configured tiers cannot do this (keys by tag)
├── PayloadTooLarge       413      body over [server].max_body_bytes
├── UriTooLong            414      request target over the limit
├── UnsupportedEncoding   415      a body with a Content-Encoding other than identity
├── TooManyRequests       429      the token is over its rate (+ Retry-After)
├── FieldsTooLarge        431      too many or too large header fields
└── Unavailable           503      a tier the request's promise needs is down
"""

from __future__ import annotations

import math
from typing import ClassVar


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}

    def headers(self) -> dict[str, str]:
        """Fields the answer carries besides the JSON body."""
        return {}


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="cachesvc"'}


class Forbidden(ServiceError):
    status = 403
    code = "forbidden"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class UnknownNamespace(NotFound):
    code = "unknown_namespace"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, detail: str, allowed: tuple[str, ...]) -> None:
        super().__init__(detail)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class RequestTimeout(ServiceError):
    status = 408
    code = "request_timeout"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class UriTooLong(ServiceError):
    status = 414
    code = "uri_too_long"


class UnsupportedEncoding(ServiceError):
    status = 415
    code = "unsupported_content_encoding"


class TooManyRequests(ServiceError):
    status = 429
    code = "too_many_requests"

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        # RFC 9110 §10.2.3: whole seconds; rounded up, so a retry then finds room.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class FieldsTooLarge(ServiceError):
    status = 431
    code = "header_fields_too_large"


class Unsupported(ServiceError):
    # 409, not 501: the API has the operation; this sidecar's configuration lacks it (a
    # client error to fix, not a server failure).
    status = 409
    code = "unsupported"


class Unavailable(ServiceError):
    status = 503
    code = "unavailable"

    def __init__(self, detail: str, tier: str | None = None, outcome_unknown: bool = False) -> None:
        super().__init__(detail)
        self.tier = tier
        # The tier did not answer in time: it may have done what was asked.
        self.outcome_unknown = outcome_unknown

    def body(self) -> dict[str, str]:
        body = super().body()
        if self.tier is not None:
            body["tier"] = self.tier
        return body
