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
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Self
from urllib.parse import urlsplit

import asyncpg
import redis

__all__ = [
    "MemcachedServer",
    "PostgresServer",
    "RedisClusterNode",
    "RedisClusterServers",
    "RedisSentinelServers",
    "RedisServer",
    "SentinelDataServer",
    "Server",
    "ServerError",
    "flush_memcached",
    "flush_redis",
    "free_port",
    "free_ports",
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


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago: picked while all are
    bound, so that servers started together never get the same one."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]


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


class Managed(abc.ABC):
    """A server, or servers that work together: ``start()`` on entering a ``with`` block,
    ``close()`` on leaving it, whatever happened."""

    @abc.abstractmethod
    def start(self) -> Self:
        """Start, and return once ready to serve."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop whatever the state, delete the files. Idempotent."""

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


_live: set[Server] = set()
_live_lock = threading.Lock()


class Server(Managed):
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

    def _prepare(self) -> None:
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

    def _release(self) -> None:
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

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} pid={self.pid}>"


def _require(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise ServerError(f"{binary} not found on PATH; install it or set {hint}")
    return path


class RedisServer(Server):
    """``persistent``: every write is in its append-only file before Redis answers
    (``appendfsync always``), as a write-behind journal needs; otherwise a restart comes
    back empty."""

    name = "redis"

    def __init__(self, port: int | None = None, persistent: bool = True) -> None:
        super().__init__(port)
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        return [
            _require("redis-server", "CACHESVC_TEST_REDIS_URL"),
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--save", "",
            *persistence,
            "--dir", str(self.dir),
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        try:
            return _roundtrip(self.port, b"PING\r\n", timeout=1).startswith(b"+PONG")
        except OSError:
            return False

    def info(self, section: str) -> dict[str, Any]:
        """``INFO <section>``, parsed."""
        with _node_client(self.port) as client:
            return dict(client.info(section))


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


# --- Redis Cluster and Redis Sentinel: sets of servers started and checked together ---------


def _wait_for(problem: Callable[[], str | None], within: float, what: str) -> None:
    """Poll ``problem`` (None = all is well) until it is None; ServerError after ``within`` s."""
    deadline = time.monotonic() + within
    while (found := problem()) is not None:
        if time.monotonic() > deadline:
            raise ServerError(f"{what}: not within {within} s: {found}")
        time.sleep(0.05)


def _node_client(port: int) -> redis.Redis:
    return redis.Redis(LOOPBACK, port, socket_timeout=2, socket_connect_timeout=2)


def _info_fields(text: bytes) -> dict[str, str]:
    """CLUSTER INFO's ``key:value`` lines as a dict."""
    fields = {}
    for line in text.decode().splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields[key] = value
    return fields


class RedisClusterNode(RedisServer):
    """One node of a ``RedisClusterServers``. Its nodes.conf lives in its directory and
    survives restarts, so a restarted node rejoins the cluster (as a replica, when a
    failover gave its slots to another node meanwhile)."""

    name = "redis-cluster-node"

    def __init__(self, node_timeout_ms: int, port: int, bus_port: int) -> None:
        super().__init__(port)
        self.node_timeout_ms = node_timeout_ms
        # The bus port defaults to port + 10000, which is out of range for many free ports.
        self.bus_port = bus_port

    def _command(self) -> list[str]:
        return [
            *super()._command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica may take over however long its link was down: after a test killed
            # and restarted nodes, the cluster must still fail over at the next kill.
            "--cluster-replica-validity-factor", "0",
            # A replica's first sync starts at once, not after the default 5 s wait for
            # more replicas to share one transfer.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip

    def send(self, *command: str | int) -> Any:
        """One command to this node, answered raw (bytes)."""
        with _node_client(self.port) as client:
            return client.execute_command(*command, NEVER_DECODE=True)

    @property
    def node_id(self) -> str:
        return str(self.send("CLUSTER", "MYID").decode())


class _ClusterNodeView(NamedTuple):
    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str  # "-" for a master
    link: str  # "connected" or "disconnected"
    slots: tuple[str, ...]  # "0-5460", "5461", or "[42->-<id>]" while migrating


def _cluster_nodes(node: RedisClusterNode) -> list[_ClusterNodeView]:
    views = []
    for line in node.send("CLUSTER", "NODES").decode().splitlines():
        fields = line.split()
        address = fields[1].split("@")[0]
        views.append(
            _ClusterNodeView(
                fields[0],
                int(address.rpartition(":")[2]),
                frozenset(fields[2].split(",")),
                fields[3],
                fields[7],
                tuple(fields[8:]),
            )
        )
    return views


class RedisClusterServers(Managed):
    """A Redis Cluster of three masters with one replica each, on free loopback ports::

        with RedisClusterServers() as cluster:   # start() on enter, close() on exit
            cluster.url                          # redis-cluster://127.0.0.1:p1,...
            node = cluster.master_of("key")      # the master serving the key's slot
            node.kill()                          # SIGKILL
            cluster.wait_serving()               # a replica took over its slots
            node.restart()                       # back, as a replica (its nodes.conf)
            cluster.reshard(100, node, other)    # move 100 slots (redis-cli --cluster)
            cluster.wait_healthy()               # every slot served, every master replicated
            cluster.restore()                    # restart what was killed, wait healthy

    ``node_timeout_ms`` is how long a master may be unreachable before its replica takes
    over: low, so a failover takes about two seconds, but far above the stalls a loaded
    machine causes, which would otherwise start failovers nobody asked for.
    """

    masters = 3
    start_timeout = 60.0

    def __init__(self, node_timeout_ms: int = 1000) -> None:
        ports = iter(free_ports(4 * self.masters))  # a client and a bus port per node
        self.nodes = [
            RedisClusterNode(node_timeout_ms, next(ports), next(ports))
            for _ in range(2 * self.masters)
        ]

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"{LOOPBACK}:{n.port}" for n in self.nodes)

    def start(self) -> Self:
        for node in self.nodes:
            node.start()
        addresses = [f"{LOOPBACK}:{node.port}" for node in self.nodes]
        self._redis_cli(
            "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"
        )  # fmt: skip
        self.wait_healthy(self.start_timeout)
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    # -- faults

    def master_of(self, key: str) -> RedisClusterNode:
        """The node that the cluster says serves ``key``'s slot now."""
        node = self._any_running()
        slot = int(node.send("CLUSTER", "KEYSLOT", key))
        for start, end, master, *_ in node.send("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return self._by_port(int(master[1]))
        raise ServerError(f"no node serves slot {slot}")

    def reshard(self, slots: int, source: RedisClusterNode, target: RedisClusterNode) -> None:
        """Move ``slots`` slots, keys included, from ``source`` to ``target`` (both masters),
        the way an operator does: ``redis-cli --cluster reshard``, which migrates key by key
        while the cluster serves (clients see ASK and MOVED redirects)."""
        self._redis_cli(
            "--cluster", "reshard", f"{LOOPBACK}:{source.port}",
            "--cluster-from", source.node_id,
            "--cluster-to", target.node_id,
            "--cluster-slots", str(slots),
            "--cluster-yes",
        )  # fmt: skip

    def restore(self, within: float = 30.0) -> None:
        """After a fault test: every node running again, the cluster healthy."""
        for node in self.nodes:
            if not node.running:
                node.restart()
        self.wait_healthy(within)

    # -- waiting for a state

    def wait_serving(self, within: float = 30.0) -> None:
        """Until every running node says the cluster is ok, all slots on running masters."""
        _wait_for(self._serving_problem, within, "cluster serving every slot")

    def wait_healthy(self, within: float = 30.0) -> None:
        """Until all six nodes run, agree on the slot map, and every master holding slots
        has a replica in sync (so that the next failover can happen)."""
        _wait_for(self._health_problem, within, "cluster healthy")

    def _serving_problem(self) -> str | None:
        running = [node for node in self.nodes if node.running]
        try:
            for node in running:
                info = _info_fields(node.send("CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                    return f"node {node.port}: {info}"
                for view in _cluster_nodes(node):
                    if (
                        view.slots
                        and "master" in view.flags
                        and not self._by_port(view.port).running
                    ):
                        return f"node {node.port} still gives slots to stopped {view.port}"
        except (redis.RedisError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _health_problem(self) -> str | None:
        if stopped := [node.port for node in self.nodes if not node.running]:
            return f"nodes {stopped} are not running"
        if problem := self._serving_problem():
            return problem
        try:
            maps = {node.port: self._slot_map(node) for node in self.nodes}
            if len(set(maps.values())) != 1:
                return f"nodes disagree on the slot map: {maps}"
            views = _cluster_nodes(self.nodes[0])
            if any("fail" in v.flags or "fail?" in v.flags for v in views):
                return f"nodes flagged failing: {views}"
            masters = {v.node_id for v in views if "master" in v.flags and v.slots}
            replicated = {v.master_id for v in views if "slave" in v.flags}
            if len(masters) != self.masters or not masters <= replicated:
                return f"not {self.masters} masters each with a replica: {views}"
            for view in views:
                if "slave" in view.flags:
                    replication = self._by_port(view.port).info("replication")
                    if replication.get("master_link_status") != "up":
                        return f"replica {view.port} not in sync: {replication}"
        except (redis.RedisError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _slot_map(self, node: RedisClusterNode) -> frozenset[tuple[int, int, int]]:
        return frozenset(
            (start, end, int(master[1])) for start, end, master, *_ in node.send("CLUSTER", "SLOTS")
        )

    # -- helpers

    def _by_port(self, port: int) -> RedisClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def _any_running(self) -> RedisClusterNode:
        for node in self.nodes:
            if node.running:
                return node
        raise ServerError("no cluster node is running")

    def _redis_cli(self, *args: str) -> None:
        result = subprocess.run(
            [_require("redis-cli", "CACHESVC_TEST_REDIS_CLUSTER_URL"), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            logs = "\n".join(f"--- {n.log_path}:\n{n._log_tail()}" for n in self.nodes)
            raise ServerError(
                f"redis-cli {' '.join(args)} failed:\n{result.stdout}{result.stderr}\n{logs}"
            )

    def __repr__(self) -> str:
        return f"<RedisClusterServers {self.url}>"


class SentinelDataServer(RedisServer):
    """A master or replica that Sentinels watch. It reads a config file, so that the
    ``CONFIG REWRITE`` Sentinel sends when it turns the server into a replica succeeds and
    a restart keeps the role it was given."""

    name = "redis-sentinel-data"

    def __init__(self, port: int, replica_of: int | None = None) -> None:
        super().__init__(port)
        self.config_path = self.dir / "redis.conf"
        self.config_path.write_text(
            "" if replica_of is None else f"replicaof {LOOPBACK} {replica_of}\n"
        )

    def _command(self) -> list[str]:
        binary, *options = super()._command()
        # A replica's first sync starts at once, not after the default 5 s wait for more
        # replicas to share one transfer.
        return [binary, str(self.config_path), *options, "--repl-diskless-sync-delay", "0"]

    def restart_as_replica_of(self, master: SentinelDataServer) -> None:
        """Start a killed old master as a replica of the new one, as an operator would
        (Sentinel would convert it too, but only after up to ~20 s)."""
        self.config_path.write_text(f"replicaof {LOOPBACK} {master.port}\n")
        self.restart()


class SentinelNode(RedisServer):
    """A Sentinel: a Redis server in Sentinel mode (it answers PING and INFO the same)."""

    name = "redis-sentinel"

    def __init__(
        self, port: int, service: str, master_port: int, down_after_ms: int, failover_ms: int
    ) -> None:
        super().__init__(port)
        self.config_path = self.dir / "sentinel.conf"
        # Sentinel rewrites this file as it learns the other Sentinels and the replicas.
        self.config_path.write_text(
            f"sentinel monitor {service} {LOOPBACK} {master_port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_ms}\n"
        )

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        binary, *options = super()._command()
        return [binary, str(self.config_path), "--sentinel", *options]


class RedisSentinelServers(Managed):
    """A master, one replica and three Sentinels (quorum 2), on free loopback ports::

        with RedisSentinelServers() as servers:  # start() on enter, close() on exit
            servers.url                  # redis-sentinel://127.0.0.1:s1,.../cachesvc/0
            old = servers.master()       # the server the Sentinels name
            servers.failover()           # SENTINEL FAILOVER; returns once all name the other
            old.kill(); servers.wait_master_is_not(old)   # a failover the Sentinels decide
            servers.restore()            # the old master a replica again, in sync
            servers.wait_healthy()       # one master named by all, its replica in sync

    ``down_after_ms``: how long the master may not answer before a failover starts. Low,
    so a test waits about two seconds, but well above the stalls a loaded machine causes,
    which would start failovers nobody asked for (and lose the writes not replicated yet).
    """

    service = "cachesvc"

    def __init__(self, down_after_ms: int = 1000, failover_ms: int = 2000) -> None:
        master, replica, *sentinels = free_ports(5)
        self.servers = [SentinelDataServer(master), SentinelDataServer(replica, master)]
        self.sentinels = [
            SentinelNode(port, self.service, master, down_after_ms, failover_ms)
            for port in sentinels
        ]

    @property
    def url(self) -> str:
        nodes = ",".join(f"{LOOPBACK}:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis-sentinel://{nodes}/{self.service}/0"

    def start(self) -> Self:
        for server in [*self.servers, *self.sentinels]:
            server.start()
        self.wait_healthy(30)
        return self

    def close(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.close()

    def master(self) -> SentinelDataServer:
        """The server the first Sentinel that answers names as master."""
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError, OSError):
                return self._named_by(sentinel)
        raise ServerError("no Sentinel answers")

    def failover(self, within: float = 30.0) -> SentinelDataServer:
        """``SENTINEL FAILOVER``: returns the new master once every Sentinel names it."""
        old = self.master()
        with _node_client(self.sentinels[0].port) as client:
            client.execute_command("SENTINEL", "FAILOVER", self.service)
        return self.wait_master_is_not(old, within)

    def wait_master_is_not(
        self, old: SentinelDataServer, within: float = 30.0
    ) -> SentinelDataServer:
        def problem() -> str | None:
            named = {self._named_by(s).port for s in self.sentinels if s.running}
            if named != {self.other(old).port}:
                return f"the Sentinels name {named}"
            return None

        _wait_for(problem, within, f"Sentinels naming a master other than {old.port}")
        return self.other(old)

    def restore(self, within: float = 30.0) -> None:
        """After a fault test: the old master back as a replica of the new one, in sync.

        A killed one is restarted as a replica; one that a ``SENTINEL FAILOVER`` left a
        master is made a replica now (Sentinel would do it too, ~10 s later), so the next
        failover finds a replica to promote.
        """
        _wait_for(self._agreement_problem, within, "Sentinels naming one master")
        master = self.master()
        replica = self.other(master)
        if not replica.running:
            replica.restart_as_replica_of(master)
        elif replica.info("replication")["role"] == "master":
            with _node_client(replica.port) as client:
                client.execute_command("REPLICAOF", LOOPBACK, master.port)
        self.wait_healthy(within)

    def _agreement_problem(self) -> str | None:
        try:
            named = {self._named_by(s).port for s in self.sentinels if s.running}
        except (redis.RedisError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if len(named) == 1 else f"the Sentinels name {named}"

    def other(self, server: SentinelDataServer) -> SentinelDataServer:
        return next(s for s in self.servers if s is not server)

    def wait_healthy(self, within: float = 30.0) -> None:
        """Until all Sentinels name one running master, see each other and its replica
        (so they can fail over), and the replica is in sync."""
        _wait_for(self._health_problem, within, "Sentinel set healthy")

    def _health_problem(self) -> str | None:
        if stopped := [s.port for s in [*self.servers, *self.sentinels] if not s.running]:
            return f"{stopped} not running"
        try:
            named = {self._named_by(sentinel) for sentinel in self.sentinels}
            if len(named) != 1:
                return f"the Sentinels name different masters: {named}"
            master = named.pop()
            for sentinel in self.sentinels:
                with _node_client(sentinel.port) as client:
                    state = client.sentinel_master(self.service)
                    replicas = client.sentinel_slaves(self.service)
                if state["is_sdown"] or state["is_odown"] or state["num-other-sentinels"] != 2:
                    return f"Sentinel {sentinel.port} sees {state}"
                # What Sentinel must know of a replica to promote it (sentinelSelectSlave):
                # it answers, and Sentinel has had an INFO from it lately.
                if not any(
                    r["port"] == self.other(master).port
                    and not r["is_sdown"]
                    and 0 < r["info-refresh"] < 20_000
                    for r in replicas
                ):
                    return f"Sentinel {sentinel.port} sees no replica to promote: {replicas}"
            replication = self.other(master).info("replication")
            if (
                replication.get("master_port") != master.port
                or replication.get("master_link_status") != "up"
            ):
                return f"replica {self.other(master).port}: {replication}"
        except (redis.RedisError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _named_by(self, sentinel: SentinelNode) -> SentinelDataServer:
        with _node_client(sentinel.port) as client:
            _, port = client.sentinel_get_master_addr_by_name(self.service)
        return next(s for s in self.servers if s.port == int(port))

    def __repr__(self) -> str:
        return f"<RedisSentinelServers {self.url}>"


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
