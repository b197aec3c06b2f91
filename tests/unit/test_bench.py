"""The benchmark's pieces work at tiny scale (bench/). No timing is asserted: only that
the peers answer, the load generators count what they send, and the reports add up."""

from __future__ import annotations

import collections
import csv
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web

from bench import ab, loadgen, proc, profile, run, soak, wrk
from bench.proc import Webdis, webdis_config
from bench.workload import Values, Workload, ZipfSampler
from cachesvc.config import load_settings
from tests.sidecar import Sidecar

REPO = Path(__file__).resolve().parents[2]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -- the peers ------------------------------------------------------------------------------


def test_minimal_peer_answers_every_get_with_a_fixed_body() -> None:
    with proc.Peer("minimal", "--value-size", "10") as peer:
        assert _get(peer.url + "/v1/cache/anything") == (200, b"x" * 10)
        assert proc.peak_rss_bytes(peer.pid) > 0


def test_naive_peer_reads_redis(clean_redis_url: str) -> None:
    with redis.Redis.from_url(clean_redis_url) as client:
        client.set("naive:1", b"value")
    with proc.Peer("naive", "--redis", clean_redis_url) as peer:
        assert _get(peer.url + "/v1/cache/naive:1") == (200, b"value")
        assert _get(peer.url + "/v1/cache/naive:2")[0] == 404


def test_webdis_config_points_at_the_bench_redis(tmp_path: Path) -> None:
    config = webdis_config(6400, 7400, tmp_path / "webdis.log")
    assert config["redis_host"] == config["http_host"] == "127.0.0.1"
    assert (config["redis_port"], config["http_port"]) == (6400, 7400)
    assert config["daemonize"] is False  # stays the child the bench started, its pid known
    assert config["threads"] == 1
    assert config["logfile"] == str(tmp_path / "webdis.log")
    assert json.loads(json.dumps(config)) == config


@pytest.mark.skipif(Webdis.available() is None, reason="webdis is not installed")
async def test_webdis_peer_answers_raw_values_on_kept_connections(clean_redis_url: str) -> None:
    redis_port = int(clean_redis_url.split(":")[2].split("/")[0])
    with redis.Redis.from_url(clean_redis_url) as client:
        client.set("naive:1", b"x" * 100)
    with Webdis(redis_port) as webdis:
        assert webdis.pid is not None and proc.cpu_seconds(webdis.pid) >= 0
        host = webdis.url.removeprefix("http://")
        path = run.BY_KEY["webdis"].path
        query = run.BY_KEY["webdis"].query
        status, body = _get(f"{webdis.url}{path}1?{query}")
        assert (status, body) == (200, b"x" * 100)  # the value, not webdis' JSON
        assert _get(f"{webdis.url}{path}2?{query}")[0] == 404
        pool = loadgen.HttpPool("127.0.0.1", int(host.split(":")[1]))
        request = loadgen.build_request("GET", f"{path}1?{query}", host)
        try:
            assert [await pool.request(request) for _ in range(3)] == [200, 200, 200]
        finally:
            pool.close()
        assert pool.opened == 1  # keep-alive, as the load generators need


# -- the Python load generator --------------------------------------------------------------


