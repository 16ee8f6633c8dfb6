"""A store in one SQLite file, shared by every thread and process that opens it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from metrion_fixture.stores.base import Store
from metrion_fixture.stores.near import NearCache

_BUSY_TIMEOUT_MS = 5000
_PURGE_EVERY = 1000
_FILE_CHECK_SECONDS = 1.0  # how soon a thread notices that the file was deleted or replaced
_NEAR_CACHE_BYTES = 16 * 1024 * 1024  # per thread: each thread has its own connection and its own near cache
# Threads for async callers' writes and locks (each with its own connection): SQLite has one writer
# at a time anyway, and an event loop's default executor is left to the application.
_WORKERS = 4
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_expires_at ON entries (expires_at)",
    # Single-flight locks, shared by every process that opens the file; each expires by itself.
    "CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL)",
)


def _prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string above every string starting with ``prefix``; None if unbounded.

    SQLite compares TEXT as UTF-8 bytes, which orders like code points, so a range
    scan on the primary key finds a prefix exactly (LIKE would treat ``_``/``%``
    as wildcards) and uses the index.
    """
    head = prefix
    while head:
        code = ord(head[-1]) + 1
        head = head[:-1]
        if code == 0xD800:  # surrogates cannot be encoded to UTF-8
            code = 0xE000
        if code <= 0x10FFFF:
            return head + chr(code)
    return None


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _heals_schema(method: _Method) -> _Method:
    """A missing table (the file emptied or replaced under the process) fails this call, as any store
    error does (the breaker opens); the next call, after the breaker's cool-down, opens a new connection
    and re-creates the schema, instead of failing with the same error forever."""

    @functools.wraps(method)
    def guarded(self: SQLiteStore, *args: Any) -> Any:
        try:
            return method(self, *args)
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                self._schema_lost()
            raise

    return guarded  # type: ignore[return-value]


