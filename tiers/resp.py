"""The Redis tier's client for one server (``redis://``, ``rediss://``): Redis' protocol
(RESP2) on tiers/pipelined.py's connections, replies parsed by hiredis (the parser
redis-py itself uses).

Why not redis-py's asyncio client: a sidecar is called a few thousand times a second, where
coalescing has nothing to coalesce and every read is a batch of one. redis-py spends a
task-free but deep stack per command (connection pool checkout, a stream reader, its
retry wrapper); here a command is one ``hiredis.pack_command``, one ``transport.write`` and
one future completed in ``data_received``. Sentinel and Cluster URLs keep redis-py, which
follows failovers and slot maps (tiers/redis_clients.py).

One client per URL is shared in a loop (``for_server``): the Redis tier and the
write-behind journal on its database send a write's script call and append together, in
one request.

Options (``?name=value``): ``max_connections`` (the pool's bound, default 4: Redis runs one
command at a time, so more connections than a few only add sockets),
``socket_connect_timeout`` (seconds, default 1), ``client_name`` (CLIENT SETNAME), and for
``rediss://`` ``ssl_cert_reqs`` (``none``, ``optional`` or ``required``, the default),
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_check_hostname``. A call waits
as long as its caller lets it: the engine bounds every tier call with the tier's
``timeout``, and a call given up closes its connection.

Exceptions: tiers/pipelined.py's (``TierUnavailable``, ``TierTimeout``, ``BadReply``), and
``ReplyError`` (a ``TierError``) for an error reply (WRONGTYPE, NOSCRIPT, OOM, ...),
which leaves the connection as it is. A refused AUTH or SELECT is ``TierUnavailable``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import hiredis
from redis.asyncio.connection import parse_url

from tiers.base import TierError, TierUnavailable
from tiers.pipelined import Call, Client, Connection
from tiers.redis_clients import RedisTarget

__all__ = ["OPTIONS", "ReplyError", "RespClient", "check_cert_reqs"]

_T = TypeVar("_T")

OPTIONS = frozenset(
    {
        "db",  # as the URL's path gives it
        "max_connections",
        "socket_connect_timeout",
        "client_name",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
    }
)
_DEFAULT_POOL_SIZE = 4
_DEFAULT_CONNECT_TIMEOUT = 1.0
# The clients of ``for_server``, by URL.
_SHARED: dict[str, RespClient] = {}
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

Arg = bytes | str | int | float


class ReplyError(TierError):
    """Redis answered the command with an error; ``reply`` is its text (``NOSCRIPT ...``)."""

    def __init__(self, where: str, reply: str) -> None:
        super().__init__(f"{where}: {reply}")
        self.reply = reply


class _Command(Call[_T]):
    """A command: its reply, an error reply, or what ``convert`` makes of it."""

    __slots__ = ()

    def take(self, reply: Any) -> bool:
        """Give the call a reply; True once it has all it waits for."""
        if not self.done():  # not given up
            if isinstance(reply, hiredis.ReplyError):
                self.set_exception(self._error(reply))
            else:
                self.finish(reply)
        return True

    def _error(self, reply: hiredis.ReplyError) -> ReplyError:
        return ReplyError(self.connection.client.where if self.connection else "redis", str(reply))


class _Script(_Command[Any]):
    """EVALSHA of a script. A server that does not hold the script (restarted, or told
    SCRIPT FLUSH) answers NOSCRIPT: the call then goes once more as EVAL of the script
    itself, on the same connection, which loads it for the calls after; its caller sees
    only the script's reply (redis-py's Script does the same in two round trips)."""

    __slots__ = ("arguments", "script")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, script: bytes, sha: str, arguments: tuple[Arg, ...]
    ) -> None:
        super().__init__(loop, hiredis.pack_command(cast(Any, ("EVALSHA", sha, *arguments))))
        self.script: bytes | None = script
        self.arguments = arguments

    def take(self, reply: Any) -> bool:
        connection = self.connection
        if (
            self.script is not None
            and connection is not None
            and isinstance(reply, hiredis.ReplyError)
            and str(reply).startswith("NOSCRIPT")
            and not self.done()
        ):
            script, self.script = self.script, None  # once: EVAL does not answer NOSCRIPT
            self.request = hiredis.pack_command(cast(Any, ("EVAL", script, *self.arguments)))
            connection.send(self)  # behind what is written already: replies come in order
            return True  # this reply's place in the connection's queue is done with
        return super().take(reply)


class _Pipeline(_Command[list[Any]]):
    """Commands sent as one request: its result is their replies, an error reply as a
    ReplyError in its place."""

    __slots__ = ("commands", "replies")

    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes, commands: int) -> None:
        super().__init__(loop, request)
        self.commands = commands
        self.replies: list[Any] = []

    def restart(self) -> None:
        self.replies = []

    def take(self, reply: Any) -> bool:
        if isinstance(reply, hiredis.ReplyError):
            reply = self._error(reply)
        self.replies.append(reply)
        if len(self.replies) < self.commands:
            return False
        if not self.done():
            self.finish(self.replies)
        return True


class _RespConnection(Connection):
    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self._reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self.pending
        try:
            while (reply := reader.gets()) is not False:
                if cast(_Command[Any], pending[0]).take(reply):  # IndexError: a reply unasked
                    pending.popleft()
        except (hiredis.ProtocolError, IndexError) as exc:
            self.malformed(exc)
            return
        self.replied()


class RespClient:
    """The commands the Redis tier sends, named and answered as redis-py's are, each one
    returning its ``Call`` (a future)."""

    def __init__(self, where: str, address: tuple[str, int], options: dict[str, Any]) -> None:
        """``options``: redis-py's ``parse_url`` of the URL (``db``, ``username``,
        ``password`` and those of ``OPTIONS``)."""
        self._setup: list[tuple[str, ...]] = []
        self.shared_as: str | None = None  # the URL it is shared under (``for_server``)
        self.shares = 0
        if options.get("password") is not None:
            user = options.get("username")
            self._setup.append(
                ("AUTH", user, options["password"]) if user else ("AUTH", options["password"])
            )
        if options.get("db"):
            self._setup.append(("SELECT", str(int(options["db"]))))
        if options.get("client_name"):
            self._setup.append(("CLIENT", "SETNAME", options["client_name"]))
        self.pool = Client(
            where,
            address,
            int(options.get("max_connections", _DEFAULT_POOL_SIZE)),
            _RespConnection,
            connect_timeout=float(options.get("socket_connect_timeout", _DEFAULT_CONNECT_TIMEOUT)),
            ssl_context=_ssl_context(options) if "connection_class" in options else None,
            handshake=self._handshake if self._setup else None,
        )

    @classmethod
    def for_server(cls, target: RedisTarget, *, shared: bool = True) -> RespClient:
        """A client for the single server ``target`` names (a ``redis://`` or
        ``rediss://`` URL, parsed), its options and credentials included. Called in the
        loop that uses it.

        ``shared``: everyone in that loop asking for the same URL gets one client, so one
        pool of connections, and the calls of its users that go out together
        (``pipeline``, ``run_script``) go in one request: the Redis tier's write and the
        write-behind journal's append of the same write. Each ``aclose`` gives back one
        share; the last closes the connections."""
        host, port = target.nodes[0]
        if not shared:
            return cls(f"redis {host}:{port}", (host, port), dict(parse_url(target.url)))
        loop = asyncio.get_running_loop()
        client = _SHARED.get(target.url)
        if client is None or client.pool.bound_loop is not loop:  # (or one of a loop that ended)
            client = cls.for_server(target, shared=False)
            client.pool.bound_loop = loop
            client.shared_as = target.url
            _SHARED[target.url] = client
        client.shares += 1
        return client

    def command(self, *args: Arg, convert: Callable[[Any], _T] | None = None) -> Call[_T]:
        """Send ``args``; the call's result is ``convert(reply)`` (the reply without)."""
        pool = self.pool
        return pool.submit(_Command(pool.loop, hiredis.pack_command(cast(Any, args)), convert))

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> Call[list[Any]]:
        """``commands`` as one request, on one connection (so that a WAIT among them
        counts the writes before it): a call of their replies."""
        pool = self.pool
        request = b"".join(hiredis.pack_command(cast(Any, tuple(c))) for c in commands)
        return pool.submit_gathered(_Pipeline(pool.loop, request, len(commands)))

    def mget(self, keys: Sequence[str]) -> Call[list[bytes | None]]:
        return self.command("MGET", *keys)

    def run_script(self, script: bytes, sha: str, numkeys: int, *args: Arg) -> Call[Any]:
        """EVALSHA ``sha`` (the SHA-1 of ``script``), falling back to EVAL of ``script``
        where the server does not hold it: see ``_Script``."""
        pool = self.pool
        return pool.submit_gathered(_Script(pool.loop, script, sha, (numkeys, *args)))

    def eval(self, script: str | bytes, numkeys: int, *args: Arg) -> Call[Any]:
        return self.command("EVAL", script, numkeys, *args)

    def ping(self) -> Call[Any]:
        return self.command("PING")

    def hgetall(self, key: str) -> Call[dict[bytes, bytes]]:
        return self.command("HGETALL", key, convert=_pairs)

    async def aclose(self) -> None:
        """Close it, or give back one share of a shared one (``for_server``)."""
        if self.shared_as is not None:
            self.shares -= 1
            if self.shares > 0:
                return
            if _SHARED.get(self.shared_as) is self:
                del _SHARED[self.shared_as]
        self.pool.close()

    async def _handshake(self, conn: Connection) -> None:
        calls: list[_Command[Any]] = [
            _Command(self.pool.loop, hiredis.pack_command(cast(Any, args))) for args in self._setup
        ]
        for call in calls:
            call.tried = True  # never replayed on another connection
            conn.send(call)
        for call, args in zip(calls, self._setup, strict=True):
            try:
                await call
            except ReplyError as exc:
                raise TierUnavailable(f"{exc} (to {args[0]})") from exc


def _pairs(reply: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    context.check_hostname = bool(options.get("ssl_check_hostname", True))
    reqs = check_cert_reqs(str(options.get("ssl_cert_reqs", "required")))
    if reqs != ssl.CERT_REQUIRED:
        context.check_hostname = False
    context.verify_mode = reqs
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


def check_cert_reqs(value: str) -> ssl.VerifyMode:
    """The verification that ``ssl_cert_reqs=value`` asks for; ValueError if none."""
    reqs = _CERT_REQS.get(value.lower())
    if reqs is None:
        raise ValueError(
            f"option ssl_cert_reqs must be one of {', '.join(_CERT_REQS)} (got {value!r})"
        )
    return reqs
