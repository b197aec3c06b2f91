"""Settings: the TOML file of SPEC §2, then ``CACHESVC_`` environment overrides, validated once.

Environment variables map onto the file's keys with ``__`` between levels
(``CACHESVC_SERVER__PORT=9000``, ``CACHESVC_TIERS__0__URL=redis://...``); a value that
looks like JSON (``[``, ``{``) is parsed as JSON, so ``CACHESVC_TIERS='[{"url": ...}]'``
replaces the whole list. ``CACHESVC_AUTH_TOKEN`` is the documented short form of
``CACHESVC_SERVER__AUTH_TOKEN``. Unknown keys, in the file or the environment, are errors.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from tiers.redis_clients import validate_redis_url
from tiers.registry import tier_class

ENV_PREFIX = "CACHESVC_"
# Variables with the prefix that are not settings: the config path, the test suite's
# servers, the Locust workload (bench/workload.py).
_NOT_SETTINGS = ("CACHESVC_CONFIG", "CACHESVC_TEST_", "CACHESVC_LOAD_")
_ENV_ALIASES = {"CACHESVC_AUTH_TOKEN": ("server", "auth_token")}

Strategy = Literal["write-through", "write-behind", "cache-aside"]
STRATEGIES: tuple[Strategy, ...] = ("write-through", "write-behind", "cache-aside")


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
            cls = tier_class(parsed.scheme.lower())
            cls.validate_url(parsed)
        except ValueError as exc:
            raise _FieldError("url", str(exc)) from None
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
    # SIGTERM waits this long for the journal to drain what this sidecar wrote.
    drain_timeout: float = Field(10.0, ge=0)
    # A peer's unacknowledged entries are claimed after this much idleness.
    reclaim_after: float = Field(30.0, gt=0)
    # Deliveries a refused (not unreachable) entry gets before it is dead-lettered.
    max_attempts: int = Field(5, ge=1)
    # Acknowledge write-behind on a journal whose Redis does not persist every write
    # (appendfsync always): its crash then loses acknowledged writes.
    volatile_journal: bool = False

    @model_validator(mode="after")
    def _check_journal_url(self) -> WriteSettings:
        if self.journal_url is not None:
            try:
                validate_redis_url(self.journal_url)
            except ValueError as exc:
                raise _FieldError("journal_url", str(exc)) from None
        return self


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

    @model_validator(mode="after")
    def _check_urls(self) -> InvalidationSettings:
        if self.url is not None:
            try:
                validate_redis_url(self.url)
            except ValueError as exc:
                raise _FieldError("url", str(exc)) from None
        if self.postgres_url is not None and urlsplit(self.postgres_url).scheme not in (
            "postgresql",
            "postgres",
        ):
            raise _FieldError("postgres_url", "must be a postgresql:// URL")
        return self


def _default_tiers() -> list[TierSettings]:
    return [TierSettings(name="l1", url="memory://")]


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    tiers: list[TierSettings] = Field(default_factory=_default_tiers, min_length=1)
    write: WriteSettings = WriteSettings()
    invalidation: InvalidationSettings = InvalidationSettings()

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
        shared = len(in_process) < len(named)
        if shared and in_process and self.invalidation.url is None:
            raise _FieldError(
                f"tiers[{in_process[0]}].url",
                "an in-process tier in front of shared tiers needs [invalidation].url: "
                "writes made through other sidecars (and other --workers) reach its copies "
                "through that channel",
            )
        if self.write.journal_url is None:
            redis_tier = next(
                (t for t in named if t.parsed_url.scheme in ("redis", "rediss")), None
            )
            if redis_tier is not None:
                journal_url = redis_tier.url.partition("?")[0]
                object.__setattr__(
                    self, "write", self.write.model_copy(update={"journal_url": journal_url})
                )
        return self

    @property
    def is_embedded_default(self) -> bool:
        return len(self.tiers) == 1 and self.tiers[0].parsed_url.scheme == "memory"


class _FieldError(ValueError):
    """A validation problem that knows which field (relative to its model) it concerns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources)) from None


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
            node = node.setdefault(key, [] if key == "tiers" else {})
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
            location, message = (*location, cause.field), cause.message
            # A model-level validator reports "tiers[0].name" style fields itself.
            if "[" in cause.field:
                location = (cause.field,)
        elif error["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = message.removeprefix("Value error, ")
        where = _format_location(location)
        origin = sources.get(location)
        problems.append(f"{where}: {message}" + (f" (from {origin})" if origin else ""))
    return problems
