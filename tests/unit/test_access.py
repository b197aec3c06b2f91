"""Tokens at run time (cachesvc/access.py): the bucket's arithmetic, scopes expanded once,
secrets found by lookup or by digest, and the problems that stop a start."""

from __future__ import annotations

import hashlib

import pytest

from cachesvc.access import TokenBucket, build_access
from cachesvc.config import ConfigError, Settings
from cachesvc.errors import Forbidden, TooManyRequests, Unauthorized


def settings(*tokens: dict[str, object], auth_token: str | None = None) -> Settings:
    return Settings.model_validate(
        {
            "server": {"auth_token": auth_token},
            "namespaces": [{"name": "orders"}, {"name": "catalog"}],
            "tokens": list(tokens),
        }
    )


def test_the_bucket_serves_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)  # one more in a tenth of a second
    assert bucket.take(0.05) == pytest.approx(0.05)
    assert bucket.take(0.1) == 0.0
    assert bucket.take(10.0) == 0.0  # a long pause refills up to the burst, not beyond
    assert bucket.take(10.0) == 0.0 and bucket.take(10.0) == 0.0
    assert bucket.take(10.0) > 0


def test_no_token_configured_means_no_check() -> None:
    assert build_access(settings(), {}, 0.0) is None


def test_scopes_are_expanded_once() -> None:
    access = build_access(
        settings(
            {"name": "a", "secret_env": "A", "scopes": ["orders:read", "*:invalidate"]},
            {"name": "b", "secret_env": "B", "scopes": ["catalog:admin"]},
            auth_token="root",
        ),
        {"A": "secret-a", "B": "secret-b"},
        0.0,
    )
    assert access is not None
    a = access.authenticate("Bearer secret-a")
    assert a.may == {
        "orders": {"read", "invalidate"},
        "default": {"invalidate"},
        "catalog": {"invalidate"},
    }
    b = access.authenticate("Bearer secret-b")
    assert b.may == {"catalog": {"read", "write", "invalidate", "admin"}}
    root = access.authenticate("Bearer root")
    assert root.name == "auth_token"
    assert set(root.may) == {"default", "orders", "catalog"}
    a.check("orders", "read", 0.0)
    with pytest.raises(Forbidden):
        a.check("orders", "write", 0.0)
    with pytest.raises(Forbidden):
        b.check("orders", "read", 0.0)
    assert (a.allowed, a.forbidden, b.forbidden) == (1, 1, 1)


def test_a_digest_token_is_found_and_others_are_not() -> None:
    digest = hashlib.sha256(b"by-digest").hexdigest()
    access = build_access(
        settings({"name": "d", "sha256": digest.upper(), "scopes": ["*:read"]}), {}, 0.0
    )
    assert access is not None
    for _ in range(2):  # the second time by lookup
        assert access.authenticate("Bearer by-digest").name == "d"
        assert access.authenticate("bearer   by-digest").name == "d"
    for header in (None, "Bearer by-diges", "Bearer ", "Basic by-digest", digest):
        with pytest.raises(Unauthorized):
            access.authenticate(header)


def test_a_rate_limited_grant_says_when_to_retry() -> None:
    access = build_access(
        settings({"name": "r", "secret_env": "R", "scopes": ["*:read"], "rate": 2}),
        {"R": "r-secret"},
        0.0,
    )
    assert access is not None
    grant = access.authenticate("Bearer r-secret")
    grant.check("default", "read", 0.0)
    grant.check("default", "read", 0.0)  # the burst defaults to one second of rate
    with pytest.raises(TooManyRequests) as caught:
        grant.check("default", "read", 0.0)
    assert caught.value.headers() == {"Retry-After": "1"}
    assert caught.value.retry_after == pytest.approx(0.5)
    # Over its rate counts before its scope: a forbidden request is still a request.
    with pytest.raises(TooManyRequests):
        grant.check("default", "write", 0.1)
    assert (grant.allowed, grant.limited, grant.forbidden) == (2, 2, 0)


def test_problems_name_their_fields() -> None:
    same = hashlib.sha256(b"twice").hexdigest()
    with pytest.raises(ConfigError) as caught:
        build_access(
            settings(
                {"name": "a", "secret_env": "UNSET", "scopes": ["*:read"]},
                {"name": "b", "secret_env": "EMPTY", "scopes": ["*:read"]},
                {"name": "c", "sha256": same, "scopes": ["*:read"]},
                {"name": "d", "secret_env": "TWICE", "scopes": ["*:read"]},
                {"name": "e", "secret_env": "ROOT", "scopes": ["*:read"]},
                auth_token="root",
            ),
            {"EMPTY": "", "TWICE": "twice", "ROOT": "root"},
            0.0,
        )
    assert caught.value.problems == [
        "tokens[0].secret_env: the variable UNSET is not set (it holds the token 'a')",
        "tokens[1].secret_env: the variable EMPTY is not set (it holds the token 'b')",
        "tokens[3]: the same token as tokens[2]",
        "tokens[4]: the same token as server.auth_token",
    ]
