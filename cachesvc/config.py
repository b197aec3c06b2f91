"""Settings: the TOML file (docs/configuration.md), then ``CACHESVC_`` environment overrides,
validated once.

Environment variables map onto the file's keys with ``__`` between levels
(``CACHESVC_SERVER__PORT=9000``, ``CACHESVC_TIERS__0__URL=redis://...``); a value that
looks like JSON (``[``, ``{``) is parsed as JSON, so ``CACHESVC_TIERS='[{"url": ...}]'``
replaces the whole list. Without a file (or a file without ``[[tiers]]``), indexed tier
variables apply to the embedded default's tier list. ``CACHESVC_AUTH_TOKEN`` is the
documented short form of ``CACHESVC_SERVER__AUTH_TOKEN``. Unknown keys, in the file or the
environment, are errors, with a "did you mean" hint when a known key is close.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from cachesvc.audit import DEFAULT_RETENTION_DAYS, check_retention_days
from cachesvc.crypto import NEEDS_ENCRYPTION, Classification
from invalidation.events import DEFAULT_NAMESPACE, NAMESPACE_NAME
from invalidation.postgres_wal import TableSpec
from invalidation.redis_stream import MaxAge, MaxLength, Trimming
from tiers.redis_clients import validate_redis_url
from tiers.registry import known_schemes, tier_class

ENV_PREFIX = "CACHESVC_"
# Variables with the prefix that are not settings: the config path, the test suite's
# servers, the Locust workload (bench/workload.py).
_NOT_SETTINGS = ("CACHESVC_CONFIG", "CACHESVC_TEST_", "CACHESVC_LOAD_")
_ENV_ALIASES = {"CACHESVC_AUTH_TOKEN": ("server", "auth_token")}

# The token [server].auth_token is, among the [[tokens]]: shown in logs and metrics.
AUTH_TOKEN_NAME = "auth_token"

Strategy = Literal["write-through", "write-behind", "cache-aside"]
STRATEGIES: tuple[Strategy, ...] = ("write-through", "write-behind", "cache-aside")
REDIS_SCHEMES = ("redis", "rediss", "redis-cluster", "redis-sentinel")
POSTGRES_SCHEMES = ("postgresql", "postgres")

# No config file and no tier settings: one in-process memory tier, so that the sidecar
# serves with no server installed.
EMBEDDED_DEFAULT_TIERS: tuple[Mapping[str, str], ...] = ({"name": "l1", "url": "memory://"},)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    max_body_bytes: int = Field(1_048_576, gt=0)
    auth_token: SecretStr | None = None
    # The longest a request may take end to end; tier calls get what is left of it.
    request_timeout: float = Field(2.0, gt=0)
    # How long SIGTERM waits for in-flight requests before closing connections.
    shutdown_timeout: float = Field(10.0, ge=0)
    # A request whose head or body stops arriving for this long is answered 408.
    body_timeout: float = Field(30.0, gt=0)
    # An idle keep-alive connection is closed after this long.
    keepalive_timeout: float = Field(75.0, gt=0)
    # A second listener serving only /healthz, /readyz and /metrics, without a token (for
    # kubelet probes and Prometheus scrapes from outside the pod); none by default.
    ops_port: int | None = Field(None, ge=0, le=65535)
    ops_host: str = "0.0.0.0"
    access_log: bool = False
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class TierSettings(_Section):
    name: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,64}$")  # "" -> "l<position>"
    url: str
    ttl: float = Field(300.0, gt=0)
    # Per-call timeout (default: the backend's own); a call that exceeds it counts as a
    # failure for the tier's circuit breaker.
    timeout: float | None = Field(None, gt=0)
    breaker_failures: int = Field(3, ge=1)
    breaker_reset: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check_url(self) -> TierSettings:
        parsed = self.parsed_url
        try:
            if not parsed.scheme:
                schemes = ", ".join(known_schemes())
                raise ValueError(f"{self.url!r} is not a URL (known schemes: {schemes})")
            cls = tier_class(parsed.scheme.lower())
            cls.validate_url(parsed)
        except ValueError as exc:
            raise _FieldError("url", with_url_hint(str(exc), self.url, known_schemes())) from None
        return self

    @property
    def parsed_url(self) -> SplitResult:
        return urlsplit(self.url)

    @property
    def is_in_process(self) -> bool:
        return tier_class(self.parsed_url.scheme.lower()).in_process


class WriteSettings(_Section):
    strategy: Strategy = "write-through"
    # Write-behind journal (a Redis Stream, see cachesvc/journal.py). Default: the first
    # redis:// tier; without one, write-behind answers 503 unless there is a single tier.
    journal_url: str | None = None
    journal_stream: str = "cachesvc:journal"
    # Back-pressure: past this many pending writes, write-behind answers 503.
    journal_max_pending: int = Field(100_000, ge=1)
    flush_batch: int = Field(500, ge=1, le=10_000)
    # After a round that took what the journal held (fewer than flush_batch), the flusher
    # waits this long before the next: writes gather into batches, repeats of a key
    # coalesce, instead of a round (a commit below) per write at a steady rate.
    flush_interval: float = Field(0.05, ge=0, le=60)
    # SIGTERM waits this long for the journal to drain what this sidecar wrote.
    drain_timeout: float = Field(10.0, ge=0)
    # A peer's unacknowledged entries are claimed after this much idleness.
    reclaim_after: float = Field(30.0, gt=0)
    # Deliveries a refused (not unreachable) entry gets before it is dead-lettered.
    max_attempts: int = Field(5, ge=1)
    # Acknowledge write-behind on a journal whose Redis does not persist every write
    # (appendfsync always): its crash then loses acknowledged writes.
    volatile_journal: bool = False
    # Replicas of the journal's Redis that must hold an entry (WAIT) before its write is
    # acknowledged; default: 1 when the master has a replica, else 0.
    journal_replicas: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check_journal_url(self) -> WriteSettings:
        _check_redis_url("journal_url", self.journal_url)
        return self


class TableSource(_Section):
    """A table whose committed changes invalidate (logical decoding, see
    invalidation/postgres_wal.py): key and tag templates over its rows' columns."""

    # Default: the durable tier's database (a postgresql:// last tier).
    url: str | None = None
    table: str = Field(min_length=1)
    keys: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    namespace: str = "default"

    @model_validator(mode="after")
    def _check(self) -> TableSource:
        _check_scheme("url", self.url, POSTGRES_SCHEMES)
        try:
            self.spec()
        except ValueError as exc:
            raise _FieldError("keys", str(exc)) from None
        return self

    def spec(self) -> TableSpec:
        return TableSpec.parse(self.table, self.keys, self.tags, self.namespace)


