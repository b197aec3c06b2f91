"""Processes the benchmarks start and watch: the peers (bench/peers.py's and webdis), CPU
pinning, RSS, CPU time and fd readings.

Linux only (/proc and sched_setaffinity), like tests/servers.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

# Its walk of /proc by parent pid (/proc/<pid>/task/<tid>/children is not on every kernel).
from tests.servers import LOOPBACK, Server, ServerError, _descendants, free_port

REPO = Path(__file__).resolve().parent.parent


# -- CPUs -----------------------------------------------------------------------------------


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(load CPUs, server CPUs): the server under test gets the last CPU to itself, the
    load generator and the backing servers share the others. None on a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return set(cpus[:-1]), {cpus[-1]}


def pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (threads made later inherit from the thread making them)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(tid), cpus)


# -- readings -------------------------------------------------------------------------------


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no {field}")


def rss_bytes(pid: int) -> int:
    """Resident set size now."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int) -> int:
    """The highest resident set size since the process started (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


# -- peers ----------------------------------------------------------------------------------


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 2xx; RuntimeError when ``proc`` exits or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if 200 <= response.status < 300:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.02)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


class Peer:
    """``python -m bench.peers KIND ...`` on a free loopback port."""

    def __init__(self, kind: str, *args: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._args = args
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Self:
        command = [sys.executable, "-m", "bench.peers", self.kind, "--port", str(self.port)]
        self._proc = subprocess.Popen([*command, *self._args], cwd=REPO, stdin=subprocess.DEVNULL)
        try:
            wait_http(self.url + "/healthz", timeout, self._proc)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# webdis (https://github.com/nicolasff/webdis, Debian's ``webdis`` package): a C HTTP front
# for Redis on libevent and hiredis, the peer that shows what a Redis read over HTTP costs
# without Python. ``GET /GET/<key>?type=<content type>`` answers the raw value (``.txt`` or
# no suffix would answer JSON). Here, not in bench/peers.py: the Python peers' processes
# import that module, and tests.servers would add to their RSS.


def webdis_config(
    redis_port: int, http_port: int, log_path: Path, threads: int = 1
) -> dict[str, object]:
    """webdis.json for a private webdis in front of the Redis on ``redis_port`` (database
    0), in the foreground, logging errors only (cachesvc logs no access lines either).
    One worker thread: like every server under test it is pinned to one CPU, where more
    threads would only take turns."""
    return {
        "redis_host": LOOPBACK,
        "redis_port": redis_port,
        "http_host": LOOPBACK,
        "http_port": http_port,
        "threads": threads,
        "database": 0,
        "daemonize": False,
        "verbosity": 0,
        "logfile": str(log_path),
    }


class Webdis(Server):
    """webdis on a free loopback port, started and cleaned up like tests/servers.py's."""

    name = "webdis"

    def __init__(self, redis_port: int, threads: int = 1) -> None:
        super().__init__()
        self.redis_port = redis_port
        self.threads = threads
        self.config_path = self.dir / "webdis.json"

    @staticmethod
    def available() -> str | None:
        return shutil.which("webdis")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        binary = self.available()
        if binary is None:
            raise ServerError("webdis not found: apt-get install webdis")
        # Written here, not in _prepare: a start retried on another port rewrites it.
        config = webdis_config(self.redis_port, self.port, self.log_path, self.threads)
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        return [binary, str(self.config_path)]

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/PING", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files (Agg), or None when matplotlib is not
    installed (the ``bench`` extra): the benchmarks then skip their plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for a CPU) of the threads of ``pid`` now
    alive (for cachesvc and the Python peers, the event loop's thread is all there is to
    it; webdis answers from worker threads). Waiting means something else held a CPU."""
    on_cpu = waiting = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                ran, waited, _ = stat.read().split()
            on_cpu += int(ran)
            waiting += int(waited)
    return on_cpu, waiting


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu_ticks(stat: str) -> int:
    """utime + stime + cutime + cstime of a /proc/<pid>/stat line, in clock ticks: the
    CPU time of all of the process's threads, live or gone, and of the children it has
    waited for."""
    # The command name is in parentheses and may itself hold spaces or ')'; fields 14-17
    # (utime, stime, cutime, cstime) are 11-14 after it, counting the state as 0.
    fields = stat.rpartition(")")[2].split()
    return sum(int(field) for field in fields[11:15])


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) used so far by ``pid`` and its descendants: threads,
    children alive and children exited and waited for. Its resolution is a clock tick
    (10 ms at the usual 100 Hz), so measure over seconds."""
    ticks = 0
    for process in (pid, *_descendants(pid)):
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{process}/stat") as stat,
        ):
            ticks += stat_cpu_ticks(stat.read())
    return ticks / CLOCK_TICKS


def load_average() -> float:
    with open("/proc/loadavg") as loadavg:
        return float(loadavg.read().split()[0])
