"""A real ``cachesvc serve`` process for black-box tests (signals, crashes, restarts)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.servers import free_port


def tiers_config(*urls: str) -> str:
    """The ``[[tiers]]`` tables of a config file for ``urls``, in order."""
    return "".join(f'[[tiers]]\nurl = "{url}"\n' for url in urls)


class Sidecar:
    """``python -m cachesvc serve`` on a free loopback port, with its output in a file.

    Its directory (config and log) is deleted when the ``with`` block ends; the log stays
    readable in memory (``log``) for the assertions after it."""

    def __init__(
        self,
        config: str | None = None,
        env: dict[str, str] | None = None,
        *args: str,
        netns: str | None = None,
        address: str = "127.0.0.1",
        cwd: Path | None = None,
    ) -> None:
        """``netns``: run it in that network namespace (``ip netns exec``), listening on
        every address of it; ``address`` is where the tests reach it. ``cwd``: run the
        cachesvc of that checkout (``python -m`` imports from there first)."""
        self.args = args
        self.cwd = cwd
        self.netns = netns
        self.port = free_port()
        self.url = f"http://{address}:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="cachesvc-sidecar-"))
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.dir / "cachesvc.toml"
            self.config_path.write_text(config)
        # A clean environment: the developer's CACHESVC_* variables must not leak in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
        self.env.update(env or {})
        self.log_path = self.dir / "sidecar.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._final_log: str | None = None

    def start(self, timeout: float = 15.0) -> Self:
        command = [sys.executable, "-m", "cachesvc", "serve", "--port", str(self.port)]
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command, "--host", "0.0.0.0"]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        command += self.args
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self._proc.returncode}:\n{self.log}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"sidecar did not answer /healthz within {timeout} s:\n{self.log}")

    @property
    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit code (the process is killed if it outlives ``timeout``)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        """Kill the process and delete the directory, keeping the log's text. Idempotent."""
        self.kill()
        if self._final_log is None:
            self._final_log = self.log
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