@pytest.fixture
async def counting_server() -> AsyncIterator[tuple[int, collections.Counter[str]]]:
    """A server that counts requests by method: 200 for /ok*, 404 for anything else,
    204 for PUT."""
    seen: collections.Counter[str] = collections.Counter()

    async def handle(request: web.Request) -> web.Response:
        seen[request.method] += 1
        if request.method == "PUT":
            await request.read()
            return web.Response(status=204)
        if request.path.startswith("/ok"):
            return web.Response(body=b"hello")
        return web.json_response({"error": "not_found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, seen
    finally:
        await runner.cleanup()


async def test_closed_loop_counts_every_answer(
    counting_server: tuple[int, collections.Counter[str]],
) -> None:
    port, seen = counting_server
    host = f"127.0.0.1:{port}"
    requests = [
        loadgen.build_request("GET", "/ok/1", host),
        loadgen.build_request("GET", "/missing", host),
        loadgen.build_request("PUT", "/ok/2", host, b"body"),
    ]
    result = await loadgen.closed_loop("127.0.0.1", port, requests, connections=7, total=300)
    assert result.requests == 300
    assert result.statuses == {200: 100, 404: 100, 204: 100}
    assert result.errors == 100  # the 404s
    assert result.socket_errors == 0
    assert len(result.latencies) == 300
    assert seen == {"GET": 200, "PUT": 100}


async def test_closed_loop_takes_a_request_function(
    counting_server: tuple[int, collections.Counter[str]],
) -> None:
    port, seen = counting_server
    made: list[int] = []

    def make(i: int) -> bytes:
        made.append(i)
        return loadgen.build_request("GET", f"/ok/{i}", f"127.0.0.1:{port}")

    result = await loadgen.closed_loop("127.0.0.1", port, make, connections=3, total=50)
    assert result.statuses == {200: 50}
    assert sorted(made) == list(range(50))
    assert seen == {"GET": 50}


async def test_closed_loop_fails_when_nothing_listens() -> None:
    from tests.servers import free_port

    port = free_port()  # nothing listens there
    with pytest.raises(OSError):
        await loadgen.closed_loop("127.0.0.1", port, [b""], connections=1, total=1)


async def test_open_loop_sends_every_scheduled_request(
    counting_server: tuple[int, collections.Counter[str]],
) -> None:
    port, seen = counting_server
    pool = loadgen.HttpPool("127.0.0.1", port)
    request = loadgen.build_request("GET", "/ok", f"127.0.0.1:{port}")
    calls: list[int] = []

    async def call(i: int) -> int:
        calls.append(i)
        return await pool.request(request)

    try:
        result = await loadgen.open_loop(call, rate=500, duration=0.2)
    finally:
        pool.close()
    assert sorted(calls) == list(range(100))
    assert result.statuses == {200: 100}
    assert len(result.latencies) == len(result.send_lag) == 100
    assert seen == {"GET": 100}
    summary = result.summary()
    assert summary["requests"] == 100
    assert summary["errors"] == 0


def test_key_requests_walk_the_keys_from_an_offset() -> None:
    requests = loadgen.key_requests(
        "http://127.0.0.1:9/v1/cache/k:", 4, "PUT", b"abc", "strategy=write-behind", offset=2
    )
    first_lines = [r.split(b"\r\n", 1)[0] for r in requests]
    assert first_lines == [
        b"PUT /v1/cache/k:%d?strategy=write-behind HTTP/1.1" % i for i in (2, 3, 0, 1)
    ]
    assert all(b"\r\nContent-Length: 3\r\n\r\nabc" in r for r in requests)
    assert all(b"\r\nHost: 127.0.0.1:9\r\n" in r for r in requests)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 0.5) == 50
    assert loadgen.percentile(values, 0.99) == 99
    assert loadgen.percentile(values, 1.0) == 100
    assert loadgen.percentile([7.0], 0.99) == 7


# -- wrk ------------------------------------------------------------------------------------

WRK_REPORT = """\
Running 5s test @ http://127.0.0.1:40000
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.59ms    1.04ms  40.72ms   96.95%
    Req/Sec    41.59k     4.64k   45.47k    86.67%
  Latency Distribution
     50%  812.00us
     75%    1.54ms
     90%    2.00ms
     99%    1.20s
  124054 requests in 5.00s, 48.39MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 17
Requests/sec:  24810.80
Transfer/sec:     16.12MB
"""


def test_wrk_report_is_parsed() -> None:
    result = wrk.parse(WRK_REPORT)
    assert result.requests == 124054
    assert result.elapsed == 5.0
    assert result.rps == 24810.80
    assert result.p50 == pytest.approx(812e-6)
    assert result.p90 == pytest.approx(2e-3)
    assert result.p99 == pytest.approx(1.2)
    assert result.errors == 17 + 3


def test_wrk_report_without_errors() -> None:
    clean = "\n".join(
        line for line in WRK_REPORT.splitlines() if "errors" not in line and "Non-2xx" not in line
    )
    assert wrk.parse(clean).errors == 0


@pytest.mark.skipif(wrk.available() is None, reason="wrk is not installed")
def test_wrk_runs_the_keys_script() -> None:
    with proc.Peer("minimal") as peer:
        result = wrk.run(peer.url, "/v1/cache/k:", 100, duration=1, connections=4)
    assert result.requests > 0
    assert result.errors == 0


# -- the workload of the locustfile ---------------------------------------------------------


def test_workload_defaults() -> None:
    workload = Workload.from_env({})
    assert workload == Workload()
    assert workload.headers() == {}


def test_workload_from_environment() -> None:
    workload = Workload.from_env(
        {
            "CACHESVC_LOAD_KEYS": "500",
            "CACHESVC_LOAD_ZIPF_S": "0",
            "CACHESVC_LOAD_READ_RATIO": "0.75",
            "CACHESVC_LOAD_VALUE_SIZE": "10-20",
            "CACHESVC_LOAD_STRATEGY": "write-through, write-behind",
            "CACHESVC_AUTH_TOKEN": "fallback",
        }
    )
    assert workload.keys == 500
    assert workload.zipf_s == 0
    assert workload.read_ratio == 0.75
    assert workload.value_size == (10, 20)
    assert workload.strategies == ("write-through", "write-behind")
    assert workload.headers() == {"Authorization": "Bearer fallback"}
    assert workload.cache_path == "/v1/cache/"


def test_workload_in_a_namespace_with_its_own_token() -> None:
    workload = Workload.from_env(
        {
            "CACHESVC_LOAD_NAMESPACE": "orders",
            "CACHESVC_LOAD_TOKEN": "orders-token",
            "CACHESVC_AUTH_TOKEN": "fallback",
        }
    )
    assert workload.cache_path == "/v1/ns/orders/cache/"
    assert workload.headers() == {"Authorization": "Bearer orders-token"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CACHESVC_LOAD_KEYS", "many"),
        ("CACHESVC_LOAD_KEYS", "0"),
        ("CACHESVC_LOAD_ZIPF_S", "-1"),
        ("CACHESVC_LOAD_READ_RATIO", "1.5"),
        ("CACHESVC_LOAD_VALUE_SIZE", "20-10"),
        ("CACHESVC_LOAD_VALUE_SIZE", "big"),
        ("CACHESVC_LOAD_STRATEGY", "write-sideways"),
        ("CACHESVC_LOAD_NAMESPACE", "Orders"),
    ],
)
def test_workload_names_the_bad_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Workload.from_env({name: value})


