"""A store on a Redis server, shared by every process that can reach it."""

from __future__ import annotations

import asyncio
import math
import os
import re
import select
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.backoff
import redis.cluster
import redis.connection
import redis.retry

from metrion_fixture.core.options import has_unencoded_userinfo
from metrion_fixture.core.options import mask_password as mask_url
from metrion_fixture.errors import MetrionCacheError
from metrion_fixture.stores.base import Store
from metrion_fixture.stores.redis_multiplex import Multiplexer, options_for
from metrion_fixture.stores.redis_tracking import TrackedNearCache, tracked_prefix

# A cache that is down must cost a request a second, not minutes: short timeouts
# and no retries (redis-py retries 3 times with backoff by default). A failed call
# is just a miss; the pool drops the broken connection and the next call reconnects.
# Query parameters in the URL (e.g. ?socket_timeout=5) override these.
_DEFAULTS: dict[str, Any] = {
    "socket_connect_timeout": 1.0,
    "socket_timeout": 2.0,
    "health_check_interval": 30,
}
_BATCH = 500
_IDLE_MAX = 64  # idle connections get() keeps; more concurrent threads open and close their own
# Delete a lock only if it still holds our token: an expired lock re-taken by another caller stays.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")

# A blocking read puts the thread to sleep until the reply arrives, and waking it costs about as much
# again as a loopback round trip (measured here: a GET 58 us blocking, 23-40 us when the socket is
# polled instead). So a hit-path read first polls its socket for up to _POLL_FOR, then blocks as
# before. Replies that rarely come that soon (a Redis on another host, a busy machine) turn the
# polling off: each miss of the window costs _MISS_COST points, each reply within it earns one
# (up to _SCORE_MAX), and at zero or below a thread blocks at once, trying the window again every
# _RETRY_EVERY reads.
_POLL_FOR = 0.0001
_CAN_POLL = hasattr(select, "poll")  # not on Windows: reads block at once there
_SCORE_MAX = 16
_MISS_COST = 4
_RETRY_EVERY = 64


_TIMEOUTS = ("socket_timeout", "socket_connect_timeout")
_SWITCH = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}