class InvalidationSettings(_Section):
    # Redis pub/sub: the channel this sidecar subscribes to and publishes on.
    url: str | None = None
    channel: str = Field("cachesvc:invalidate", min_length=1)
    # Postgres LISTEN/NOTIFY: a second source, so a database trigger can invalidate.
    postgres_url: str | None = None
    postgres_channel: str = Field("cachesvc_invalidate", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    # A lost source is noticed within this long (a silent subscription is PINGed at a
    # third of it); until it is back the sidecar reads the durable tier only.
    liveness_interval: float = Field(1.0, gt=0)
    # A Redis Stream on `url` every sidecar reads every event from, resuming where it left
    # off; with it, this sidecar's own events are appended there. Trimmed by length
    # (default 100000 entries) or, with stream_max_age, by age in seconds.
    stream: str | None = Field(None, min_length=1)
    stream_max_len: int = Field(100_000, ge=1)
    stream_max_age: float | None = Field(None, gt=0)
    # Tables whose committed changes invalidate, read from Postgres' write-ahead log.
    tables: list[TableSource] = Field(default_factory=list)
    # Names this sidecar's place in the stream (its cursor, its consumer): stable across
    # its restarts, unique in the fleet. Default: host name, port and worker.
    identity: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check_urls(self) -> InvalidationSettings:
        _check_redis_url("url", self.url)
        _check_scheme("postgres_url", self.postgres_url, POSTGRES_SCHEMES)
        if self.stream is not None and self.url is None:
            raise _FieldError("stream", "a stream lives on [invalidation].url: set it too")
        return self

    def trimming(self) -> Trimming:
        if self.stream_max_age is not None:
            return MaxAge(self.stream_max_age)
        return MaxLength(self.stream_max_len)


def _check_redis_url(field: str, url: str | None) -> None:
    _check_scheme(field, url, REDIS_SCHEMES)
    if url is not None:
        try:
            validate_redis_url(url)
        except ValueError as exc:
            raise _FieldError(field, str(exc)) from None


def _check_scheme(field: str, url: str | None, schemes: Sequence[str]) -> None:
    if url is not None and urlsplit(url).scheme.lower() not in schemes:
        *others, last = [f"{scheme}://" for scheme in schemes]
        expected = f"{', '.join(others)} or {last}" if others else last
        raise _FieldError(field, with_url_hint(f"must be a {expected} URL", url, schemes))


def with_url_hint(message: str, url: str, schemes: Sequence[str]) -> str:
    """``message`` about ``url``, with what it probably meant when it looks like a slip."""
    if re.fullmatch(r"[A-Za-z0-9.-]+:[0-9]+(/.*)?", url):  # "localhost:6379": no scheme
        example = "redis" if "redis" in schemes else schemes[0]
        return f"{message}; a URL starts with its scheme, e.g. '{example}://{url}'"
    meant = _meant_url(url, schemes)
    return f"{message}; did you mean {meant!r}?" if meant else message


def _meant_url(url: str, schemes: Sequence[str]) -> str | None:
    scheme, separator, rest = url.partition("://")
    if not separator:
        # The "://" mangled: "rediss//host", "redis:/host", "redis:host:6379".
        mangled = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)(?::/?|//)(.*)", url)
        if mangled is None:
            return None
        scheme, rest = mangled[1], mangled[2]
    scheme = scheme.lower()
    if scheme not in schemes:
        close = difflib.get_close_matches(scheme, schemes, n=1)
        if not close:
            return None
        scheme = close[0]
    meant = f"{scheme}://{rest}"
    return meant if meant != url else None


class NamespaceSettings(_Section):
    """A ``[[namespaces]]`` entry: its own keys, tags and prefixes in every tier, and its
    own policy; unset fields take the top-level one."""

    name: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not NAMESPACE_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r:.80} is not a namespace name: 1-63 of a-z 0-9 _ -, starting with a "
                "letter or a digit"
            )
        return name

    # A subset of the [[tiers]] names (kept in the [[tiers]] order); default: all of them.
    tiers: list[str] | None = Field(None, min_length=1)
    ttl: float | None = Field(None, gt=0)  # the longest lifetime of any of its entries
    strategy: Strategy | None = None
    max_value_bytes: int | None = Field(None, gt=0)
    classification: Classification = "internal"
    # The environment variable holding the namespace's encryption keys (read at serve
    # time, like a token's secret_env): its values leave the process only sealed.
    encryption_keys_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _check_encryption(self) -> NamespaceSettings:
        keys_env = self.encryption_keys_env
        if keys_env is None and self.classification in NEEDS_ENCRYPTION:
            raise _FieldError(
                "encryption_keys_env",
                f"a {self.classification} namespace needs encryption keys: name the "
                'environment variable that holds them ("<id>:<base64 of 32 bytes>,...")',
            )
        if keys_env is not None and keys_env.startswith(ENV_PREFIX):
            raise _FieldError(
                "encryption_keys_env",
                f"variables starting with {ENV_PREFIX} are settings; name another one",
            )
        return self


