"""One multiplexed Redis connection per event loop, for the async hit path of ``RedisStore``.

redis-py's asyncio client costs a read more than the round trip itself: a pool lock and a health
check to take a connection, a task and a timer for each write and each read (``wait_for`` /
``async_timeout``), a ``StreamReader`` between the socket and the parser, and one connection per
concurrent task (64 tasks: 64 connections, each made while requests wait). Here the commands of
every task of a loop share one connection (an ``asyncio.Protocol``):

- commands issued while others are in flight are written together, once the tasks ready in this
  turn of the loop have run (one write per turn); a command on an idle connection is written at once;
- replies are parsed as they arrive (``hiredis.Reader`` when installed, else a small RESP2 parser
  for the replies of the commands sent here: ``+ - : $ *``) and handed out in order; a reply whose
  task was cancelled is read and dropped, so the next reply goes to the next command;
- one timer per connection: when the oldest command waiting has waited ``socket_timeout``, every
  waiting command fails with ``redis.TimeoutError`` and the connection closes; the next command
  connects again (within ``socket_connect_timeout``, then AUTH and SELECT as the URL says);
- errors are redis-py's: ``redis.ConnectionError``, ``redis.TimeoutError``, and an error reply as
  redis-py's parser maps it (``ResponseError``, ``AuthenticationError``, ...).

Only for URLs this fully understands (:func:`options_for`): ``redis://`` and ``unix://``, user
name and password, database, ``socket_timeout`` and ``socket_connect_timeout``. Anything else
(TLS, other options) keeps redis-py's client.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.exceptions
from redis._parsers.base import BaseParser

hiredis: Any
try:
    import hiredis
except ImportError:  # pragma: no cover - the tests run the Python reader by setting this to None
    hiredis = None

_UNDERSTOOD = {"host", "port", "path", "db", "username", "password", "socket_timeout", "socket_connect_timeout"}

# Moves in a forked child: a multiplexer made before the fork never touches its parent's socket.
_forks = 0


def _after_fork_in_child() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class Options:
    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    socket_timeout: float = 2.0
    socket_connect_timeout: float = 1.0

    @property
    def where(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


def options_for(url: str, defaults: dict[str, Any]) -> Options | None:
    """What a multiplexed connection needs of ``url`` (already checked by the store), or None when
    the URL asks for anything it does not do: TLS, an option other than the timeouts, a user name
    without a password."""
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "unix"):
        return None
    try:
        parsed = {**defaults, **redis.connection.parse_url(url)}
    except ValueError:
        return None
    parsed.pop("health_check_interval", None)  # a dead connection is noticed here without pings
    if scheme == "unix":
        if parsed.pop("connection_class", None) is not redis.connection.UnixDomainSocketConnection:
            return None
        if "path" not in parsed:
            return None
    if set(parsed) - _UNDERSTOOD:
        return None
    if parsed.get("username") and not parsed.get("password"):
        return None
    try:
        return Options(
            host=str(parsed.get("host", "localhost")),
            port=int(parsed.get("port", 6379)),
            path=parsed.get("path"),
            db=int(parsed.get("db", 0)),
            username=parsed.get("username"),
            password=parsed.get("password"),
            socket_timeout=float(parsed["socket_timeout"]),
            socket_connect_timeout=float(parsed["socket_connect_timeout"]),
        )
    except (KeyError, TypeError, ValueError):  # e.g. socket_timeout=None: redis-py's client handles it
        return None


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """The commands in RESP, encoded as redis-py encodes them (str as UTF-8, numbers as their repr)."""
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, bool) or not isinstance(arg, (bytes, int, float)):
                raise redis.DataError(f"Invalid input of type: {type(arg).__name__!r}")
            elif not isinstance(arg, bytes):
                arg = repr(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class _Incomplete(Exception):
    pass


class Resp2Reader:
    """The part of ``hiredis.Reader`` used here, in Python: ``feed(bytes)``, then ``gets()`` until
    it returns False (no whole reply yet). An error reply comes back as ``reply_error(message)``."""

    def __init__(self, reply_error: Any) -> None:
        self._buffer = bytearray()
        self._at = 0
        self._reply_error = reply_error

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def gets(self) -> Any:
        try:
            reply, at = self._parse(self._at)
        except _Incomplete:
            if self._at:
                del self._buffer[: self._at]
                self._at = 0
            return False
        if at == len(self._buffer):
            self._buffer.clear()
            self._at = 0
        else:
            self._at = at
        return reply

    def _parse(self, at: int) -> tuple[Any, int]:
        buffer = self._buffer
        end = buffer.find(b"\r\n", at)
        if end < 0:
            raise _Incomplete
        kind, line, at = buffer[at], bytes(buffer[at + 1 : end]), end + 2
        if kind == 0x24:  # $ bulk string
            size = int(line)
            if size < 0:
                return None, at
            if len(buffer) < at + size + 2:
                raise _Incomplete
            return bytes(buffer[at : at + size]), at + size + 2
        if kind == 0x2B:  # + simple string
            return line, at
        if kind == 0x3A:  # : integer
            return int(line), at
        if kind == 0x2D:  # - error
            return self._reply_error(line.decode("utf-8", "replace")), at
        if kind == 0x2A:  # * array
            count = int(line)
            if count < 0:
                return None, at
            items = []
            for _ in range(count):
                item, at = self._parse(at)
                items.append(item)
            return items, at
        raise redis.exceptions.InvalidResponse(f"Protocol Error: {bytes([kind])!r}, {line!r}")


def _reader() -> Any:
    if hiredis is not None:
        return hiredis.Reader(protocolError=redis.exceptions.InvalidResponse, replyError=BaseParser.parse_error)
    return Resp2Reader(BaseParser.parse_error)


class _Waiting:
    __slots__ = ("future", "expected", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[list[Any]], expected: int, sent_at: float) -> None:
        self.future, self.expected, self.sent_at = future, expected, sent_at
        self.replies: list[Any] = []


class _Connection(asyncio.Protocol):
    """One socket to Redis: commands written in order, replies handed out in the same order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, options: Options) -> None:
        self.loop, self.options = loop, options
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.lost: asyncio.Future[None] = loop.create_future()
        self._reader = _reader()
        self._waiting: deque[_Waiting] = deque()
        self._unsent: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, packed: bytes, expected: int) -> asyncio.Future[list[Any]]:
        """Write ``packed`` (``expected`` commands); the future gets their replies."""
        loop = self.loop
        future: asyncio.Future[list[Any]] = loop.create_future()
        if self.closed:  # lost, failed or closed while the caller waited for it: nothing would ever answer
            future.set_exception(redis.ConnectionError(f"Connection to {self.options.where} closed."))
            return future
        now = loop.time()
        waiting = self._waiting
        waiting.append(_Waiting(future, expected, now))
        if len(waiting) == 1:  # nothing else in flight: no one to wait for
            self.transport.write(packed)  # type: ignore[union-attr]
        else:
            if not self._unsent:
                loop.call_soon(self._flush)
            self._unsent.append(packed)
        if self._timer is None:
            self._timer = loop.call_at(now + self.options.socket_timeout, self._check_timeout)
        return future

    def _flush(self) -> None:
        unsent = self._unsent
        if not unsent:
            return
        data = b"".join(unsent) if len(unsent) > 1 else unsent[0]
        unsent.clear()
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        reader, waiting = self._reader, self._waiting
        try:
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                if not waiting:  # e.g. "max number of clients reached", sent before closing a new connection
                    said = f": {reply}" if isinstance(reply, Exception) else ""
                    raise redis.exceptions.InvalidResponse(f"Redis sent a reply no command asked for{said}")
                first = waiting[0]
                replies = first.replies
                replies.append(reply)
                if len(replies) < first.expected:
                    continue
                waiting.popleft()
                future = first.future
                if future.done():  # its task was cancelled: the reply is dropped
                    continue
                for each in replies:
                    if isinstance(each, Exception):
                        future.set_exception(each)
                        break
                else:
                    future.set_result(replies)
        except Exception as error:  # noqa: BLE001 - a reply we cannot read leaves the stream out of step
            self.fail(redis.ConnectionError(f"Error reading a reply from {self.options.where}: {error}"))

    def _check_timeout(self) -> None:
        self._timer = None
        if self.closed or not self._waiting:
            return
        oldest = self._waiting[0].sent_at
        if self.loop.time() - oldest >= self.options.socket_timeout:
            self.fail(redis.TimeoutError(f"Timeout reading from {self.options.where}"))
        else:
            self._timer = self.loop.call_at(oldest + self.options.socket_timeout, self._check_timeout)

    def fail(self, error: redis.RedisError) -> None:
        """Every command waiting fails with ``error`` (a copy each), and the connection closes."""
        self.closed = True
        waiting, self._waiting = self._waiting, deque()
        self._unsent.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for each in waiting:
            if not each.future.done():
                each.future.set_exception(type(error)(*error.args))
        if self.transport is not None:
            self.transport.abort()  # nothing half-written or half-read is worth waiting for

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed or self._waiting:
            reason = f"Error {exc} while reading from {self.options.where}" if exc else "Connection closed by server."
            self.fail(redis.ConnectionError(reason))
        self.closed = True
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        """Closes at once; commands still waiting fail with ConnectionError.

        An abort, not a close: close() waits for the write buffer to drain, which a frozen or
        partitioned Redis never lets happen (and the timer ignores a closed connection), so a loop's
        shutdown would wait for it.
        """
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Multiplexer:
    """The shared connection of one event loop, (re)connected on demand."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._forks = _forks
        self._closed = False

    def execute(self, commands: Sequence[Sequence[Any]]) -> Awaitable[list[Any]]:
        """The replies of ``commands``, sent together: awaitable in the loop this multiplexer belongs to."""
        connection = self._connection
        if connection is not None and not connection.closed and self._forks == _forks:
            return connection.send(pack(commands), len(commands))
        return self._execute_connecting(pack(commands), len(commands))

    async def _execute_connecting(self, packed: bytes, expected: int) -> list[Any]:
        connection = await self._connect()
        return await connection.send(packed, expected)

    async def _connect(self) -> _Connection:
        if self._forks != _forks:  # in a forked child: the socket is the parent's; leave it to the parent
            self._forks, self._connection, self._connecting = _forks, None, None
        if self._closed:
            raise redis.ConnectionError("the store was closed")
        connection = self._connection
        if connection is not None and not connection.closed:
            return connection
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(self._opened)
        # Every waiter gets the same connection or the same failure; one that is cancelled cancels only itself.
        return await asyncio.shield(task)

    def _opened(self, task: asyncio.Task[_Connection]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled() and task.exception() is None:
            connection = task.result()
            if self._closed:
                connection.close()
            else:
                self._connection = connection

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        options = self.options
        try:
            if options.path is not None:
                made = loop.create_unix_connection(lambda: _Connection(loop, options), options.path)
            else:
                made = loop.create_connection(lambda: _Connection(loop, options), options.host, options.port)
            _, connection = await asyncio.wait_for(made, options.socket_connect_timeout)
        except asyncio.TimeoutError:
            raise redis.TimeoutError("Timeout connecting to server") from None
        except OSError as error:
            if error.errno is None:
                message = f"Error connecting to {options.where}. {error}."
            else:
                message = f"Error {error.errno} connecting to {options.where}. {error.strerror}."
            raise redis.ConnectionError(message) from error
        handshake: list[tuple[Any, ...]] = []
        if options.password:
            handshake.append(
                ("AUTH", options.username, options.password) if options.username else ("AUTH", options.password)
            )
        if options.db:
            handshake.append(("SELECT", options.db))
        if handshake:
            try:
                await connection.send(pack(handshake), len(handshake))
            except BaseException:
                connection.close()
                raise
        return connection

    async def aclose(self) -> None:
        """Closes the connection, in its loop; a command after this fails with ConnectionError."""
        self._closed = True
        connection = self._connection
        if connection is not None and self._forks == _forks:
            connection.close()
            await connection.lost
