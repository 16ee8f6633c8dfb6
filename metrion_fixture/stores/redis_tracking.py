"""A Redis store's near cache, kept coherent by Redis's client tracking.

One connection per process speaks RESP3 and asks Redis to track, in broadcast
mode, every key under the prefixes this process reads (a namespace: everything up
to the first ``:``). From then on Redis pushes an ``invalidate`` message on that
connection for every write, delete, expiry or flush of such a key, whoever made it.
Before serving anything from memory, a read drains those messages (a non-blocking
poll of the socket, about a microsecond when there is nothing).

What that guarantees:
- writes and deletes made through this process are seen by its next read, always;
- a write by another process is seen as soon as Redis has delivered its message
  (the same moment it answers the writer, give or take the scheduling of two sockets);
- a value read while some key changed is not kept (every change bumps an epoch, and a
  read keeps its value only if the epoch did not move while it was in flight);
- if the tracking connection breaks, closes or stops answering a health check
  (sent every half second while reads go on, answered within three), everything kept is
  dropped and reads go to Redis (one GET each) until tracking is set up again;
- SWAPDB (and a database swapped in by any other means) changes no key, so Redis sends no
  invalidation for it: the health check reads a marker key naming the database (``_near:db``,
  a random id, created by the first process that looks); memory is served only while the last
  check that saw this process's marker was sent within ``DB_CONFIRMED_FOR`` (a second), and a
  check that sees another marker drops everything kept. A hit may be served from memory up to a
  second after a SWAPDB; a read while no check is that recent goes to Redis (its GET, and the
  check it sends, run as a miss would);
- setting tracking up (connect, HELLO 3, CLIENT TRACKING) happens on a thread of its own,
  at most once per ``RETRY_AFTER`` after a failure: an event loop never waits for it; the
  read that started it waits for it (blocking, or awaited), and if Redis took the connection
  but did not answer, fails with that timeout instead of paying a second one for the GET;
  meanwhile other reads are GETs;
- a prefix first read while tracking is up is asked for without waiting (CLIENT TRACKING sent,
  its reply read by a later read's poll): until then reads under it are GETs;
- a process that stops reading closes its tracking connection after a minute (that same thread
  watches), so Redis queues invalidations for an idle notebook kernel for a minute at most; the next read
  sets it up again.
A server or client that cannot track (Redis < 6, RESP2 only, CLIENT denied by ACL)
just means every read is a GET.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import select
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
import redis.connection

from metrion_fixture.stores.near import NearCache

PING_EVERY = 0.5  # seconds between health checks of the tracking connection while reads go on
# Memory is served only while a health check sent this recently found the database this process
# tracks (SWAPDB sends no invalidation): how long a hit may outlive a SWAPDB.
DB_CONFIRMED_FOR = 1.0
# The key naming the database: a random id, SET NX by the first process that looks. Under the
# reserved namespace prefix "_", so no cache entry or ledger record is ever stored there.
DB_MARKER_KEY = "_near:db"
# One round trip that creates the marker if it is missing and returns it (never nil: eviction
# cannot run between the two calls of one script).
_DB_MARKER_SCRIPT = "redis.call('set', KEYS[1], ARGV[1], 'NX') return redis.call('get', KEYS[1])"
PONG_WITHIN = 3.0  # a health check unanswered this long means the connection is presumed dead
RETRY_AFTER = 5.0  # after losing tracking, plain GETs for this long before setting it up again
# A process that stops reading (an idle notebook kernel) closes its tracking connection after
# this long: Redis would otherwise queue an invalidation for it on every write under the prefix.
IDLE_CLOSE = 60.0

_HANDLED = object()  # what the push handler returns, to tell pushes from replies
_DB_CHECK = object()  # the tag of a health check's reply in the queue of replies to read


def tracked_prefix(key: str) -> str | None:
    """The prefix under which ``key`` is tracked: up to and including its first ``:``.

    Two such prefixes never overlap (neither starts the other), which Redis requires of
    the prefixes of one connection.
    """
    head, colon, _ = key.partition(":")
    return head + colon if colon else None


class _Unsupported(Exception):
    """This client library cannot receive invalidation pushes."""


def _ignore(message: Any) -> object:
    return _HANDLED


_SERVE = object()  # what _ready says: memory may answer
_READ = object()  # tracking is up but the database is not confirmed lately: read Redis, remember


# Every near cache of the process, for fork(): a lock held by another thread at that moment
# would never be released in the child.
_instances: weakref.WeakSet[TrackedNearCache] = weakref.WeakSet()


class TrackedNearCache:
    def __init__(
        self,
        new_connection: Callable[[], redis.connection.AbstractConnection],
        values: NearCache | None = None,
    ) -> None:
        self._new_connection = new_connection
        self._values = values if values is not None else NearCache()
        self._lock = threading.Lock()
        self._conn: redis.connection.AbstractConnection | None = None
        # A poll object kept registered with the tracking socket: the readiness check on every
        # read, without the allocation and registration redis-py's can_read() makes each time.
        self._poller: Any = None
        self._buffered = False  # bytes may wait in the parser's buffer: drain whatever poll says
        self._prefixes: set[str] = set()  # tracked: Redis said OK
        self._requested: set[str] = set()  # CLIENT TRACKING sent, its reply not read yet
        # The replies still to read, in the order of the commands: a prefix's CLIENT TRACKING, or
        # _DB_CHECK for a health check; each with the time it was sent.
        self._awaiting: deque[tuple[object, float]] = deque()
        self._db_marker: bytes | None = None  # the database this process tracks (see DB_MARKER_KEY)
        self._confirmed_at = -math.inf  # when the last health check that found it was sent
        self._epoch = 0  # moves on every invalidation and every write made here
        self._pid = os.getpid()
        self._retry_at = 0.0
        self._setting_up: concurrent.futures.Future[None] | None = None
        self._generation = 0  # moves on close() and fork(): a set-up started before then installs nothing
        self._pinged_at = self._used_at = 0.0
        self._stop_watching = threading.Event()
        self.unsupported = False  # the server or the client library cannot track: never try again
        _instances.add(self)

    @property
    def tracking(self) -> bool:
        return self._conn is not None

    def lookup(self, key: str) -> tuple[bytes | None, int | None]:
        """``(value, None)`` when ``key`` is kept here; ``(None, ticket)`` when it should be read
        from Redis and handed to :meth:`remember` with that ticket; ``(None, None)`` when no
        near cache applies (read from Redis, nothing to remember).

        For a blocking caller: when this call starts setting tracking up, it waits for that, and
        raises its timeout if Redis took the connection but did not answer (a GET would time out too).
        """
        prefix = tracked_prefix(key)
        if prefix is None:
            return None, None
        with self._lock:  # begin(), without its cost on the hit path
            state = self._ready(prefix)
            if state is _SERVE:
                value = self._values.get(key, time.time())
                return (value, None) if value is not None else (None, self._epoch)
            if state is _READ:
                return None, self._epoch
            setting_up = self._set_up_later(prefix) if self._conn is None else None
        if setting_up is None:
            return None, None
        setting_up.result()
        value, ticket, _ = self.begin(key)
        return value, ticket

    def begin(self, key: str) -> tuple[bytes | None, int | None, concurrent.futures.Future[None] | None]:
        """:meth:`lookup` that never waits on Redis: for an event loop.

        The third item is not None when this call started setting tracking up, on a thread:
        wait for it (``await asyncio.wrap_future(...)``; it raises the timeout of a Redis that took
        the connection but did not answer) and call again, or go ahead with a plain GET.
        """
        prefix = tracked_prefix(key)
        if prefix is None:
            return None, None, None
        with self._lock:
            state = self._ready(prefix)
            if state is _SERVE:
                value = self._values.get(key, time.time())
                return (value, None, None) if value is not None else (None, self._epoch, None)
            if state is _READ:
                return None, self._epoch, None
            return None, None, self._set_up_later(prefix) if self._conn is None else None

    def ticket(self, key: str) -> int | None:
        """A ticket for reading keys under ``key``'s prefix from Redis into memory (:meth:`remember_many`),
        or None when no near cache applies now. Blocking: it may wait for tracking to be set up, as
        :meth:`lookup` does (and raises the same timeout)."""
        prefix = tracked_prefix(key)
        if prefix is None:
            return None
        with self._lock:
            if self._ready(prefix) is not None:
                return self._epoch
            asked = self._conn is not None
            setting_up = None if asked else self._set_up_later(prefix)
        if asked:
            # Tracking is up for other prefixes: this one was just asked for. Wait for Redis's answer
            # (one round trip) instead of warming nothing, without holding the lock every read takes
            # (an event loop's included): each look drains what arrived, without waiting.
            deadline = time.monotonic() + PONG_WITHIN
            while time.monotonic() < deadline:
                time.sleep(0.001)
                with self._lock:
                    if self._ready(prefix) is not None:
                        return self._epoch
                    if self._conn is None or prefix not in self._requested:
                        return None  # lost, or refused
            return None
        if setting_up is None:
            return None
        setting_up.result()
        with self._lock:
            return self._epoch if self._ready(prefix) is not None else None

    def remember_many(self, read: list[tuple[str, bytes | None, int]], ticket: int) -> int:
        """:meth:`remember` for ``(key, value, ttl_ms)`` triples read in one go after taking ``ticket``;
        keeps none if anything changed meanwhile. Returns how many were kept."""
        now, kept = time.time(), 0
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                return 0
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - a broken tracking connection only turns the near cache off
                self._lost()
                return 0
            if self._epoch != ticket:
                return 0
            for key, value, ttl_ms in read:
                if value is None or ttl_ms == -2 or ttl_ms == 0:
                    continue
                self._values.put(key, value, float("inf") if ttl_ms < 0 else now + ttl_ms / 1000)
                kept += 1
        return kept

    def remember(self, key: str, value: bytes | None, ttl_ms: int, ticket: int) -> None:
        """Keep ``value``, read from Redis with ``ttl_ms`` left (PTTL), unless anything changed meanwhile."""
        if value is None or ttl_ms == -2 or ttl_ms == 0:
            return
        with self._lock:
            if self._conn is None or self._pid != os.getpid():
                return
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - a broken tracking connection only turns the near cache off
                self._lost()
                return
            if self._epoch != ticket:
                return
            expires_at = float("inf") if ttl_ms < 0 else time.time() + ttl_ms / 1000
            self._values.put(key, value, expires_at)

    def forget(self, key: str | None = None) -> None:
        """A write or delete made through this process: ``key``, or everything (None)."""
        with self._lock:
            self._epoch += 1
            if key is None:
                self._values.clear()
            else:
                self._values.discard(key)

    def close(self) -> None:
        with self._lock:
            conn, self._conn, self._poller = self._conn, None, None
            self._generation += 1
            self._setting_up = None
            self._reset()
            if conn is not None and self._pid == os.getpid():
                conn.disconnect()

    # The set-up thread: connects, then watches the connection it made.

    def _set_up(self, prefix: str, done: concurrent.futures.Future[None], generation: int) -> None:
        conn: redis.connection.AbstractConnection | None = None
        accepted = False
        try:
            conn = self._new_connection()
            parser_has_pushes = hasattr(getattr(conn, "_parser", None), "set_invalidation_push_handler")
            if not parser_has_pushes or str(getattr(conn, "protocol", "2")) != "3":
                raise _Unsupported("this redis-py cannot receive RESP3 invalidation pushes")
            handshake = conn.redis_connect_func

            def accept(connection: Any) -> None:
                nonlocal accepted
                accepted = True
                if handshake is not None:
                    handshake(connection)  # type: ignore[call-arg]
                else:
                    connection.on_connect()

            conn.redis_connect_func = accept  # type: ignore[assignment]
            conn.connect()  # HELLO 3: a server without RESP3 answers with an error (ResponseError)
            # Nothing is kept until the connection is installed, so there is nothing to drop yet.
            conn._parser.set_invalidation_push_handler(_ignore)
            conn.send_command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", prefix)
            reply = conn.read_response()
            if reply not in (b"OK", "OK"):
                raise redis.ResponseError(f"CLIENT TRACKING answered {reply!r}")
            checked_at = time.monotonic()
            self._send_db_check(conn)
            marker = conn.read_response()
            if not isinstance(marker, (bytes, str)):
                raise redis.ResponseError(f"the database marker script answered {marker!r}")
        except Exception as error:  # noqa: BLE001 - any failure only leaves the near cache off for a while
            if conn is not None:
                try:
                    conn.disconnect()
                except Exception:  # noqa: BLE001, S110 - already broken
                    pass
            with self._lock:
                if self._setting_up is done:
                    self._setting_up = None
                if generation == self._generation:
                    # Refused by the server or the library: it will not change its mind.
                    self.unsupported = self.unsupported or isinstance(error, (redis.ResponseError, _Unsupported))
                    self._retry_at = time.monotonic() + RETRY_AFTER
            if accepted and isinstance(error, (redis.TimeoutError, TimeoutError)):
                # Redis took the connection and then did not answer: a GET would only time out too.
                # Anything else (a connection not taken in time, refused) says little about the
                # pooled connections a GET uses: the read goes on.
                done.set_exception(error)
            else:
                done.set_result(None)
            return
        with self._lock:
            if self._setting_up is done:
                self._setting_up = None
            current = generation == self._generation
            if current:
                # Pushes that came with the reply may sit in the parser's buffer: _buffered drains them.
                conn._parser.set_invalidation_push_handler(self._invalidated)
                sock = getattr(conn, "_sock", None)
                if hasattr(select, "poll") and sock is not None:
                    self._poller = select.poll()
                    self._poller.register(sock, select.POLLIN)
                self._conn, self._buffered = conn, True
                self._prefixes.add(prefix)
                self._db_marker = marker.encode() if isinstance(marker, str) else marker
                self._confirmed_at = checked_at
                self._pinged_at = self._used_at = time.monotonic()
                stop = self._stop_watching = threading.Event()
        if not current:  # closed (or forked) meanwhile
            conn.disconnect()
            done.set_result(None)
            return
        done.set_result(None)
        self._watch(conn, stop)

    def _watch(self, conn: redis.connection.AbstractConnection, stop: threading.Event) -> None:
        # Closes the tracking connection once reads have stopped.
        while not stop.wait(IDLE_CLOSE / 4):
            with self._lock:
                if self._conn is not conn:
                    return  # closed, lost or replaced meanwhile
                if time.monotonic() - self._used_at > IDLE_CLOSE:
                    self._conn, self._poller = None, None
                    self._reset()
                    try:
                        conn.disconnect()
                    except Exception:  # noqa: BLE001, S110 - closing is all that is left to do
                        pass
                    return

    # Everything below runs with the lock held.

    def _ready(self, prefix: str) -> object:
        """_SERVE (memory may answer), _READ (read Redis and remember) or None (no near cache now)."""
        if self._pid != os.getpid():
            # After fork(): the socket is the parent's; never read or close it here. Nor is there
            # a set-up thread any more.
            self._conn, self._poller, self._pid = None, None, os.getpid()
            self._setting_up = None
            self._generation += 1
            self._reset()
        if self._conn is None:
            return None
        try:
            if prefix not in self._prefixes and prefix not in self._requested:
                self._request(prefix)
            self._drain()
            self._check_health()
        except redis.ResponseError:
            self.unsupported = True  # refused by the server: it will not change its mind
            self._lost()
            return None
        except Exception:  # noqa: BLE001 - any failure here only turns the near cache off for a while
            self._lost()
            return None
        if prefix not in self._prefixes:
            return None
        return _SERVE if time.monotonic() - self._confirmed_at <= DB_CONFIRMED_FOR else _READ

    def _set_up_later(self, prefix: str) -> concurrent.futures.Future[None] | None:
        if self.unsupported or self._setting_up is not None or time.monotonic() < self._retry_at:
            return None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_running_or_notify_cancel()  # a waiter that gives up cannot cancel it for the others
        self._setting_up = done
        thread = threading.Thread(
            target=self._set_up, args=(prefix, done, self._generation), name="metrion-near-cache", daemon=True
        )
        thread.start()
        return done

    def _request(self, prefix: str) -> None:
        assert self._conn is not None
        self._conn.send_command("CLIENT", "TRACKING", "ON", "BCAST", "PREFIX", prefix)
        self._awaiting.append((prefix, time.monotonic()))
        self._requested.add(prefix)
        self._buffered = True  # in case the client library read anything while sending

    def _drain(self) -> None:
        conn = self._conn
        assert conn is not None
        # Only this class reads this connection, and its loop below leaves the parser's buffer
        # empty; a reply read elsewhere may leave pushes there: _buffered says so.
        if not self._buffered and self._poller is not None and not self._poller.poll(0):
            sock = getattr(conn, "_sock", None)
            if not (hasattr(sock, "pending") and sock.pending()):  # type: ignore[union-attr]  # TLS: decrypted bytes poll cannot see
                return  # nothing arrived (a closed or broken socket polls as ready)
        self._buffered = False
        while conn.can_read(timeout=0):
            reply = conn.read_response(push_request=True)
            if reply is _HANDLED or not isinstance(reply, (bytes, str)) or not self._awaiting:
                continue  # an invalidation, or a push that is not ours (our replies are never nil)
            tag, sent_at = self._awaiting.popleft()
            if tag is _DB_CHECK:
                self._db_checked(reply.encode() if isinstance(reply, str) else reply, sent_at)
            elif isinstance(tag, str):
                self._requested.discard(tag)
                if reply not in (b"OK", "OK"):
                    raise redis.ResponseError(f"CLIENT TRACKING answered {reply!r}")
                self._prefixes.add(tag)

    def _db_checked(self, marker: bytes, sent_at: float) -> None:
        if marker != self._db_marker:
            # Another database is in place (SWAPDB, or a flush removed the marker): nothing kept
            # belongs to it. Whatever is remembered from now on was read from the new one.
            self._epoch += 1
            self._values.clear()
            self._db_marker = marker
        self._confirmed_at = max(self._confirmed_at, sent_at)

    def _check_health(self) -> None:
        now = self._used_at = time.monotonic()
        if self._awaiting:
            if now - self._awaiting[0][1] > PONG_WITHIN:
                raise ConnectionError("the tracking connection did not answer in time")
        elif now - self._pinged_at > PING_EVERY:
            assert self._conn is not None
            self._send_db_check(self._conn)
            self._awaiting.append((_DB_CHECK, now))
            self._pinged_at = now
            self._buffered = True  # in case the client library read anything while sending

    @staticmethod
    def _send_db_check(conn: redis.connection.AbstractConnection) -> None:
        conn.send_command("EVAL", _DB_MARKER_SCRIPT, 1, DB_MARKER_KEY, uuid.uuid4().hex)

    def _invalidated(self, message: Any) -> object:
        # Called by the parser, inside _drain, so with the lock held.
        self._epoch += 1
        keys = message[1] if len(message) > 1 else None
        if keys is None:  # FLUSHDB / FLUSHALL
            self._values.clear()
        else:
            for key in keys:
                self._values.discard(key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key)
        return _HANDLED

    def _lost(self) -> None:
        conn, self._conn, self._poller = self._conn, None, None
        self._reset()
        self._retry_at = time.monotonic() + RETRY_AFTER
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:  # noqa: BLE001, S110 - already broken
                pass

    def _reset(self) -> None:
        self._stop_watching.set()
        self._prefixes.clear()
        self._requested.clear()
        self._awaiting.clear()
        self._values.clear()
        self._epoch += 1
        self._db_marker, self._confirmed_at = None, -math.inf


def _after_fork_in_child() -> None:
    for near in list(_instances):
        near._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