ACTIONS = ("read", "write", "invalidate", "admin")


class TokenSettings(_Section):
    """A ``[[tokens]]`` entry: a bearer token, what it may do where, and how often."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # The token itself comes from this environment variable (read at serve time) ...
    secret_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # ... or only its SHA-256 digest is in the file.
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    scopes: list[str] = Field(min_length=1)
    rate: float | None = Field(None, gt=0)  # requests per second (a token bucket)
    burst: int | None = Field(None, ge=1)  # the bucket's size; default: one second of rate

    @model_validator(mode="after")
    def _check(self) -> TokenSettings:
        if self.secret_env is None and self.sha256 is None:
            raise _FieldError(
                "secret_env",
                "give secret_env (the environment variable holding the token) or sha256 "
                "(the token's SHA-256 digest, in hex)",
            )
        if self.secret_env is not None and self.sha256 is not None:
            raise _FieldError("sha256", "give secret_env or sha256, not both")
        if self.secret_env is not None and self.secret_env.startswith(ENV_PREFIX):
            raise _FieldError(
                "secret_env",
                f"variables starting with {ENV_PREFIX} are settings; name another one",
            )
        for position, scope in enumerate(self.scopes):
            namespace, colon, action = scope.partition(":")
            if not colon or action not in ACTIONS:
                raise _FieldError(
                    f"scopes[{position}]",
                    f"{scope!r} is not <namespace or *>:<{'|'.join(ACTIONS)}>",
                )
            if namespace != "*" and not NAMESPACE_NAME.fullmatch(namespace):
                raise _FieldError(f"scopes[{position}]", f"{namespace!r} is not a namespace name")
        if self.burst is not None and self.rate is None:
            raise _FieldError("burst", "a burst needs a rate")
        return self


class AuditSettings(_Section):
    """``[audit]``: the trail in the durable tier's Postgres database (cachesvc.audit)."""

    # Records older than this many days are pruned (the rest stays verifiable).
    retention_days: int = DEFAULT_RETENTION_DAYS

    @field_validator("retention_days")
    @classmethod
    def _check_retention(cls, days: int) -> int:
        return check_retention_days(days)


