"""Pipelined request/reply connections to one server: the client of the memcached and the
Redis tiers.

Both servers execute a connection's requests one after the other and answer in order, so
requests are written as they come and each reply is matched to the oldest call still
waiting for one. A protocol (``Connection`` subclass) parses replies in ``data_received``
and completes each call from there: a call is a future (``Call``), with no task, stream
reader or timer of its own, so a caller may await it or chain callbacks on it.

The pool: at most ``pool_size`` connections; a call goes on an idle one, else a new one is
opened (up to the bound) while the call is pipelined on the least busy. Calls made while
no connection is open wait for the one being opened. Calls that belong together may be
gathered instead (``submit_gathered``): sent on the loop's next turn, in one write on one
connection, so that the server reads them at once and answers them in one reply.

Failures:

- a call cancelled before its reply came (its caller gave up: the engine's deadline)
  closes its connection at once. A server that does not answer one call would hold up
  every call pipelined behind it; those are tried again on a fresh connection;
- a reply that is not the protocol's fails the call it was for and closes the connection:
  it never serves a later call with the rest of an earlier reply;
- when the server closes a connection, every connection opened until then stops taking
  calls (a restarted server closed them all);
- a call whose connection closed before its reply came is tried once more: on a fresh
  connection when the server closed it, else on any. Replaying is harmless for what the
  tiers send (reads, versioned conditional writes, pings).

Exceptions::

    OSError from connecting (refused, unreachable)    -> TierUnavailable
    no connection within ``connect_timeout``          -> TierTimeout
    connection closed or reset mid-call (after one    -> ConnectionLost (TierUnavailable)
    retry)
    a reply that is not the protocol's                -> BadReply (TierError)
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from tiers.base import TierError, TierTimeout, TierUnavailable

__all__ = ["Address", "BadReply", "Call", "Client", "Connection", "ConnectionLost"]

_T = TypeVar("_T")

Address = tuple[str, int]


class ConnectionLost(TierUnavailable):
    """The connection closed before the call's reply came."""


class BadReply(TierError):
    """The server sent something its protocol does not allow there."""


class Call(asyncio.Future[_T]):
    """One request, and the future of its reply, completed by the connection's protocol.

    Cancelling it before the reply came (the caller gave up) closes the connection it is
    on: asyncio cancels the future a task awaits through this method, so no callback per
    call is needed to notice."""

    __slots__ = ("connection", "convert", "request", "tried")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: bytes,
        convert: Callable[[Any], _T] | None = None,
    ) -> None:
        super().__init__(loop=loop)
        self.request = request
        self.convert = convert  # what the result is made of the reply, in the read callback
        self.connection: Connection | None = None
        self.tried = False  # sent once already, on a connection that closed

    def restart(self) -> None:
        """Called as the call goes out: a call retried after a connection closed forgets
        what it had parsed of its reply there."""

    def finish(self, reply: Any) -> None:
        """Complete the call with ``convert(reply)``, or the reply itself without one."""
        if self.convert is None:
            self.set_result(reply)
            return
        try:
            self.set_result(self.convert(reply))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            self.set_exception(BadReply(f"unexpected reply {reply!r:.200}: {exc}"))

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.connection is not None:
            self.connection.abort(
                ConnectionLost(f"{self.connection.client.where}: a call on it was cancelled")
            )
        return True


