"""Running wrk (https://github.com/wg/wrk) and reading its report."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

KEYS_SCRIPT = Path(__file__).with_name("keys.lua")

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def available() -> str | None:
    return shutil.which("wrk")


@dataclass
class WrkResult:
    requests: int
    elapsed: float
    rps: float
    p50: float  # seconds
    p90: float
    p99: float
    errors: int  # non-2xx/3xx answers plus socket errors

    def summary(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rps": self.rps,
            "p50_ms": self.p50 * 1e3,
            "p90_ms": self.p90 * 1e3,
            "p99_ms": self.p99 * 1e3,
        }


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse(output: str) -> WrkResult:
    """The numbers of a ``wrk --latency`` report."""
    done = re.search(r"(\d+) requests in ([\d.]+\w+),", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if done is None or rate is None:
        raise ValueError(f"not a wrk report:\n{output}")
    latency = {
        int(p): _seconds(value) for p, value in re.findall(r"^\s+(\d+)%\s+(\S+)$", output, re.M)
    }
    errors = 0
    if non_2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        errors += int(non_2xx[1])
    if socket := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(n) for n in socket.groups())
    return WrkResult(
        requests=int(done[1]),
        elapsed=_seconds(done[2]),
        rps=float(rate[1]),
        p50=latency.get(50, math.nan),
        p90=latency.get(90, math.nan),
        p99=latency.get(99, math.nan),
        errors=errors,
    )


def run(
    url: str,
    path: str,
    keys: int,
    *,
    duration: float,
    connections: int,
    method: str = "GET",
    body_size: int = 0,
    query: str = "",
    offset: int = 0,
    header: str = "",
    threads: int = 1,
    script: Path = KEYS_SCRIPT,
) -> WrkResult:
    """One wrk run over ``keys`` keys (see keys.lua); ``duration`` rounds up to whole
    seconds, the only unit wrk takes."""
    binary = available()
    if binary is None:
        raise RuntimeError("wrk is not installed")
    command = [
        binary,
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{max(1, math.ceil(duration))}s",
        "--timeout", "5s",
        "--latency",
        "-s", str(script),
        url,
        "--", path, str(keys), method, str(body_size), query, str(offset), header,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return parse(done.stdout)