def test_zipf_sampler_prefers_low_ranks() -> None:
    sampler = ZipfSampler(1000, 1.0, random.Random(42))
    counts = collections.Counter(sampler.sample() for _ in range(20_000))
    assert set(counts) <= set(range(1000))
    assert counts.most_common(1)[0][0] == 0
    assert counts[0] > counts[1] > counts[10] > counts[500]
    assert sampler.probability(0) == pytest.approx(2 * sampler.probability(1))
    assert sum(sampler.probability(k) for k in range(1000)) == pytest.approx(1.0)


def test_zipf_sampler_with_s_zero_is_uniform() -> None:
    sampler = ZipfSampler(4, 0.0, random.Random(1))
    assert {sampler.probability(k) for k in range(4)} == {0.25}
    assert set(sampler.sample() for _ in range(1000)) == {0, 1, 2, 3}


def test_zipf_sampler_is_deterministic_with_a_seed() -> None:
    def draw() -> list[int]:
        sampler = ZipfSampler(100, 1.2, random.Random(7))
        return [sampler.sample() for _ in range(50)]

    assert draw() == draw()


def test_values_have_the_configured_sizes() -> None:
    values = Values((3, 9), random.Random(3))
    sizes = {len(values.next()) for _ in range(500)}
    assert sizes == set(range(3, 10))