class Connection(asyncio.Protocol):
    """One connection: requests written as they come, replies matched to them in order.
    Subclasses parse the replies (``data_received``) and complete ``pending[0]`` with each.

    Flow control is not needed: what is written is bounded by the calls in flight, each
    under its caller's deadline, and a call given up closes its connection.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pending: collections.deque[Call[Any]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._closing = False  # closed or being closed by this side
        self._retired = False  # takes no new call; closes once its replies are in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    @property
    def taking_calls(self) -> bool:
        return not (self._closing or self._retired)

    def send(self, call: Call[Any]) -> None:
        self.send_all([call])

    def send_all(self, calls: list[Call[Any]]) -> None:
        """``calls`` in one write (one system call, one read of the server's)."""
        assert self._transport is not None and not self._closing
        for call in calls:
            call.restart()
            call.connection = self
        self.pending.extend(calls)
        self._transport.writelines([call.request for call in calls])

    def replied(self) -> None:
        """Called by subclasses once no reply is pending: a retired connection closes."""
        if self._retired and not self.pending:
            self.close()

    def malformed(self, exc: Exception) -> None:
        """The data received is not the protocol's: the call it was for fails, the
        connection closes, and the calls pipelined behind are tried again."""
        if self.pending:
            call = self.pending.popleft()
            if not call.done():
                call.set_exception(BadReply(f"{self.client.where}: malformed reply: {exc}"))
        self.abort(ConnectionLost(f"{self.client.where}: closed after a malformed reply"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        by_server = not self._closing
        self._closing = True
        lost = ConnectionLost(
            f"{self.client.where}: connection lost ({exc or 'closed by the server'})"
        )
        lost.__cause__ = exc
        self.client.lost(self, by_server, self._take_pending(), lost)

    def retire(self) -> None:
        self._retired = True
        if not self.pending:
            self.close()

    def close(self) -> None:
        """Close once what was written is sent; calls still waiting are tried again."""
        self._end(ConnectionLost(f"{self.client.where}: connection closed"), at_once=False)

    def abort(self, error: TierError) -> None:
        """Drop the connection now; calls still waiting are tried again, or get ``error``."""
        self._end(error, at_once=True)

    def _end(self, error: TierError, *, at_once: bool) -> None:
        if self._closing:
            return
        self._closing = True
        if self._transport is not None:
            if at_once:
                self._transport.abort()
            else:
                self._transport.close()
        self.client.lost(self, False, self._take_pending(), error)

    def _take_pending(self) -> list[Call[Any]]:
        pending, self.pending = self.pending, collections.deque()
        return [call for call in pending if not call.done()]


class Client:
    """Up to ``pool_size`` connections to one server, calls pipelined on them.

    ``handshake`` runs on each new connection before it takes calls (Redis' AUTH and
    SELECT); it sends its calls with ``Connection.send``.
    """

    def __init__(
        self,
        where: str,
        address: Address,
        pool_size: int,
        protocol: Callable[[Client], Connection],
        *,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        handshake: Callable[[Connection], Awaitable[None]] | None = None,
    ) -> None:
        self.where = where
        self.address = address
        self.pool_size = pool_size
        self._protocol = protocol
        self._connect_timeout = connect_timeout
        self._ssl = ssl_context
        self._handshake = handshake
        self._open: list[Connection] = []  # connected and taking calls
        self._waiting: list[Call[Any]] = []  # for the connection being opened
        self._gathered: list[Call[Any]] | None = None  # this turn's (``submit_gathered``)
        self._opening: asyncio.Task[None] | None = None
        self._closed = False
        # The loop of its calls (``loop``); a client shared in one loop is bound at once.
        self.bound_loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, for making calls."""
        loop = self.bound_loop
        if loop is None:
            # Kept: asyncio.get_running_loop() costs a getpid() system call each time.
            loop = self.bound_loop = asyncio.get_running_loop()
        return loop

    def submit(self, call: Call[_T]) -> Call[_T]:
        """Send ``call`` on the best connection (or the one being opened); returns it."""
        self._send([call])
        return call

    def submit_gathered(self, call: Call[_T]) -> Call[_T]:
        """Send ``call`` on the loop's next turn, on one connection and in one write with
        every other call gathered in this turn; returns it.

        For calls that several callers make in the same turn and wait for together (a
        write-behind write's top-tier write and journal append): the server reads them
        at once and answers them in one reply, so they cost one send and one read instead
        of two each. A call alone pays one loop turn more than ``submit``."""
        gathered = self._gathered
        if gathered is None:
            gathered = self._gathered = []
            self.loop.call_soon(self._send_gathered)
        gathered.append(call)
        return call

    def _send_gathered(self) -> None:
        calls = [call for call in self._gathered or () if not call.done()]  # not given up
        self._gathered = None
        if calls:
            self._send(calls)

    def _send(self, calls: list[Call[Any]]) -> None:
        if self._closed:
            for call in calls:
                call.set_exception(TierError(f"{self.where}: closed"))
            return
        best = self._connection()
        if best is None:
            self._waiting += calls
        else:
            best.send_all(calls)

    def _connection(self) -> Connection | None:
        """The connection for the next call: an idle one, else the least busy while one
        more is opened (up to ``pool_size``); None while the first is being opened."""
        best: Connection | None = None
        for conn in self._open:
            if best is None or len(conn.pending) < len(best.pending):
                best = conn
                if not conn.pending:
                    break
        if (
            (best is None or best.pending)
            and self._opening is None
            and len(self._open) < self.pool_size
        ):
            # One more connection, while this call is pipelined on the least busy.
            self._opening = self.loop.create_task(self._connect())
        return best

    async def _connect(self) -> None:
        host, port = self.address
        conn: Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: self._protocol(self), host, port, ssl=self._ssl
                )
                if self._handshake is not None:
                    await self._handshake(conn)
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            self._fail_waiting(
                TierTimeout(f"{self.where}: no connection within {self._connect_timeout} s"), exc
            )
            if conn is not None:
                conn.abort(ConnectionLost(f"{self.where}: handshake timed out"))
            return
        except OSError as exc:
            self._fail_waiting(TierUnavailable(f"{self.where}: {exc}"), exc)
            return
        except TierError as exc:  # the handshake's calls failed (a wrong password, ...)
            self._fail_waiting(exc, exc.__cause__)
            if conn is not None:
                conn.close()
            return
        except asyncio.CancelledError:  # close()
            self._fail_waiting(TierError(f"{self.where}: closed"), None)
            if conn is not None:
                conn.close()
            raise
        finally:
            self._opening = None
        if self._closed or not conn.taking_calls:
            self._fail_waiting(ConnectionLost(f"{self.where}: connection closed"), None)
            conn.close()
            return
        self._open.append(conn)
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            if not call.done():  # not given up meanwhile
                self.submit(call)

    def _fail_waiting(self, error: TierError, cause: BaseException | None) -> None:
        error.__cause__ = cause
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            if not call.done():
                call.set_exception(error)

    def lost(
        self, conn: Connection, by_server: bool, unanswered: list[Call[Any]], error: TierError
    ) -> None:
        """``conn`` closed with ``unanswered`` calls still waiting for their replies. When
        the server closed it, no connection opened until now takes another call: they
        most likely died with it (a restart)."""
        if conn in self._open:
            self._open.remove(conn)
        if by_server:
            retired, self._open = self._open, []
            for other in retired:
                other.retire()
        for call in unanswered:
            call.connection = None
            if call.tried or self._closed:
                call.set_exception(error)
            else:
                call.tried = True
                self.submit(call)

    def close(self) -> None:
        self._closed = True
        if self._opening is not None:
            self._opening.cancel()
        conns, self._open = self._open, []
        for conn in conns:
            conn.close()
        self._fail_waiting(TierError(f"{self.where}: closed"), None)
