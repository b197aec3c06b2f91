"""docker-compose.yml, read as data: no Docker engine is needed (nor available in CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cachesvc.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
CONFIG_TARGET = "/etc/cachesvc/cachesvc.toml"
# ${VAR}, ${VAR:-default}, ${VAR-default}: the compose interpolation forms this file may use.
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::?-(?P<default>[^}]*))?\}")

Service = dict[str, Any]


@pytest.fixture(scope="module")
def services() -> dict[str, Service]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    found: dict[str, Service] = document["services"]
    return found


def interpolate(value: str) -> str:
    """``value`` as compose would expand it in an environment that sets none of its variables."""
    return _INTERPOLATION.sub(lambda match: match["default"] or "", value)


def environment(service: Service) -> dict[str, str | None]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the list form: ["NAME=value", "NAME"]
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {name: None if value is None else interpolate(str(value)) for name, value in env.items()}


def command(service: Service) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def image(service: Service) -> str:
    return str(service.get("image", ""))


def bind_mounts(service: Service) -> dict[str, Path]:
    """Container path -> repository path, for mounts of repository files (short or long syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":")
        else:
            source, target = volume.get("source", ""), volume["target"]
        if source.startswith("."):
            mounts[target] = ROOT / source
    return mounts


def config_mount(service: Service) -> tuple[Path, str]:
    """The repository file mounted at CONFIG_TARGET."""
    source = bind_mounts(service).get(CONFIG_TARGET)
    assert source is not None, f"nothing mounted at {CONFIG_TARGET}"
    return source, CONFIG_TARGET


def named(services: dict[str, Service], predicate: Any) -> list[str]:
    return [name for name, service in services.items() if predicate(service)]


def test_every_kind_of_service_is_declared(services: dict[str, Service]) -> None:
    assert named(services, lambda s: image(s).startswith("redis:"))
    assert named(services, lambda s: image(s).startswith("memcached:"))
    assert named(services, lambda s: image(s).startswith("postgres:"))
    assert "build" in services["cachesvc"], "cachesvc is built from this repository"
    assert len(named(services, lambda s: "--master" in command(s))) == 1, "one locust master"
    assert named(services, lambda s: "--worker" in command(s)), "locust workers"


def test_locust_workers_find_their_master(services: dict[str, Service]) -> None:
    (master,) = named(services, lambda s: "--master" in command(s))
    assert "http://cachesvc:8787" in command(services[master])
    for name in named(services, lambda s: "--worker" in command(s)):
        args = command(services[name])
        assert args[args.index("--master-host") + 1] == master, name


def test_mounted_files_exist(services: dict[str, Service]) -> None:
    # A missing bind-mount source is not an error to Docker: it creates an empty directory.
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"


def test_locust_runs_the_mounted_locustfile(services: dict[str, Service]) -> None:
    for name in named(services, lambda s: image(s).startswith("locustio/locust")):
        args = command(services[name])
        locustfile = PurePosixPath(args[args.index("-f") + 1])
        mounts = bind_mounts(services[name])
        (target,) = [t for t in mounts if locustfile.is_relative_to(t)]
        assert (mounts[target] / locustfile.relative_to(target)).is_file(), name


def test_every_dependency_is_a_declared_service(services: dict[str, Service]) -> None:
    for name, service in services.items():
        for dependency in service.get("depends_on", []):  # list form, or map form's keys
            assert dependency in services, f"{name} depends on undeclared {dependency!r}"
            assert dependency != name


def test_the_dockerfile_runs_the_mounted_config() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    (cmd,) = [line for line in dockerfile.splitlines() if line.startswith("CMD ")]
    assert CONFIG_TARGET in cmd


def test_the_sidecar_config_is_valid_and_names_compose_services(
    services: dict[str, Service],
) -> None:
    service = services["cachesvc"]
    source, _ = config_mount(service)
    assert source.is_file(), source
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
    env.update({k: v for k, v in environment(service).items() if v is not None})
    result = subprocess.run(
        [sys.executable, "-m", "cachesvc", "check-config", str(source)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    settings = load_settings(source, environ={})
    urls = [tier.url for tier in settings.tiers] + [settings.invalidation.url or ""]
    for url in urls:
        assert urlsplit(url).hostname in services, f"{url}: not a compose service"


def test_the_token_reaches_the_sidecar_and_its_load_test(services: dict[str, Service]) -> None:
    token = environment(services["cachesvc"]).get("CACHESVC_AUTH_TOKEN")
    # SPEC §5: a non-loopback bind without a token is refused at start-up.
    assert token, "cachesvc binds 0.0.0.0 in compose: it needs CACHESVC_AUTH_TOKEN"
    source, _ = config_mount(services["cachesvc"])
    assert load_settings(source, environ={}).server.host == "0.0.0.0"
    for name in named(services, lambda s: image(s).startswith("locustio/locust")):
        env = environment(services[name])
        given = env.get("CACHESVC_AUTH_TOKEN")
        assert given == token, f"{name} does not send the sidecar's token"
