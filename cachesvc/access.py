"""Who may do what: the bearer tokens (``[[tokens]]`` and ``[server].auth_token``), their
scopes and their rates, resolved once at start.

A request's token is found by one dict lookup: by the ``Authorization`` value as clients
send it (``Bearer <secret>``), else by the secret (other spellings of the scheme). A token
configured by ``secret_env`` (and ``auth_token``) is in those dicts from the start. A token
configured by its ``sha256`` digest is not known until someone presents it: an unknown
secret is hashed and its digest compared with every configured digest
(``hmac.compare_digest``, all of them, so the time taken does not tell which digest came
close); once a secret matched, it joins the dicts, so such a token costs one SHA-256 per
process, not one per request (about 1 µs here, several % of an L1 hit). Only secrets that
matched join: the dicts never hold a secret that no token has.

Why a dict lookup is safe to answer with: it compares no secret byte by byte against the
presented one. It hashes the presented string (SipHash, keyed at random per process) and
compares bytes only with a stored secret of the same 64-bit hash — the same secret, but
for a one-in-2^64 collision. How long a lookup takes depends on that hash, which says
nothing about how much of a secret a guess got right: there is no prefix to find by
timing, as there is with ``==`` on the secret itself. (With ``PYTHONHASHSEED`` fixed, a
lookup's time could tell bits of the secret's hash, still nothing of the secret.)

A grant answers "may this token do that in this namespace" with a dict lookup: its scopes
are expanded at start (``*`` into every namespace, ``admin`` into every action).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from cachesvc.config import ACTIONS, AUTH_TOKEN_NAME, ConfigError, Settings, TokenSettings
from cachesvc.errors import Forbidden, TooManyRequests, Unauthorized
from invalidation.events import DEFAULT_NAMESPACE

_NOTHING: frozenset[str] = frozenset()


class TokenBucket:
    """At most ``burst`` requests at once and ``rate`` a second on average."""

    __slots__ = ("burst", "level", "rate", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.updated = now

    def take(self, now: float) -> float:
        """0 when a request may go at ``now`` (it is counted), else the seconds until one
        may."""
        level = self.level + (now - self.updated) * self.rate
        if level > self.burst:
            level = self.burst
        self.updated = now
        if level >= 1.0:
            self.level = level - 1.0
            return 0.0
        self.level = level
        return (1.0 - level) / self.rate


class Grant:
    """One token at run time."""

    __slots__ = ("allowed", "bucket", "forbidden", "limited", "may", "name")

    def __init__(
        self, name: str, may: Mapping[str, frozenset[str]], bucket: TokenBucket | None
    ) -> None:
        self.name = name  # never the secret: it is shown in logs and metrics
        self.may = may  # namespace -> the actions allowed there
        self.bucket = bucket
        # Requests by outcome, for cachesvc_token_requests_total.
        self.allowed = 0
        self.limited = 0
        self.forbidden = 0

    def check(self, namespace: str, action: str, now: float) -> None:
        """Raise TooManyRequests when the token is over its rate (the request counts against
        it all the same), Forbidden when it may not ``action`` in ``namespace``."""
        bucket = self.bucket
        if bucket is not None:
            wait = bucket.take(now)
            if wait:
                self.limited += 1
                raise TooManyRequests(
                    f"token {self.name!r} is over its rate of {bucket.rate:g} requests/s",
                    wait,
                )
        if action not in self.may.get(namespace, _NOTHING):
            self.forbidden += 1
            raise Forbidden(f"token {self.name!r} may not {action} in namespace {namespace!r}")
        self.allowed += 1


class Access:
    """The configured tokens: ``authenticate`` finds a request's grant."""

    def __init__(
        self, by_secret: Mapping[str, Grant], by_digest: Sequence[tuple[bytes, Grant]]
    ) -> None:
        # By the whole field as clients send it ("Bearer <secret>"), then by the secret.
        self._by_field = {f"Bearer {secret}": grant for secret, grant in by_secret.items()}
        self._by_secret = dict(by_secret)
        self._by_digest = list(by_digest)
        self.grants = [*by_secret.values(), *(grant for _, grant in by_digest)]

    def authenticate(self, authorization: str | None) -> Grant:
        """The grant of the ``Authorization`` field's bearer token; Unauthorized without
        one, or for a token nobody configured."""
        if authorization is None:
            raise Unauthorized("missing bearer token: send Authorization: Bearer <token>")
        grant = self._by_field.get(authorization)
        if grant is not None:
            return grant
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized("the Authorization field must be Bearer <token>")
        secret = secret.strip()
        grant = self._by_secret.get(secret)
        if grant is None:
            grant = self._match_digest(secret)
        return grant

    def _match_digest(self, secret: str) -> Grant:
        digest = _digest(secret)
        found = None
        for expected, grant in self._by_digest:
            if hmac.compare_digest(digest, expected):
                found = grant
        if found is None:
            raise Unauthorized("unknown bearer token")
        self._by_secret[secret] = found
        self._by_field[f"Bearer {secret}"] = found
        return found


