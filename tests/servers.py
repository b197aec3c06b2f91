"""Private Redis, Memcached and Postgres servers for tests, on free loopback ports.

Each test server is a real process the tests own, so fault tests can kill, hang and restart
it without touching the machine's shared services::

    with RedisServer() as server:      # start() on enter, close() on exit
        server.hang()                  # SIGSTOP the whole process tree
        server.resume()                # SIGCONT
        server.kill()                  # SIGKILL, reaped before returning
        server.restart()               # same port (and same data dir for Postgres)

Everything is synchronous: call it from sync fixtures, or through ``asyncio.to_thread`` from
an async test that must keep its event loop running meanwhile.

Linux only: the process tree is read from /proc.
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

import asyncpg
import redis

__all__ = [
    "MemcachedServer",
    "PostgresServer",
    "RedisServer",
    "Server",
    "ServerError",
    "flush_memcached",
    "flush_redis",
    "free_port",
    "truncate_postgres",
]

LOOPBACK = "127.0.0.1"
_POLL_INTERVAL = 0.01
_LOG_TAIL_CHARS = 4000


class ServerError(RuntimeError):
    """A test server could not be started or stopped; the message includes its log."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the server binds it shortly after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _roundtrip(port: int, request: bytes, timeout: float, host: str = LOOPBACK) -> bytes:
    """Send one request line and return the first chunk of the answer."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        return sock.recv(4096)


# --- process tree helpers -------------------------------------------------------------------
# Postgres children call setsid() (InitPostmasterChild), so a process-group signal would reach
# only the postmaster. Walking /proc finds the backends, which must be stopped too for a hang
# to freeze already-open connections, and killed too so a restart is not refused with
# "pre-existing shared memory block is still in use".


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # the process exited while we were looking
            continue
        # The command name is in parentheses and may itself contain spaces or ')'.
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    # Orphans are reparented to PID 1, which may never reap them here: a zombie counts as gone
    # (it no longer holds sockets or shared memory).
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# --- the servers ----------------------------------------------------------------------------

_live: set[Server] = set()
_live_lock = threading.Lock()


class Server(abc.ABC):
    """One private server process: started on demand, always cleaned up."""

    name: ClassVar[str]
    start_timeout: ClassVar[float] = 10.0
    # SIGTERM is the graceful shutdown of Redis and Memcached; Postgres overrides it.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    # Whether close() shuts down gracefully or just kills (faster when nothing is left behind:
    # a SIGTERMed memcached takes about a second to exit).
    close_gracefully: ClassVar[bool] = False

    def __init__(self, port: int | None = None) -> None:
        self._pinned_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"cachesvc-{self.name}-"))
        self.log_path = self.dir / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # A forked child inherits this object; only the creating process may clean up.
        self._owner_pid = os.getpid()
        with _live_lock:
            _live.add(self)

    # -- what each server defines

    @property
    @abc.abstractmethod
    def url(self) -> str: ...

    @abc.abstractmethod
    def _command(self) -> list[str]: ...

    @abc.abstractmethod
    def _is_ready(self) -> bool:
        """True when the server answers a real request; must not raise on refusal."""

    def _prepare(self) -> None:  # noqa: B027 (optional hook)
        """Anything needed once before the first start (e.g. initdb)."""

    def _spawn_kwargs(self) -> dict[str, Any]:
        return {}

    # -- lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the server and return once it answers requests."""
        if self.running:
            raise ServerError(f"{self.name} is already running (pid {self.pid})")
        self._prepare()
        # Only a freshly picked port may be swapped: restart() promises the same port.
        attempts = 1 if self._pinned_port else 3
        for attempt in range(1, attempts + 1):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            if self._wait_ready():
                return self
            port_taken = "Address already in use" in self._read_log()[log_offset:]
            if not port_taken or attempt == attempts:
                break
            self.port = free_port()  # someone took it between free_port() and the bind
        raise ServerError(
            f"{self.name} on port {self.port} did not start; log {self.log_path}:\n"
            f"{self._log_tail()}"
        )

    def _spawn(self) -> None:
        # Append, so a restarted server's log keeps the history of the fault test.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                # Own session: a Ctrl-C meant for pytest must not shut the server down under
                # a test; teardown and the atexit hook stop it instead.
                start_new_session=True,
                **self._spawn_kwargs(),
            )

    def _wait_ready(self) -> bool:
        """Poll until ready (True), or until it exits or the deadline passes (False)."""
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while self._proc.poll() is None:
            if self._is_ready():
                return True
            if time.monotonic() > deadline:
                self.kill()
                return False
            time.sleep(_POLL_INTERVAL)
        self._proc.wait()
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown; falls back to kill() after ``timeout`` seconds."""
        if not self.running:
            self._reap()
            return
        assert self._proc is not None
        self.resume()  # a stopped process would never act on the shutdown signal
        self._proc.send_signal(self.stop_signal)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server and all its children; returns once they are gone."""
        if not self.running:
            self._reap()
            return
        assert self._proc is not None
        # Freeze the parent first so it cannot fork a child we would miss.
        _signal([self._proc.pid], signal.SIGSTOP)
        tree = [self._proc.pid, *_descendants(self._proc.pid)]
        _signal(tree, signal.SIGKILL)
        self._proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in tree[1:]):
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} children {tree[1:]} survived SIGKILL")
            time.sleep(_POLL_INTERVAL)

    def hang(self) -> None:
        """SIGSTOP the server and its children: connections are accepted by the kernel but
        nothing answers, like a wedged server."""
        if not self.running:
            raise ServerError(f"{self.name} is not running")
        assert self._proc is not None
        _signal([self._proc.pid], signal.SIGSTOP)  # first, so no new child escapes
        _signal(_descendants(self._proc.pid), signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT what hang() stopped; harmless on a running server."""
        if not self.running:
            return
        assert self._proc is not None
        _signal([*_descendants(self._proc.pid), self._proc.pid], signal.SIGCONT)

    def restart(self) -> Self:
        """Stop if running, then start again on the same port."""
        self.stop()
        self._pinned_port = True
        return self.start()

    def close(self) -> None:
        """Stop the server whatever its state and delete its files. Idempotent."""
        try:
            if self.close_gracefully:
                self.stop(timeout=5)
            self.kill()
            self._release()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            with _live_lock:
                _live.discard(self)

    def _release(self) -> None:  # noqa: B027 (optional hook)
        """Free what a dead server may have left outside its directory."""

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()

    def _read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        return self._read_log()[-_LOG_TAIL_CHARS:]

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} pid={self.pid}>"


def _require(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise ServerError(f"{binary} not found on PATH; install it or set {hint}")
    return path


class RedisServer(Server):
    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            _require("redis-server", "CACHESVC_TEST_REDIS_URL"),
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        try:
            return _roundtrip(self.port, b"PING\r\n", timeout=1).startswith(b"+PONG")
        except OSError:
            return False


class MemcachedServer(Server):
    name = "memcached"

    @property
    def url(self) -> str:
        return f"memcached://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        cmd = [
            _require("memcached", "CACHESVC_TEST_MEMCACHED_URL"),
            "-l", LOOPBACK,
            "-p", str(self.port),
            "-U", "0",  # no UDP listener
            "-m", "64",
        ]  # fmt: skip
        if os.geteuid() == 0:
            # memcached refuses to run as root unless told which user to become.
            cmd += ["-u", "nobody"]
        return cmd

    def _is_ready(self) -> bool:
        try:
            return _roundtrip(self.port, b"version\r\n", timeout=1).startswith(b"VERSION")
        except OSError:
            return False


def _pg_bindir() -> Path:
    """Where initdb and postgres live: pg_config, then Debian's layout, then PATH."""
    candidates: list[Path] = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, check=True, text=True
        ).stdout
        candidates.append(Path(out.strip()))
    # Debian's /usr/bin/pg_config may be the client-only one; the server lives here.
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise ServerError(
        "initdb/postgres not found; install PostgreSQL or set CACHESVC_TEST_POSTGRES_URL"
    )