locust_missing = importlib.util.find_spec("locust") is None


@pytest.mark.skipif(locust_missing, reason="locust is not installed (pip install locust)")
def test_locustfile_imports_with_its_weights() -> None:
    # In a child process: importing Locust monkey-patches this one with gevent.
    code = (
        "import bench.locustfile as f; t = f.CacheUser.tasks; "
        "print(sorted((x.__name__, t.count(x)) for x in set(t)))"
    )
    env = {**os.environ, "CACHESVC_LOAD_READ_RATIO": "0.95"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('get', 19), ('put', 1)]"


def run_locust(url: str, env: dict[str, str], tmp_path: Path) -> dict[str, dict[str, str]]:
    """Two seconds of two users against ``url``; Locust's statistics by request name."""
    locust = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    done = subprocess.run(
        [
            locust, "-f", "bench/locustfile.py", "--headless", "-u", "2", "-r", "2",
            "-t", "2s", "--host", url, "--csv", str(tmp_path / "out"),
            "--only-summary", "--loglevel", "WARNING",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "out_stats.csv", newline="") as stats:
        return {row["Name"]: row for row in csv.DictReader(stats)}


@pytest.mark.skipif(locust_missing, reason="locust is not installed (pip install locust)")
def test_locust_headless_run_splits_stats_by_tier(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")} | {
        "CACHESVC_LOAD_KEYS": "20",
        "CACHESVC_LOAD_READ_RATIO": "0.5",
    }
    with Sidecar() as sidecar:  # the embedded default: one memory tier
        rows = run_locust(sidecar.url, env, tmp_path)
    assert "PUT write-through" in rows
    assert "GET [l1]" in rows
    assert rows["Aggregated"]["Failure Count"] == "0"


@pytest.mark.skipif(locust_missing, reason="locust is not installed (pip install locust)")
def test_locust_in_a_namespace_with_a_scoped_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")} | {
        "CACHESVC_LOAD_KEYS": "20",
        "CACHESVC_LOAD_READ_RATIO": "0.5",
        "CACHESVC_LOAD_NAMESPACE": "orders",
        "CACHESVC_LOAD_TOKEN": "orders-secret",
    }
    config = (
        '[[namespaces]]\nname = "orders"\n'
        '[[tokens]]\nname = "orders-api"\nsecret_env = "ORDERS_TOKEN"\n'
        'scopes = ["orders:read", "orders:write"]\n'
    )
    with Sidecar(config, {"ORDERS_TOKEN": "orders-secret"}) as sidecar:
        rows = run_locust(sidecar.url, env, tmp_path)
        samples = run.scrape(sidecar.url)
    assert rows["Aggregated"]["Failure Count"] == "0"
    in_orders = sum(
        value
        for (name, labels), value in samples.items()
        if name == "cachesvc_requests_total" and ("namespace", "orders") in labels
    )
    assert in_orders >= int(rows["Aggregated"]["Request Count"]) > 0


# -- the reports ----------------------------------------------------------------------------

METRICS_BEFORE = """\
# HELP cachesvc_tier_hits_total Reads a tier answered.
cachesvc_tier_hits_total{tier="l1"} 10.0
cachesvc_tier_hits_total{tier="l2"} 5.0
cachesvc_tier_batch_keys_count{operation="get",tier="l1"} 4.0
cachesvc_tier_batch_keys_sum{operation="get",tier="l1"} 20.0
cachesvc_journal_depth 3.0
"""
METRICS_AFTER = """\
cachesvc_tier_hits_total{tier="l1"} 12.0
cachesvc_tier_hits_total{tier="l2"} 105.0
cachesvc_tier_hits_total{tier="l3"} 0.0
cachesvc_tier_batch_keys_count{operation="get",tier="l1"} 14.0
cachesvc_tier_batch_keys_sum{operation="get",tier="l1"} 100.0
cachesvc_tier_batch_keys_count{operation="set",tier="l1"} 1.0
cachesvc_journal_depth 0.0
"""