def build_access(settings: Settings, environ: Mapping[str, str], now: float) -> Access | None:
    """The tokens of ``settings``, their secrets read from ``environ``; None when there is
    none (every request may do anything: the loopback default). ConfigError names the
    field of each token that cannot be used (a ``secret_env`` that is not set, a secret
    given twice). ``now``: the clock the rates are counted on (``time.perf_counter``)."""
    namespaces = [DEFAULT_NAMESPACE, *(namespace.name for namespace in settings.namespaces)]
    by_secret: dict[str, Grant] = {}
    by_digest: list[tuple[bytes, Grant]] = []
    holders: dict[bytes, str] = {}  # digest -> the token that has it
    problems = []

    def distinct(field: str, digest: bytes) -> bool:
        if digest in holders:
            problems.append(f"{field}: the same token as {holders[digest]}")
            return False
        holders[digest] = field
        return True

    auth_token = settings.server.auth_token
    if auth_token is not None:
        secret = auth_token.get_secret_value()
        holders[hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()] = (
            "server.auth_token"
        )
        by_secret[secret] = Grant(AUTH_TOKEN_NAME, _expand(["*:admin"], namespaces), None)
    for position, token in enumerate(settings.tokens):
        field = f"tokens[{position}]"
        grant = Grant(token.name, _expand(token.scopes, namespaces), _bucket(token, now))
        if token.sha256 is not None:
            digest = bytes.fromhex(token.sha256)
            if distinct(field, digest):
                by_digest.append((digest, grant))
            continue
        assert token.secret_env is not None
        secret = environ.get(token.secret_env, "")
        if not secret:
            problems.append(
                f"{field}.secret_env: the variable {token.secret_env} is not set "
                f"(it holds the token {token.name!r})"
            )
        elif distinct(field, _digest(secret)):
            by_secret[secret] = grant
    if problems:
        raise ConfigError(problems)
    if not holders:
        return None
    return Access(by_secret, by_digest)


def _digest(secret: str) -> bytes:
    # surrogateescape: header values and environment variables are decoded so.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def _expand(scopes: Sequence[str], namespaces: Sequence[str]) -> dict[str, frozenset[str]]:
    may: dict[str, set[str]] = {}
    for scope in scopes:
        where, _, action = scope.partition(":")
        actions = ACTIONS if action == "admin" else (action,)
        for namespace in namespaces if where == "*" else (where,):
            may.setdefault(namespace, set()).update(actions)
    return {namespace: frozenset(actions) for namespace, actions in may.items()}


def _bucket(token: TokenSettings, now: float) -> TokenBucket | None:
    if token.rate is None:
        return None
    burst = token.burst if token.burst is not None else max(1.0, token.rate)
    return TokenBucket(token.rate, burst, now)


class TokenRequests(Collector):
    """``cachesvc_token_requests_total{token, outcome}``, read from the grants at scrape."""

    def __init__(self, access: Access) -> None:
        self.access = access

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "cachesvc_token_requests",
            "Requests by token name and outcome: allowed, rate_limited (429), forbidden (403).",
            labels=["token", "outcome"],
        )
        for grant in self.access.grants:
            family.add_metric([grant.name, "allowed"], grant.allowed)
            family.add_metric([grant.name, "rate_limited"], grant.limited)
            family.add_metric([grant.name, "forbidden"], grant.forbidden)
        yield family