def near_cache_option(url: str) -> tuple[str, bool | None]:
    """``url`` without our own ``near_cache=on|off`` query option (redis-py would refuse it), and its value.

    None when the option is absent, or when its value is not one we know (reported by ``url_problem``).
    """
    parts = urlsplit(url)
    ours = [value for name, value in parse_qsl(parts.query, keep_blank_values=True) if name == "near_cache"]
    if not ours:
        return url, None
    # The other options are kept exactly as written (re-encoding could change a password).
    rest = "&".join(item for item in parts.query.split("&") if item.partition("=")[0] != "near_cache")
    return urlunsplit(parts._replace(query=rest)), _SWITCH.get(ours[-1].lower())


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a Redis URL, or None; parses only, never connects.

    Never quotes a part of the URL's password: a URL parser cuts an unencoded ``/``, ``?`` or ``#``
    in it (and would connect elsewhere, with a part of it), so such a URL is refused first.
    """
    if has_unencoded_userinfo(url):
        return (
            "its user name or password holds a '/', '?' or '#', which a URL must percent-encode "
            "(write it as urllib.parse.quote(password, safe=''))"
        )
    try:
        ours = [value for name, value in parse_qsl(urlsplit(url).query) if name == "near_cache"]
        if ours and ours[-1].lower() not in _SWITCH:
            return f"near_cache must be on or off, not {ours[-1]!r}"
        for name, value in parse_qsl(urlsplit(url).query):
            if name in _TIMEOUTS:
                seconds = float(value)  # not a number: a ValueError, reported as the others
                if not 0 < seconds < math.inf:
                    # 0 or less would fail every read at once: the cache silently off.
                    return f"{name} must be a positive number of seconds, not {value!r}"
        url = near_cache_option(url)[0]
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a non-numeric port
        redis.connection.parse_url(url)
    except ValueError as exc:
        return str(exc).rstrip(".")
    if parts.scheme == "unix" and not parts.path:
        return "a unix:// URL needs the socket path, e.g. unix:///run/redis.sock"
    if parts.scheme != "unix" and not re.fullmatch(r"/?(\d+)?", parts.path):
        return f"the database must be a number, as in redis://localhost:6379/0, not {parts.path!r}"
    return None


async def _close_at_loop_shutdown(
    client: redis.asyncio.Redis, multiplexer: Multiplexer | None
) -> AsyncGenerator[None, None]:
    """Closes ``client`` (and ``multiplexer``) while its loop still runs, when the loop shuts down async generators.

    asyncio.run() and asyncio.Runner do that just before closing the loop; without
    it the client's sockets would outlive their loop and could never close cleanly.
    """
    try:
        yield
    finally:
        try:
            await client.aclose()
        finally:
            if multiplexer is not None:
                await multiplexer.aclose()


# Per event loop: redis-py's asyncio client, the multiplexed connection of the hit path (None when the
# URL needs redis-py's), and the async generator that closes both at the loop's shutdown.
_LoopClients = tuple[redis.asyncio.Redis, "Multiplexer | None", AsyncGenerator[None, None]]


def _readable(conn: redis.connection.AbstractConnection) -> bool:
    """Whether an idle connection has anything to read: only an end of file, or an error, can be there.

    redis-py's pool makes the same check on each checkout; the hit path's own stack makes it too.
    """
    sock = getattr(conn, "_sock", None)
    if sock is None or not _CAN_POLL:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0)) or bool(hasattr(sock, "pending") and sock.pending())


class RedisStore(Store):
    def __init__(self, url: str) -> None:
        problem = url_problem(url)
        if problem:
            raise MetrionCacheError(
                f"Bad Redis URL {mask_url(url)!r}: {problem}; "
                "expected e.g. redis://localhost:6379/0, rediss://HOST or unix:///run/redis.sock"
            )
        self.url = mask_url(url)
        self._raw_url, near_cache = near_cache_option(url)
        self._lock = threading.Lock()
        # Hits read again in this process are answered from memory, kept coherent by Redis (see
        # redis_tracking); ?near_cache=off makes every read a GET.
        self._near: TrackedNearCache | None = None
        if near_cache is not False:
            self._near = TrackedNearCache(self._new_tracking_connection)
        # Tracking is set up only once Redis has answered a read: a store that is down is not
        # connected to twice for nothing.
        self._answered = False
        self._client: redis.Redis | None = None
        self._idle: list[redis.connection.AbstractConnection] = []  # for get(): see there
        self._idle_pid = os.getpid()
        self._poll_score, self._poll_skipped = 1, 0  # see _POLL_FOR
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClients] = weakref.WeakKeyDictionary()
        self._closing: set[asyncio.Future[Any]] = set()
        # The async hit path's commands (GET, GET + PTTL, SET NX PX) share one connection per loop
        # (stores/redis_multiplex.py) when the URL is one it fully supports; else redis-py's client.
        self._multiplex = options_for(self._raw_url, _DEFAULTS)
        # The last loop's multiplexer, found without a lock or a weak dictionary: (weak ref to the loop, it).
        self._last_multiplexer: tuple[weakref.ref[asyncio.AbstractEventLoop], Multiplexer] | None = None

    def _new_client(self) -> Any:
        return redis.Redis.from_url(self._raw_url, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **_DEFAULTS)

    def _new_async_client(self) -> Any:
        return redis.asyncio.Redis.from_url(
            self._raw_url, retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0), **_DEFAULTS
        )

    def _new_tracking_connection(self) -> redis.connection.AbstractConnection:
        pool = self._sync().connection_pool
        # No health check of redis-py's own: it would read replies (and pushes) behind the near
        # cache's back; the near cache checks this connection itself.
        connection: redis.connection.AbstractConnection = pool.connection_class(
            **{**pool.connection_kwargs, "protocol": 3, "health_check_interval": 0}
        )
        return connection

    def _sync(self) -> redis.Redis:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._new_client()
        return self._client

    async def _async(self) -> redis.asyncio.Redis:
        return (await self._loop_clients())[0]

    async def _loop_clients(self) -> _LoopClients:
        # An asyncio client is bound to the loop it first ran on, and notebooks and
        # test suites run many loops (one per asyncio.run), so keep one per loop.
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._aclients.get(loop)
            if entry is not None:
                return entry
            # A client's connections reference its loop, so an entry would keep a
            # finished loop alive forever: drop clients of closed loops.
            for old in [old for old in self._aclients if old.is_closed()]:
                del self._aclients[old]
            client = self._new_async_client()
            multiplexer = Multiplexer(self._multiplex) if self._multiplex is not None else None
            closer = _close_at_loop_shutdown(client, multiplexer)
            entry = self._aclients[loop] = (client, multiplexer, closer)
        await closer.__anext__()  # the first step registers it with the loop's asyncgen hooks
        return entry

    async def _multiplexer(self) -> Multiplexer:
        """This loop's multiplexed connection (only when ``self._multiplex``)."""
        loop = asyncio.get_running_loop()
        multiplexer = (await self._loop_clients())[1]
        assert multiplexer is not None
        self._last_multiplexer = (weakref.ref(loop), multiplexer)
        return multiplexer

    def get(self, key: str) -> bytes | None:
        near = self._near if self._answered else None
        if near is not None:
            try:
                value, ticket = near.lookup(key)  # may wait for tracking to be set up (see there)
            except BaseException:
                self._answered = False
                raise
            if value is not None:
                return value
            if ticket is not None:
                value, ttl_ms = self._pipelined(("GET", key), ("PTTL", key))
                near.remember(key, value, ttl_ms, ticket)
                return value
        return self._pipelined(("GET", key))[0]

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The values of ``keys`` in one round trip, read past the near cache (nothing is kept)."""
        return self._pipelined(*(("GET", key) for key in keys), poll=False) if keys else []

    def warm(self, keys: list[str]) -> int:
        """Read ``keys`` into the near cache ahead of their first read, one round trip per namespace
        (GET + PTTL each); returns how many were kept (absent ones are not). Under the same rules as a
        read that misses the near cache: the namespace tracked first, a ticket taken before the read,
        nothing kept if anything changed while it was in flight."""
        near = self._near
        if near is None or not keys:
            return 0
        by_prefix: dict[str, list[str]] = {}
        for key in keys:
            prefix = tracked_prefix(key)
            if prefix is not None:
                by_prefix.setdefault(prefix, []).append(key)
        kept = 0
        for group in by_prefix.values():
            if not self._answered:
                self._pipelined(("PING",), poll=False)  # tracking is set up only once Redis has answered
            ticket = near.ticket(group[0])  # this prefix tracked, or None
            if ticket is None:
                continue
            # No polling: a pipeline this long is not answered within the moment a hit polls for.
            commands = [command for key in group for command in (("GET", key), ("PTTL", key))]
            replies = self._pipelined(*commands, poll=False)
            kept += near.remember_many(list(zip(group, replies[::2], replies[1::2], strict=True)), ticket)
        return kept

    def _pipelined(self, *commands: tuple[Any, ...], poll: bool = True) -> list[Any]:
        # The hit path: commands pipelined on a connection of our own idle stack, skipping the
        # client's per-command machinery (pool lock and socket poll, retry and metrics wrappers),
        # which costs about as much as the round trip itself. Same connections, options and errors.
        client = self._sync()
        if type(client) is not redis.Redis:  # a cluster client routes each key itself
            return [client.execute_command(*each) for each in commands]
        pool = client.connection_pool
        idle = self._idle
        if self._idle_pid != os.getpid():  # after fork(): never touch the parent's sockets
            idle = self._idle = []
            self._idle_pid = os.getpid()
        try:
            conn = idle.pop()
        except IndexError:
            conn = pool.make_connection()  # type: ignore[assignment]
        else:
            if _readable(conn):  # closed by the server while idle (CLIENT KILL, timeout, restart): reconnect
                conn.disconnect()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            if poll:
                self._await_reply(conn)
            replies = [conn.read_response() for _ in commands]
        except BaseException:
            # Whatever broke (timeout, reset, interrupt), the connection may hold half a reply.
            conn.disconnect()
            self._answered = False
            raise
        finally:
            if len(idle) < _IDLE_MAX:
                idle.append(conn)
            else:
                conn.disconnect()
        self._answered = True
        return replies

    def _await_reply(self, conn: redis.connection.AbstractConnection) -> None:
        """Poll ``conn``'s socket for a moment before its blocking read (see _POLL_FOR)."""
        score = self._poll_score
        if score <= 0:
            self._poll_skipped += 1
            if self._poll_skipped % _RETRY_EVERY:
                return
        sock = getattr(conn, "_sock", None)
        if sock is None or not _CAN_POLL or (hasattr(sock, "pending") and sock.pending()):
            return  # TLS: bytes already decrypted are ready, and polling the socket cannot see them
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        deadline = time.perf_counter() + _POLL_FOR
        while not poller.poll(0):
            if time.perf_counter() >= deadline:
                self._poll_score = max(score, 0) - _MISS_COST
                return
        self._poll_score = min(max(score, 0) + 1, _SCORE_MAX)

    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        # On the idle stack too: the ledger thread writes its batches here, and every step of
        # redis-py's own path is a moment the GIL is not free for the requests. No polling: the
        # writer can wait, and a polling thread takes the GIL back after each poll.
        try:
            self._pipelined(("SET", key, value, "EX", ttl_seconds), poll=False)
        finally:
            self._forget(key)  # after the write: a read racing it cannot keep the old value

    async def aget(self, key: str) -> bytes | None:
        near = self._near if self._answered else None
        try:
            if near is not None:
                value, ticket, setting_up = near.begin(key)  # memory and a non-blocking poll
                if setting_up is not None:
                    # This read started setting tracking up, on a thread: the loop runs on meanwhile,
                    # and a Redis that took the connection but did not answer costs this read that
                    # one timeout (no GET after it).
                    await asyncio.wrap_future(setting_up)
                    value, ticket, _ = near.begin(key)
                if value is not None:
                    return value
                if ticket is not None:
                    value, ttl_ms = await self._apipelined(("GET", key), ("PTTL", key))
                    near.remember(key, value, ttl_ms, ticket)
                    return value
            if self._multiplex is not None:
                value = (await self._apipelined(("GET", key)))[0]
            else:
                value = await (await self._async()).get(key)  # type: ignore[assignment]
        except BaseException:
            self._answered = False
            raise
        self._answered = True
        return value

    async def _apipelined(self, *commands: tuple[Any, ...]) -> list[Any]:
        if self._multiplex is not None:
            # This loop's multiplexed connection: the commands of every task, written together.
            last = self._last_multiplexer
            if last is not None and last[0]() is asyncio.get_running_loop():
                return await last[1].execute(commands)
            return await (await self._multiplexer()).execute(commands)
        # A first read in a process (near cache miss): commands sent on a pool connection as they are,
        # without redis-py's Pipeline object, which costs about half as much again as the round trip.
        client = await self._async()
        if type(client) is not redis.asyncio.Redis:  # a cluster client routes each key itself
            return [await client.execute_command(*each) for each in commands]
        pool = client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            return [await conn.read_response() for _ in commands]
        except BaseException:
            await conn.disconnect()  # it may hold half a reply
            raise
        finally:
            await pool.release(conn)

    async def aset(self, key: str, value: bytes, ttl_seconds: int) -> None:
        try:
            await (await self._async()).set(key, value, ex=ttl_seconds)
        finally:
            self._forget(key)

    def _forget(self, key: str | None) -> None:
        if self._near is not None:
            self._near.forget(key)

    # Single-flight locks shared by every process on this Redis: SET NX PX, released only by their holder.
    def acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        return bool(self._sync().set(key, token, nx=True, px=max(1, ttl_ms)))

    def release(self, key: str, token: str) -> None:
        self._sync().eval(_RELEASE, 1, key, token)

    # A miss takes the lock and looks again in one round trip: Redis runs the GETs after the SET.
    def acquire_and_get(
        self, key: str, token: str, ttl_ms: int, keys: tuple[str, ...]
    ) -> tuple[bool, list[bytes | None]]:
        taken, *values = self._pipelined(
            ("SET", key, token, "NX", "PX", max(1, ttl_ms)), *(("GET", each) for each in keys)
        )
        return bool(taken), values if taken else []

    async def aacquire_and_get(
        self, key: str, token: str, ttl_ms: int, keys: tuple[str, ...]
    ) -> tuple[bool, list[bytes | None]]:
        taken, *values = await self._apipelined(
            ("SET", key, token, "NX", "PX", max(1, ttl_ms)), *(("GET", each) for each in keys)
        )
        return bool(taken), values if taken else []

    def locked(self, key: str) -> bool:
        return bool(self._sync().exists(key))

    async def aacquire(self, key: str, token: str, ttl_ms: int) -> bool:
        if self._multiplex is not None:
            return bool((await self._apipelined(("SET", key, token, "NX", "PX", max(1, ttl_ms))))[0])
        return bool(await (await self._async()).set(key, token, nx=True, px=max(1, ttl_ms)))

    async def arelease(self, key: str, token: str) -> None:
        await (await self._async()).eval(_RELEASE, 1, key, token)

    async def alocked(self, key: str) -> bool:
        return bool(await (await self._async()).exists(key))

    def ttl(self, key: str) -> float | None:
        ms: int = self._sync().pttl(key)
        if ms == -2:
            return None
        return math.inf if ms == -1 else ms / 1000

    def _scan(self, prefix: str) -> Iterator[bytes]:
        pattern = _GLOB_SPECIAL.sub(r"\\\1", prefix) + "*"
        return self._sync().scan_iter(match=pattern, count=1000)

    def delete(self, key: str) -> bool:
        try:
            return bool(self._sync().unlink(key))
        finally:
            self._forget(key)

    def delete_prefix(self, prefix: str) -> int:
        try:
            return self._delete_prefix(prefix)
        finally:
            self._forget(None)

    def _delete_prefix(self, prefix: str) -> int:
        client, deleted, batch = self._sync(), 0, []
        for key in self._scan(prefix):
            batch.append(key)
            if len(batch) >= _BATCH:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
        return deleted

    def keys(self, prefix: str) -> list[str]:
        # SCAN may return a key twice; the set removes duplicates.
        return sorted({key.decode() for key in self._scan(prefix)})

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            idle, self._idle = self._idle, []
            aclients, self._aclients = list(self._aclients.items()), weakref.WeakKeyDictionary()
            self._last_multiplexer = None
        if self._near is not None:
            self._near.close()
        if client is not None:
            client.close()
        if self._idle_pid == os.getpid():
            for conn in idle:
                conn.disconnect()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, (_, _, closer) in aclients:
            # Best effort: a closed loop can run nothing, so its sockets are left to GC.
            if loop.is_closed():
                continue
            if loop is running:
                task = loop.create_task(closer.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(closer.aclose(), loop)
            else:
                loop.run_until_complete(closer.aclose())

    async def aclose(self) -> None:
        """Close this loop's async client cleanly, then everything else."""
        with self._lock:
            entry = self._aclients.pop(asyncio.get_running_loop(), None)
        if entry is not None:
            await entry[2].aclose()
        self.close()


def cluster_node_url(url: str) -> str:
    """``redis+cluster://HOST:PORT`` as the ``redis://`` URL of its first node (``rediss+cluster`` → ``rediss``)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.removesuffix('+cluster')}://{rest}"


class RedisClusterStore(RedisStore):
    """A store on a Redis Cluster (``redis+cluster://HOST:PORT``, any one node; the others are discovered).

    An entry is one key, so it always lives in one hash slot and is written and read
    atomically; prefix scans and deletes visit every primary. Single-flight locks are
    single keys too.
    """

    def __init__(self, url: str) -> None:
        super().__init__(cluster_node_url(url))
        self.url = mask_url(url)
        self._near = None  # tracking is per node; a cluster read is always a GET to the key's node
        self._multiplex = None  # the cluster client routes each key to its node

    def _new_client(self) -> Any:
        return redis.cluster.RedisCluster.from_url(
            self._raw_url, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **_DEFAULTS
        )

    def _new_async_client(self) -> Any:
        return redis.asyncio.cluster.RedisCluster.from_url(
            self._raw_url, retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0), **_DEFAULTS
        )

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self._sync().get(key)  # type: ignore[assignment]  # the cluster client routes each key to its node
        return value

    def _scan(self, prefix: str) -> Iterator[bytes]:
        pattern = _GLOB_SPECIAL.sub(r"\\\1", prefix) + "*"
        client = self._sync()
        for node in client.get_primaries():  # type: ignore[attr-defined]
            yield from client.scan_iter(match=pattern, count=1000, target_nodes=node)
