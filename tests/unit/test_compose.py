"""docker-compose.yml, read as data: no Docker engine is needed (nor available in CI)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
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


def sidecar_config(services: dict[str, Service]) -> dict[str, Any]:
    """The sidecar's config file as TOML data."""
    source, _ = config_mount(services["cachesvc"])
    with source.open("rb") as file:
        return tomllib.load(file)


def mounted(service: Service, target: str) -> Path:
    source = bind_mounts(service).get(target)
    assert source is not None, f"nothing mounted at {target}"
    return source


def service_at(services: dict[str, Service], url: str) -> Service:
    host = urlsplit(url).hostname
    assert host in services, f"{url}: not a compose service"
    return services[host]


def test_every_kind_of_service_is_declared(services: dict[str, Service]) -> None:
    assert named(services, lambda s: image(s).startswith("redis:"))
    assert named(services, lambda s: image(s).startswith("memcached:"))
    assert named(services, lambda s: image(s).startswith("postgres:"))
    assert named(services, lambda s: image(s).startswith("prom/prometheus:"))
    assert named(services, lambda s: image(s).startswith("grafana/grafana:"))
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
    urls = [tier.url for tier in settings.tiers]
    urls += [settings.invalidation.url or "", settings.write.journal_url or ""]
    for url in urls:
        assert urlsplit(url).hostname in services, f"{url}: not a compose service"


def test_the_token_reaches_the_sidecar_and_its_load_test(services: dict[str, Service]) -> None:
    token = environment(services["cachesvc"]).get("CACHESVC_AUTH_TOKEN")
    # A non-loopback bind without a token is refused at start-up.
    assert token, "cachesvc binds 0.0.0.0 in compose: it needs CACHESVC_AUTH_TOKEN"
    assert sidecar_config(services)["server"]["host"] == "0.0.0.0"
    for name in named(services, lambda s: image(s).startswith("locustio/locust")):
        env = environment(services[name])
        given = env.get("CACHESVC_AUTH_TOKEN")
        assert given == token, f"{name} does not send the sidecar's token"


def test_the_journal_redis_persists_every_write_apart_from_the_tier(
    services: dict[str, Service],
) -> None:
    config = sidecar_config(services)
    journal = service_at(services, config["write"]["journal_url"])
    args = command(journal)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    assert any(target == "/data" for target in volume_targets(journal)), "its AOF in a volume"
    # Flushing the Redis tier must not delete the journal.
    redis_tiers = [t["url"] for t in config["tiers"] if t["url"].startswith("redis")]
    assert redis_tiers and all(service_at(services, url) is not journal for url in redis_tiers)


def volume_targets(service: Service) -> list[str]:
    targets = []
    for volume in service.get("volumes", []):
        targets.append(volume.split(":")[1] if isinstance(volume, str) else volume["target"])
    return targets


def test_prometheus_scrapes_the_sidecar_ops_port(services: dict[str, Service]) -> None:
    (name,) = named(services, lambda s: image(s).startswith("prom/prometheus:"))
    scrape = yaml.safe_load(mounted(services[name], "/etc/prometheus/prometheus.yml").read_text())
    ops_port = sidecar_config(services)["server"]["ops_port"]
    targets = [
        target
        for job in scrape["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert f"cachesvc:{ops_port}" in targets
    # The sidecar's own health check asks the same listener.
    assert f"127.0.0.1:{ops_port}/readyz" in " ".join(services["cachesvc"]["healthcheck"]["test"])


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    services: dict[str, Service],
) -> None:
    (prometheus,) = named(services, lambda s: image(s).startswith("prom/prometheus:"))
    (name,) = named(services, lambda s: image(s).startswith("grafana/grafana:"))
    grafana = services[name]
    provisioning = "/etc/grafana/provisioning"
    sources = [t for t in bind_mounts(grafana) if t.startswith(f"{provisioning}/datasources/")]
    (datasource,) = yaml.safe_load(mounted(grafana, sources[0]).read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert urlsplit(datasource["url"]).hostname == prometheus

    boards = [t for t in bind_mounts(grafana) if t.startswith(f"{provisioning}/dashboards/")]
    (provider,) = yaml.safe_load(mounted(grafana, boards[0]).read_text())["providers"]
    folder = PurePosixPath(provider["options"]["path"])
    dashboards = {
        source.resolve()
        for target, source in bind_mounts(grafana).items()
        if PurePosixPath(target).parent == folder
    }
    assert dashboards == {(ROOT / "docs" / "grafana-dashboard.json").resolve()}
    # The dashboard picks its data source through a variable of type prometheus.
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == datasource["type"]