def _default_tiers() -> list[TierSettings]:
    return [TierSettings.model_validate(tier) for tier in EMBEDDED_DEFAULT_TIERS]


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    tiers: list[TierSettings] = Field(default_factory=_default_tiers, min_length=1)
    write: WriteSettings = WriteSettings()
    invalidation: InvalidationSettings = InvalidationSettings()
    namespaces: list[NamespaceSettings] = Field(default_factory=list)
    tokens: list[TokenSettings] = Field(default_factory=list)
    audit: AuditSettings = AuditSettings()
    # The file these settings were read from, if any (see is_embedded_default).
    _config_path: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _name_tiers(self) -> Settings:
        named = [
            tier if tier.name else tier.model_copy(update={"name": f"l{position}"})
            for position, tier in enumerate(self.tiers, start=1)
        ]
        seen: set[str] = set()
        for position, tier in enumerate(named):
            if tier.name in seen:
                raise _FieldError(f"tiers[{position}].name", f"duplicate tier name {tier.name!r}")
            seen.add(tier.name)
        object.__setattr__(self, "tiers", named)
        in_process = [position for position, tier in enumerate(named) if tier.is_in_process]
        durable = named[-1]
        for position, source in enumerate(self.invalidation.tables):
            if source.url is None and durable.parsed_url.scheme.lower() not in POSTGRES_SCHEMES:
                raise _FieldError(
                    f"invalidation.tables[{position}].url",
                    "needed: the durable tier is not a Postgres database to default to",
                )
        shared = len(in_process) < len(named)
        if shared and in_process and self.invalidation.url is None:
            raise _FieldError(
                f"tiers[{in_process[0]}].url",
                "an in-process tier in front of shared tiers needs [invalidation].url: "
                "writes made through other sidecars (and other --workers) reach its copies "
                "through that channel",
            )
        if self.write.journal_url is None:
            redis_tier = next((t for t in named if t.parsed_url.scheme in REDIS_SCHEMES), None)
            if redis_tier is not None:
                journal_url = redis_tier.url.partition("?")[0]
                object.__setattr__(
                    self, "write", self.write.model_copy(update={"journal_url": journal_url})
                )
        # Every problem of the namespaces and tokens at once: each names its own field.
        _FieldError.raise_any(self._check_namespaces() + self._check_tokens())
        return self

    def _check_namespaces(self) -> list[tuple[str, str]]:
        """The namespaces' problems, each with its field; their tiers put in order."""
        problems: list[tuple[str, str]] = []
        tier_order = {tier.name: position for position, tier in enumerate(self.tiers)}
        seen = {DEFAULT_NAMESPACE}
        ordered = []
        for position, namespace in enumerate(self.namespaces):
            where = f"namespaces[{position}]"
            if namespace.name == DEFAULT_NAMESPACE:
                problems.append(
                    (
                        f"{where}.name",
                        "the namespace 'default' always exists and takes the top-level "
                        "settings; it is not declared",
                    )
                )
            elif namespace.name in seen:
                problems.append((f"{where}.name", f"duplicate namespace {namespace.name!r}"))
            seen.add(namespace.name)
            tiers_known = True
            for index, tier in enumerate(namespace.tiers or ()):
                if tier not in tier_order:
                    tiers_known = False
                    problems.append(
                        (
                            f"{where}.tiers[{index}]",
                            f"unknown tier {tier!r} (tiers: {', '.join(tier_order)})",
                        )
                    )
                elif namespace.tiers is not None and namespace.tiers.index(tier) != index:
                    problems.append((f"{where}.tiers[{index}]", f"tier {tier!r} given twice"))
            limit = self.server.max_body_bytes
            if namespace.max_value_bytes is not None and namespace.max_value_bytes > limit:
                problems.append(
                    (
                        f"{where}.max_value_bytes",
                        f"{namespace.max_value_bytes} is over [server].max_body_bytes "
                        f"({limit}): no request body may be that large",
                    )
                )
            if namespace.tiers is not None and tiers_known:
                in_order = sorted(namespace.tiers, key=tier_order.__getitem__)
                namespace = namespace.model_copy(update={"tiers": in_order})
            ordered.append(namespace)
        object.__setattr__(self, "namespaces", ordered)
        for position, source in enumerate(self.invalidation.tables):
            if source.namespace not in seen:
                problems.append(
                    (
                        f"invalidation.tables[{position}].namespace",
                        f"unknown namespace {source.namespace!r} (namespaces: {', '.join(seen)})",
                    )
                )
        return problems

    def _check_tokens(self) -> list[tuple[str, str]]:
        """The tokens' problems, each with its field."""
        problems: list[tuple[str, str]] = []
        names = {namespace.name for namespace in self.namespaces} | {DEFAULT_NAMESPACE}
        seen = set() if self.server.auth_token is None else {AUTH_TOKEN_NAME}
        for position, token in enumerate(self.tokens):
            if token.name in seen:
                what = "the name of [server].auth_token" if token.name == AUTH_TOKEN_NAME else ""
                problems.append(
                    (
                        f"tokens[{position}].name",
                        f"duplicate token name {token.name!r}" + (f" ({what})" if what else ""),
                    )
                )
            seen.add(token.name)
            for index, scope in enumerate(token.scopes):
                namespace = scope.partition(":")[0]
                if namespace != "*" and namespace not in names:
                    problems.append(
                        (
                            f"tokens[{position}].scopes[{index}]",
                            f"unknown namespace {namespace!r} "
                            f"(namespaces: {', '.join(sorted(names))})",
                        )
                    )
        return problems

    @property
    def is_embedded_default(self) -> bool:
        """No config file and no tier settings from anywhere: the tiers are the embedded
        default's as shipped (other sections may still come from the environment)."""
        return self._config_path is None and "tiers" not in self.model_fields_set

    @property
    def config_path(self) -> str | None:
        return self._config_path


