"""The ``cachesvc`` command as a black box: serve, signals, check-config (SPEC §1, §5)."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.sidecar import Sidecar, tiers_config


def request(method: str, url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachesvc", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_embedded_default_serves_without_servers_and_exits_0_on_sigterm() -> None:
    with Sidecar() as sidecar:
        status, _, _ = request("PUT", sidecar.url + "/v1/cache/greeting", b"hello")
        assert status == 204
        status, headers, body = request("GET", sidecar.url + "/v1/cache/greeting")
        assert (status, headers["X-Cache-Tier"], body) == (200, "l1", b"hello")
        assert sidecar.terminate() == 0
    assert "embedded default" in sidecar.log and "l1=memory://" in sidecar.log


def test_three_tier_sidecar_exits_0_on_sigterm(
    redis_url: str, memcached_url: str, postgres_url: str
) -> None:
    config = tiers_config(redis_url, memcached_url, postgres_url)
    with Sidecar(config) as sidecar:
        assert request("PUT", sidecar.url + "/v1/cache/k", b"v")[0] == 204
        assert request("GET", sidecar.url + "/v1/cache/k")[2] == b"v"
        assert request("GET", sidecar.url + "/readyz")[0] == 200
        assert sidecar.terminate() == 0
    assert "l3=postgresql://" in sidecar.log


def test_workers_share_the_port_and_stop_together(
    clean_redis_url: str, clean_postgres_url: str
) -> None:
    config = tiers_config("memory://", clean_postgres_url) + (
        f'[invalidation]\nurl = "{clean_redis_url}"\n'
    )
    with Sidecar(config, None, "--workers", "2") as sidecar:
        for n in range(20):  # new connections: the kernel spreads them over the workers
            assert request("PUT", f"{sidecar.url}/v1/cache/k{n}", b"v")[0] == 204
        assert request("GET", sidecar.url + "/healthz")[0] == 200
        assert sidecar.terminate() == 0
    assert "Traceback" not in sidecar.log


def test_two_workers_read_their_writes(clean_redis_url: str, clean_postgres_url: str) -> None:
    """Each worker has its own in-process l1: a write answered by one reaches the other's
    before the answer (it was 21 of 40 fresh-connection GETs returning the old value)."""
    config = tiers_config("memory://", clean_postgres_url) + (
        f'[invalidation]\nurl = "{clean_redis_url}"\n'
    )
    with Sidecar(config, None, "--workers", "2") as sidecar:
        url = sidecar.url + "/v1/cache/ryw"
        assert request("PUT", url, b"v1")[0] == 204
        for _ in range(40):  # fresh connections: both workers' l1 now hold v1
            assert request("GET", url)[2] == b"v1"
        stale = 0
        for round_ in range(2, 12):
            value = f"v{round_}".encode()
            assert request("PUT", url, value)[0] == 204
            stale += sum(request("GET", url)[2] != value for _ in range(20))
        assert sidecar.terminate() == 0
    assert stale == 0


def test_workers_with_in_process_tiers_only_are_refused() -> None:
    result = run_cli("serve", "--port", "0", "--workers", "2")
    assert result.returncode == 2
    assert "refusing --workers with in-process tiers only" in result.stderr


def test_non_loopback_bind_without_token_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cachesvc", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "refusing to bind 0.0.0.0" in result.stderr and "CACHESVC_AUTH_TOKEN" in result.stderr


def test_check_config_accepts_the_spec_example(tmp_path: Path) -> None:
    config = tmp_path / "ok.toml"
    config.write_text(
        """
[server]
host = "127.0.0.1"
port = 8787
max_body_bytes = 1048576

[[tiers]]
name = "l1"
url = "redis://127.0.0.1:6379/0"
ttl = 300

[[tiers]]
name = "l2"
url = "memcached://127.0.0.1:11211,127.0.0.1:11212"
ttl = 3600

[[tiers]]
name = "l3"
url = "postgresql://postgres@127.0.0.1:5432/postgres"
ttl = 86400

[write]
strategy = "write-through"

[invalidation]
url = "redis://127.0.0.1:6379/0"
channel = "cachesvc:invalidate"
"""
    )
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('[[tiers]]\nurl = "bogus://x"\n', "tiers[0].url: unknown scheme 'bogus'"),
        (
            '[[tiers]]\nurl = "memory://"\n[[tiers]]\nurl = "bogus://x"\n',
            "tiers[1].url: unknown scheme",
        ),
        ('[server]\nport = "many"\n', "server.port:"),
        ("[server]\nprot = 1\n", "server.prot: unknown key"),
        ('[write]\nstrategy = "write-sideways"\n', "write.strategy:"),
        ('[[tiers]]\nurl = "memory://"\nttl = 0\n', "tiers[0].ttl:"),
        ('[[tiers]]\nurl = "memcached://host-without-port"\n', "tiers[0].url:"),
        (
            '[[tiers]]\nurl = "memory://"\n[[tiers]]\nname = "l1"\nurl = "memory://"\n',
            "duplicate tier name",
        ),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_check_config_names_the_field(tmp_path: Path, config: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config)
    result = run_cli("check-config", str(path))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = -1\nbogus = 2\n[[tiers]]\nurl = "nope://"\n')
    result = run_cli("check-config", str(path))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 3, result.stderr


def test_check_config_missing_file() -> None:
    result = run_cli("check-config", "/nonexistent/cachesvc.toml")
    assert result.returncode != 0 and "cannot read" in result.stderr