class PostgresServer(Server):
    """A throwaway cluster: initdb on first start (~1 s), kept across restarts, fsync off."""

    name = "postgres"
    start_timeout = 30.0
    # SIGINT is Postgres' "fast" shutdown: disconnects clients and checkpoints. SIGTERM
    # ("smart") would wait for every client, e.g. a pool a test forgot to close, to leave.
    stop_signal = signal.SIGINT
    close_gracefully = True

    def __init__(self, port: int | None = None, *, logical_decoding: bool = False) -> None:
        super().__init__(port)
        # wal_level=logical, for tests that read changes from the write-ahead log.
        self.logical_decoding = logical_decoding
        self.bindir = _pg_bindir()
        self.data_dir = self.dir / "data"
        # Postgres refuses to run as root, so as root everything runs as the postgres user.
        self._as_user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._as_user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._as_user.pw_uid, self._as_user.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def _spawn_kwargs(self) -> dict[str, Any]:
        if self._as_user is None:
            return {}
        return {
            "user": self._as_user.pw_uid,
            "group": self._as_user.pw_gid,
            "extra_groups": [],  # drop root's supplementary groups too
        }

    def _run_tool(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.dir,
            **self._spawn_kwargs(),
        )
        if result.returncode != 0:
            raise ServerError(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}")

    def _prepare(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return  # restart: keep the cluster and its data
        self._run_tool(
            "initdb",
            "-D", str(self.data_dir),
            "-U", "postgres",
            "-A", "trust",
            "-E", "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip

    def _command(self) -> list[str]:
        logical = ["-c", "wal_level=logical"] if self.logical_decoding else []
        return [
            str(self.bindir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", f"listen_addresses={LOOPBACK}",
            # Private socket dir: the default one may not exist or may be the shared server's.
            "-c", f"unix_socket_directories={self.dir}",
            # Both only matter if the OS crashes: a killed server's writes are in the page cache.
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            # synchronous_commit stays on: off keeps acknowledged commits in shared memory
            # for up to 3 x wal_writer_delay, so kill() loses them (measured: a CREATE TABLE
            # lost 10 times out of 10), which would break the "acknowledged writes survive"
            # fault tests. With fsync off it costs nothing measurable (~75 us per commit).
            *logical,
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        # pg_isready says "no" while the server is starting up or recovering after a crash.
        result = subprocess.run(
            [
                str(self.bindir / "pg_isready"),
                "-q",
                "-h", LOOPBACK,
                "-p", str(self.port),
                "-U", "postgres",
                "-d", "postgres",
                "-t", "1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return result.returncode == 0

    def _release(self) -> None:
        # A killed postmaster leaves its small SysV interlock segment behind (a clean stop
        # removes it and postmaster.pid); enough killed test clusters would exhaust SHMMNI.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            shmid = lines[6].split()[1]  # line 7: "<shm key> <shm id>"
        except (OSError, IndexError):
            return
        subprocess.run(["ipcrm", "-m", shmid], capture_output=True)

    def stop_immediate(self) -> None:
        """``pg_ctl stop -m immediate``: no checkpoint, so the next start runs crash recovery."""
        if not self.running:
            self._reap()
            return
        assert self._proc is not None
        self.resume()
        self._run_tool("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w")
        self._proc.wait(timeout=10)


@atexit.register
def _close_all_servers() -> None:
    """A safety net for servers whose fixture never ran its teardown."""
    with _live_lock:
        servers = [s for s in _live if s._owner_pid == os.getpid()]
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()


# --- emptying shared session servers between tests ------------------------------------------


def flush_redis(url: str) -> None:
    """FLUSHDB the database named in ``url`` (only that one, never FLUSHALL)."""
    with redis.Redis.from_url(url, socket_timeout=5) as client:
        client.flushdb()


def flush_memcached(url: str) -> None:
    """``flush_all`` on every node of ``memcached://h1:p1,h2:p2``."""
    netloc = urlsplit(url).netloc
    for node in netloc.split(","):
        host, _, port = node.rpartition(":")
        answer = _roundtrip(int(port), b"flush_all\r\n", timeout=5, host=host.strip("[]"))
        if not answer.startswith(b"OK"):
            raise ServerError(f"flush_all on {node} answered {answer!r}")


def truncate_postgres(url: str, tables: tuple[str, ...] = ("cachesvc_entries",)) -> None:
    """TRUNCATE those of ``tables`` that exist (the service creates its schema lazily)."""

    async def truncate() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            for table in tables:
                # to_regclass gives NULL for a missing table, else a correctly quoted name.
                name = await conn.fetchval("SELECT to_regclass($1)::text", table)
                if name is not None:
                    await conn.execute(f"TRUNCATE {name}")
        finally:
            await conn.close()

    # A private thread, so this works from sync code and from inside a running event loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: asyncio.run(truncate())).result()