def test_served_by_and_batch_sizes_between_scrapes() -> None:
    before, after = run.parse_metrics(METRICS_BEFORE), run.parse_metrics(METRICS_AFTER)
    assert before[("cachesvc_journal_depth", frozenset())] == 3.0
    assert run.served_by(before, after) == {"l1": 2, "l2": 100}
    assert run.mean_batch(before, after, "l1", "get") == 8.0
    assert run.mean_batch(before, after, "l2", "get") is None


def test_table_ratios_and_verdicts() -> None:
    rows = [
        run.Row("minimal", "minimal", 1000.0, 1.0, 2.0, 10_000, 0),
        run.Row("naive", "naive", 400.0, 2.0, 4.0, 4000, 0),
        run.Row("l1", "l1 hit", 880.0, 1.1, 2.2, 8800, 0, {"l1": 99, "l2": 1}, "l1"),
    ]
    for row in rows:
        row.ratio_minimal = row.rps / rows[0].rps
        row.ratio_naive = row.rps / rows[1].rps
    text = run.table(rows)
    assert "0.88x" in text and "2.20x" in text and "l1 99.0%" in text
    assert run.table(rows, markdown=True).count("\n") == 4
    verdicts = run.verdicts(rows)
    assert verdicts[0].endswith("accepted")  # 0.88 >= 0.85
    assert verdicts[1].endswith("accepted")  # 2.2: below 2.5, above 2.0
    combined = run.combine([rows[2], rows[2]])
    assert combined.requests == 17_600
    assert combined.served_by == {"l1": 198, "l2": 2}


def cpu_row(scenario: str, per_1k: float, cpu_wait: float = 0.0) -> run.CpuRow:
    return run.CpuRow(scenario, scenario, 2000.0, 1999.0, 20_000, 0, per_1k, 0.5, 2.0, cpu_wait)


def test_cpu_rounds_combine_to_medians_of_the_undisturbed() -> None:
    rounds = [cpu_row("l1", 0.150), cpu_row("l1", 0.900, cpu_wait=0.2), cpu_row("l1", 0.170)]
    rounds.append(cpu_row("l1", 0.160))
    combined = run.combine_cpu(rounds)
    assert combined.cpu_per_1k == pytest.approx(0.160)  # 0.900 was disturbed: left out
    assert combined.rounds_per_1k == [0.150, 0.900, 0.170, 0.160]
    assert (combined.rounds_used, combined.requests) == (3, 60_000)
    everything_disturbed = run.combine_cpu([cpu_row("l1", 0.2, 0.5), cpu_row("l1", 0.4, 0.5)])
    assert everything_disturbed.cpu_per_1k == pytest.approx(0.3)


def test_cpu_table_shows_seconds_per_thousand_and_the_ratio() -> None:
    rows = [cpu_row("minimal", 0.080), cpu_row("l1", 0.152)]
    rows[1].ratio_minimal = 1.9
    text = run.cpu_table(rows)
    assert "CPU-s / 1k req" in text.splitlines()[0]
    assert "0.152" in text and "152.0" in text and "1.90x" in text
    markdown = run.cpu_table(rows, markdown=True).splitlines()
    assert len(markdown) == 4 and markdown[1] == "|" + "---|" * 9
    assert markdown[3].startswith("| l1 | 0.152 | 152.0 | 1.90x | 1,999 |")