class SQLiteStore(Store):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        # The file (device, inode) whose schema this process has checked, and what each thread's
        # connection opened: a file deleted or replaced under a running process is noticed there.
        self._ready_file: tuple[int, int] | None = None
        self._sets = itertools.count(1)
        # Connections inherited over fork() must never be used or closed by the child.
        self._forked: list[sqlite3.Connection] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_pid = 0

    def _conn(self, check_file: bool = True) -> sqlite3.Connection:
        return self._connection(check_file)[0]

    def _connection(self, check_file: bool) -> tuple[sqlite3.Connection, Any]:
        """This thread's connection and the thread-local state that goes with it (a close() racing
        this call replaces ``self._local``; the pair stays consistent)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._forked.extend(self._conns)
                    self._conns, self._local = [], threading.local()
                    self._pid = os.getpid()
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and (check_file or time.monotonic() >= local.next_check):
            # A file deleted (or replaced) under the process stays open in this connection, where nobody
            # else would see a write: start on the file that is there now, with its schema. A stat costs
            # about as much as a near-cache hit, so reads look at most once per interval (until then they
            # may answer from the deleted file: whole answers, stored before it was deleted); every
            # write, lock and delete looks first, so it always lands in the file that is there.
            local.next_check = time.monotonic() + _FILE_CHECK_SECONDS
            if local.file != self._file_id():
                self._drop_connection(local)
                conn = None
        if conn is None:
            conn, file = self._connect()
            local.conn, local.file = conn, file
            local.next_check = time.monotonic() + _FILE_CHECK_SECONDS
            local.near = NearCache(_NEAR_CACHE_BYTES)
            local.version = None
        return conn, local

    def _would_prepare(self, check_file: bool) -> bool:
        """Whether this thread's next ``_conn(check_file)`` prepares the file (a write, which may wait for a lock)."""
        if self._ready_file is None:
            return True
        if not check_file and getattr(self._local, "conn", None) is not None:
            if time.monotonic() < self._local.next_check:
                return False
        return self._file_id() != self._ready_file

    def _file_id(self) -> tuple[int, int] | None:
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return None
        return found.st_dev, found.st_ino

    def _drop_connection(self, local: Any) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            return
        local.conn = None
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        conn.close()

    def _schema_lost(self) -> None:
        """A table is missing (the file was emptied or replaced): check the schema on the next connection."""
        self._ready_file = None
        self._drop_connection(self._local)

    def _connect(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per thread; check_same_thread=False only so close() can
        # close every thread's connection from the thread that calls it.
        conn = sqlite3.connect(
            self.path,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            # Opening created the file if it was missing; read its identity now that it exists.
            file = self._file_id()
            if file is None:
                raise sqlite3.OperationalError(f"{self.path} was deleted while it was being opened")
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if file != self._ready_file:
                self._prepare_file(conn)
                self._ready_file = file
            # Safe in WAL mode (a crash loses at most the last writes): enough for a cache.
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._conns.append(conn)
        return conn, file

    @staticmethod
    def _prepare_file(conn: sqlite3.Connection) -> None:
        # Switching to WAL and recovering a WAL file take locks for which SQLite
        # does not call the busy handler, so processes that open a new file at the
        # same moment see "database is locked" at once: retry that until the
        # busy timeout has passed, as the busy handler would have.
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        delay = 0.001
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("DELETE FROM entries WHERE expires_at <= ?", (time.time(),))
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) and "busy" not in str(error):
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _range(self, prefix: str) -> tuple[str, tuple[str, ...]]:
        upper = _prefix_upper_bound(prefix)
        if upper is None:
            return "key >= ?", (prefix,)
        return "key >= ? AND key < ?", (prefix, upper)

    def get(self, key: str) -> bytes | None:
        conn, local = self._connection(check_file=False)
        # What this thread read lately is kept in memory, valid until any other connection (another
        # thread or process) commits a change to the file: data_version tells, exactly and cheaply.
        # This connection's own writes do not move it; set() and delete_prefix() update the near cache.
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        near: NearCache = local.near
        if version != local.version:
            near.clear()
            local.version = version
        now = time.time()
        value = near.get(key, now)
        if value is not None:
            return value
        row = self._select(conn, key, now)
        if row is None:
            return None
        value = bytes(row[0])
        near.put(key, value, row[1])
        return value

    @_heals_schema  # the hit path above touches no table
    def _select(self, conn: sqlite3.Connection, key: str, now: float) -> tuple[bytes, float] | None:
        found: tuple[bytes, float] | None = conn.execute(
            "SELECT value, expires_at FROM entries WHERE key = ? AND expires_at > ?", (key, now)
        ).fetchone()
        return found

    @_heals_schema
    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds!r}")
        conn = self._conn()
        now = time.time()
        try:
            conn.execute(
                "INSERT OR REPLACE INTO entries (key, value, expires_at) VALUES (?, ?, ?)",
                (key, sqlite3.Binary(value), now + ttl_seconds),
            )
        finally:
            self._local.near.discard(key)
        if next(self._sets) % _PURGE_EVERY == 0:
            conn.execute("DELETE FROM entries WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM locks WHERE expires_at <= ?", (now,))

    # From async code, everything that can wait on the write lock (held by another connection, maybe
    # another process, for up to the busy timeout) runs on a worker thread. Reads stay on the loop's
    # thread, with its near cache: in WAL mode a reader never waits for a writer.
    async def aget(self, key: str) -> bytes | None:
        if self._would_prepare(check_file=False):
            # The first connection to a file prepares it, which writes (schema, purge): on a worker.
            await self._off_loop(self._conn)
        return self.get(key)

    async def aset(self, key: str, value: bytes, ttl_seconds: int) -> None:
        await self._off_loop(self.set, key, value, ttl_seconds)

    async def aacquire(self, key: str, token: str, ttl_ms: int) -> bool:
        job = self._submit(self.acquire, key, token, ttl_ms)
        try:
            taken: bool = await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            # The caller will never know it holds the lock, so nobody would release it before it
            # expires, and every identical request would wait for that: release it here.
            job.add_done_callback(lambda done: self._release_if_taken(done, key, token))
            raise
        return taken

    def _release_if_taken(self, done: concurrent.futures.Future[bool], key: str, token: str) -> None:
        if not done.cancelled() and done.exception() is None and done.result():
            self._submit(self.release, key, token)

    async def arelease(self, key: str, token: str) -> None:
        await self._off_loop(self.release, key, token)

    async def alocked(self, key: str) -> bool:
        if self._would_prepare(check_file=True):
            await self._off_loop(self._conn)
        return self.locked(key)

    async def _off_loop(self, function: Any, *args: Any) -> Any:
        # Shielded: a cancelled caller still lets a started write or release finish.
        return await asyncio.shield(asyncio.wrap_future(self._submit(function, *args)))

    def _submit(self, function: Any, *args: Any) -> concurrent.futures.Future[Any]:
        if self._executor is None or self._executor_pid != os.getpid():
            with self._lock:
                # After fork() the parent's pool has no threads here, yet would think it has.
                if self._executor is None or self._executor_pid != os.getpid():
                    self._executor = concurrent.futures.ThreadPoolExecutor(_WORKERS, "metrion-sqlite")
                    self._executor_pid = os.getpid()
        return self._executor.submit(function, *args)

    @_heals_schema
    def acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        conn, now = self._conn(), time.time()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM locks WHERE key = ? AND expires_at <= ?", (key, now))
            inserted = conn.execute(
                "INSERT OR IGNORE INTO locks (key, token, expires_at) VALUES (?, ?, ?)",
                (key, token, now + max(1, ttl_ms) / 1000),
            ).rowcount
        return inserted == 1

    @_heals_schema
    def release(self, key: str, token: str) -> None:
        self._conn().execute("DELETE FROM locks WHERE key = ? AND token = ?", (key, token))

    @_heals_schema
    def locked(self, key: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM locks WHERE key = ? AND expires_at > ?", (key, time.time()))
        return row.fetchone() is not None

    @_heals_schema
    def ttl(self, key: str) -> float | None:
        now = time.time()
        row = (
            self._conn()
            .execute("SELECT expires_at FROM entries WHERE key = ? AND expires_at > ?", (key, now))
            .fetchone()
        )
        return None if row is None else row[0] - now

    @_heals_schema
    def delete(self, key: str) -> bool:
        conn = self._conn()
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                live = conn.execute("DELETE FROM entries WHERE key = ? AND expires_at > ?", (key, time.time())).rowcount
                conn.execute("DELETE FROM entries WHERE key = ?", (key,))  # expired: gone too, not counted
        finally:
            self._local.near.discard(key)
        return live == 1

    @_heals_schema
    def delete_prefix(self, prefix: str) -> int:
        where, args = self._range(prefix)
        conn = self._conn()
        try:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                # Expired rows go too, but only live ones are counted.
                conn.execute(f"DELETE FROM entries WHERE {where} AND expires_at <= ?", (*args, time.time()))
                return conn.execute(f"DELETE FROM entries WHERE {where}", args).rowcount
        finally:
            self._local.near.clear()

    @_heals_schema
    def keys(self, prefix: str) -> list[str]:
        where, args = self._range(prefix)
        rows = self._conn().execute(
            f"SELECT key FROM entries WHERE {where} AND expires_at > ? ORDER BY key",
            (*args, time.time()),
        )
        return [row[0] for row in rows]

    def close(self) -> None:
        with self._lock:
            conns, self._conns, self._local = self._conns, [], threading.local()
        for conn in conns:
            conn.close()