class _FieldError(ValueError):
    """Validation problems that know which field (relative to their model) each concerns:
    one, or several found in one pass (``also``), so that a config is fixed in one go."""

    def __init__(self, field: str, message: str, also: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{field}: {message}")
        self.problems = [(field, message), *also]

    @classmethod
    def raise_any(cls, problems: Sequence[tuple[str, str]]) -> None:
        if problems:
            (field, message), *also = problems
            raise cls(field, message, also)


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from ``path`` (or ``$CACHESVC_CONFIG``; none = the embedded default), the
    environment, then ``overrides`` (dotted keys, e.g. command-line flags), in that order."""
    environ = os.environ if environ is None else environ
    path = path or environ.get("CACHESVC_CONFIG") or None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    sources: dict[tuple[str | int, ...], str] = {}
    problems: list[str] = []
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name.startswith(_NOT_SETTINGS):
            continue
        keys = _ENV_ALIASES.get(name) or tuple(
            part.lower() for part in name[len(ENV_PREFIX) :].split("__")
        )
        if keys[0] == "tiers" and len(keys) > 1 and "tiers" not in data:
            # CACHESVC_TIERS__0__TTL=60 with no tiers configured: a change to the tier list
            # that is in effect, the embedded default's.
            data["tiers"] = [dict(tier) for tier in EMBEDDED_DEFAULT_TIERS]
        try:
            location = _assign(data, keys, _parse_env_value(value))
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        else:
            sources[location] = name
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _assign(data, tuple(dotted.split(".")), value)
    if problems:
        raise ConfigError(problems)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None
    settings._config_path = None if path is None else str(path)
    return settings


def _parse_env_value(value: str) -> Any:
    if value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    return value


def _assign(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> tuple[str | int, ...]:
    """Set ``value`` at ``keys`` in nested dicts/lists; returns the location as pydantic
    reports it (list indexes as ints)."""
    node: Any = data
    location: list[str | int] = []
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) > len(node):
                raise ValueError(f"no list item {key!r} at {_format_location(location)}")
            index = int(key)
            if index == len(node):
                node.append({})
            location.append(index)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ValueError(f"{_format_location(location)} is not a table")
        location.append(key)
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})
    return tuple(location)


def _format_location(location: tuple[str | int, ...] | list[str | int]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "<root>"


def _describe(exc: ValidationError, sources: Mapping[tuple[str | int, ...], str]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        location = tuple(error["loc"])
        message = error["msg"]
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, _FieldError):
            # The settings' own validator (at the root) names fields from the top
            # ("tiers[0].name"); a section's, relative to the section.
            for field, message in cause.problems:
                at = (*location, field) if location else (field,)
                origin = sources.get(at)
                problems.append(
                    f"{_format_location(at)}: {message}" + (f" (from {origin})" if origin else "")
                )
            continue
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = message.removeprefix("Value error, ")
        where = _format_location(location)
        origin = sources.get(location)
        problem = f"{where}: {message}" + (f" (from {origin})" if origin else "")
        if error["type"] == "extra_forbidden":
            problem += _did_you_mean(location, from_environment=origin is not None)
        problems.append(problem)
    return problems


def _did_you_mean(location: tuple[str | int, ...], from_environment: bool) -> str:
    """The hint for an unknown key close to a known one (``; did you mean server.port?``),
    else ``""``."""
    *parent, unknown = location
    close = difflib.get_close_matches(str(unknown), _known_keys(parent), n=1)
    if not close:
        return ""
    meant = (*parent, close[0])
    if from_environment:
        return f"; did you mean {ENV_PREFIX}{'__'.join(str(part).upper() for part in meant)}?"
    return f"; did you mean {_format_location(meant)}?"


def _known_keys(location: Sequence[str | int]) -> list[str]:
    """The keys of the table at ``location`` (list indexes skipped), from the models."""
    model: type[BaseModel] | None = Settings
    for part in location:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = None if field is None else _model_in(field.annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model in ``annotation`` (``ServerSettings``, ``list[TierSettings]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        if (found := _model_in(argument)) is not None:
            return found
    return None