def test_sidecar_configs_are_valid(tmp_path: Path) -> None:
    configs = run.sidecar_configs(6379, "memcached://127.0.0.1:11211", "postgresql://pg/db")
    for name, config in configs.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(config)
        settings = load_settings(path, environ={})
        assert [t.name for t in settings.tiers][:2] == ["l1", "l2"]


def test_soak_verdict() -> None:
    def series(rss: list[float], fds: list[int]) -> list[soak.Sample]:
        return [
            soak.Sample(t=5.0 * i, rss=int(r * soak.MiB), fds=f, requests=100, errors=0)
            for i, (r, f) in enumerate(zip(rss, fds, strict=True))
        ]

    warm_then_flat = series([40, 60, 70, 80, 80.5, 80, 80.2, 80.4, 80.1], [20, 30, 31] + [31] * 6)
    assert soak.verdict(warm_then_flat).flat
    growing = series([40, 60, 70, 80, 90, 100, 110, 120, 130], [31] * 9)
    result = soak.verdict(growing)
    assert not result.flat and "RSS grew" in result.reason
    assert result.rss_slope_mib_per_min > 0
    leaking_fds = series([80] * 9, [31, 31, 31, 31, 32, 33, 40, 45, 50])
    assert "fds grew" in soak.verdict(leaking_fds).reason
    with pytest.raises(ValueError):
        soak.verdict(growing[:5])


def test_profile_summary() -> None:
    stacks = profile.parse(
        [
            "run_app (aiohttp/web.py:1);handle (/x/site-packages/aiohttp/web_protocol.py:5) 3\n",
            "run_app (aiohttp/web.py:1);get (cachesvc/handlers.py:9) 1\n",
        ]
    )
    summary = profile.summarize(stacks)
    assert summary["self"][0] == ("handle (aiohttp/web_protocol.py)", 0.75)
    assert ("run_app (aiohttp/web.py)", 1.0) in summary["inclusive"]


def test_stat_cpu_ticks_adds_user_system_and_waited_for_children() -> None:
    fields = " ".join(str(n) for n in range(1, 11))  # ppid .. cmajflt
    line = f"4242 (a) b (c)) S {fields} 100 20 3 4 20 0 1 0 99 ...\n"
    assert proc.stat_cpu_ticks(line) == 100 + 20 + 3 + 4


BURN = """
import time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("burnt", flush=True)
input()
"""


