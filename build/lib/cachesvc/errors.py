"""Errors the service answers with, each mapped once to a status and a JSON body.

ServiceError                       {"error": code, "detail": text}
├── BadRequest            400      bad key, TTL, strategy, body
├── Unauthorized          401      missing or wrong bearer token
├── PayloadTooLarge       413      body over [server].max_body_bytes
└── Unavailable           503      a tier the request's promise needs is down
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def body(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class Unavailable(ServiceError):
    status = 503
    code = "unavailable"

    def __init__(self, detail: str, tier: str | None = None) -> None:
        super().__init__(detail)
        self.tier = tier

    def body(self) -> dict[str, str]:
        body = super().body()
        if self.tier is not None:
            body["tier"] = self.tier
        return body
