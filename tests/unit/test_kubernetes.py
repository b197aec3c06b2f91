"""deploy/kubernetes/pod.yaml, read as data (no cluster here): probes and scraping on the
operations port, the token from a Secret the user creates, a config that validates."""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from cachesvc.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def manifests() -> dict[str, Manifest]:
    documents = [d for d in yaml.safe_load_all((DEPLOY / "pod.yaml").read_text()) if d]
    return {document["kind"]: document for document in documents}


def sidecar(manifests: dict[str, Manifest]) -> Manifest:
    spec = manifests["Pod"]["spec"]
    (container,) = [c for c in spec["initContainers"] if c["name"] == "cachesvc"]
    return container


def config_text(manifests: dict[str, Manifest]) -> str:
    text: str = manifests["ConfigMap"]["data"]["cachesvc.toml"]
    return text


def ops_port(manifests: dict[str, Manifest]) -> int:
    port: int = tomllib.loads(config_text(manifests))["server"]["ops_port"]
    return port


def test_no_secret_is_applied_and_the_readme_creates_the_one_used(
    manifests: dict[str, Manifest],
) -> None:
    assert "Secret" not in manifests
    (token,) = [e for e in sidecar(manifests)["env"] if e["name"] == "CACHESVC_AUTH_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    create = f"kubectl create secret generic {ref['name']} --from-literal={ref['key']}="
    assert create in (DEPLOY / "README.md").read_text()


def test_probes_are_http_gets_on_the_operations_port(manifests: dict[str, Manifest]) -> None:
    container = sidecar(manifests)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"ops": ops_port(manifests)}
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == "ops", probe
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }


def test_prometheus_annotations_name_the_operations_port(manifests: dict[str, Manifest]) -> None:
    annotations = manifests["Pod"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ops_port(manifests))
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_config_is_valid_and_keeps_the_api_on_loopback(
    manifests: dict[str, Manifest], tmp_path: Path
) -> None:
    path = tmp_path / "cachesvc.toml"
    path.write_text(config_text(manifests))
    settings = load_settings(path, environ={})
    assert settings.server.host == "127.0.0.1"


def test_the_config_is_mounted_where_the_sidecar_reads_it(manifests: dict[str, Manifest]) -> None:
    container = sidecar(manifests)
    args = container["args"]
    config = PurePosixPath(args[args.index("--config") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "cachesvc-config"]
    assert config.parent == PurePosixPath(mount["mountPath"])
    assert config.name in manifests["ConfigMap"]["data"]