def test_cpu_seconds_counts_children_alive_and_reaped() -> None:
    """A parent that only waits is charged the CPU its child burnt, while the child lives
    and once it has been reaped."""
    parent_code = (
        f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN!r}])\n"
        "print('reaped', flush=True)\ninput()\n"
    )
    burnt = 0.3 - 2 / proc.CLOCK_TICKS  # stat counts whole ticks
    with subprocess.Popen(
        [sys.executable, "-c", parent_code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as parent:
        assert parent.stdin is not None and parent.stdout is not None
        try:
            assert parent.stdout.readline() == "burnt\n"
            assert proc.cpu_seconds(parent.pid) >= burnt  # the child, alive
            parent.stdin.write("\n")
            parent.stdin.flush()
            assert parent.stdout.readline() == "reaped\n"
            assert proc.cpu_seconds(parent.pid) >= burnt  # the child, reaped: in cutime
            parent.stdin.write("\n")
            parent.stdin.flush()
            assert parent.wait(30) == 0
        finally:
            parent.kill()


def run_bench(tmp_path: Path, *arguments: str, timeout: float) -> tuple[str, dict[str, Any]]:
    """``python -m bench.run`` with ``arguments``, its results in ``tmp_path``: what it
    printed and its JSON report."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", *arguments, "--results", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = tmp_path.glob("bench-*.json")
    return done.stdout, json.loads(report.read_text())


@pytest.mark.skipif(wrk.available() is None, reason="wrk is not installed")
def test_bench_run_measures_rss_after_a_write_behind_burst(tmp_path: Path) -> None:
    """The RSS check alone: a one-second burst of 16 KiB write-behind PUTs, the journal
    drained, the sidecar's RSS before and after reported."""
    output, document = run_bench(
        tmp_path,
        *("--scenarios", "minimal", "--duration", "0", "--latency-duration", "0"),
        *("--cpu-duration", "0", "--rss-burst", "1"),
        timeout=180,
    )
    check = document["rss_after_write_behind"]
    assert check["requests"] > 0 and check["drained_after_s"] is not None
    assert check["rss_before"] > 0 and check["rss_at_end"] > 0 and check["rss_after"] > 0
    assert check["ratio"] == check["rss_after"] / check["rss_before"]
    assert "write-behind PUTs at c256" in output


def test_process_readings() -> None:
    pid = os.getpid()
    assert proc.rss_bytes(pid) > 0
    assert proc.peak_rss_bytes(pid) >= proc.rss_bytes(pid) // 2
    assert proc.open_fds(pid) > 0
    on_cpu, waiting = proc.schedstat(pid)
    assert on_cpu > 0 and waiting >= 0
    assert {"nproc", "cpu_model", "python"} <= set(proc.machine())


def test_bench_run_end_to_end_at_tiny_scale(tmp_path: Path) -> None:
    """The whole orchestration, two scenarios, a second each, the Python load generator."""
    _, document = run_bench(
        tmp_path,
        *("--scenarios", "minimal,l1", "--duration", "1", "--warmup", "0", "--connections", "4"),
        *("--latency-duration", "0.3", "--rate", "100", "--loadgen", "python"),
        *("--cpu-duration", "0.5", "--cpu-rate", "200", "--cpu-scenarios", "minimal,l1"),
        timeout=120,
    )
    by_key = {s["scenario"]: s for s in document["scenarios"]}
    assert by_key["minimal"]["requests"] > 0
    assert by_key["l1"]["errors"] == 0
    assert by_key["l1"]["tier_share"] == 1.0
    assert document["added_latency"]["cachesvc_l1"]["requests"] == 30
    assert document["peak_rss_bytes"]["three-tier"] > 0
    cpu = {row["scenario"]: row for row in document["fixed_rate_cpu"]}
    assert set(cpu) == {"minimal", "l1"}
    assert [(cpu[s]["requests"], cpu[s]["errors"]) for s in cpu] == [(100, 0), (100, 0)]
    assert all(row["cpu_per_1k"] >= 0 for row in cpu.values())
    (markdown,) = tmp_path.glob("bench-*.md")
    assert "CPU-seconds per 1,000 requests" in markdown.read_text()


def test_key_sets_shrink_to_the_fill_budget_with_large_values() -> None:
    l1 = run.BY_KEY["l1"]
    assert run.within_budget(l1, 256) is l1  # 10,000 keys of 256 bytes fit
    large = run.within_budget(l1, 1_000_000)
    assert large.keys * 1_000_000 <= run.FILL_BUDGET < (large.keys + 1) * 1_000_000
    assert large.path == l1.path and large.tier == l1.tier
    assert run.within_budget(l1, 100 * 1024 * 1024).keys == run.MIN_KEYS


def test_ab_compares_two_checkouts_round_by_round(capsys: pytest.CaptureFixture[str]) -> None:
    """bench.ab against this very checkout: both sidecars answer, write-behind drains, and
    each round and the ratios are reported (what the numbers are is the machine's)."""
    repo = Path(__file__).resolve().parents[2]
    argv = [str(repo), "--scenario", "put-wb", "--rounds", "2", "--duration", "0.5"]
    assert ab.main([*argv, "--rate", "200", "--connections", "8"]) == 0
    out = capsys.readouterr().out
    for turn, name in ((1, "this"), (1, "other"), (2, "this"), (2, "other")):
        line = next(line for line in out.splitlines() if line.startswith(f"round {turn} {name}"))
        assert line.endswith("errors 0"), line
    assert "this/other CPU, fixed rate:" in out
    assert "(rounds: " in out
