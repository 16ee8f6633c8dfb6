"""A store in one SQLite file, shared by every thread and process that opens it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from metrion_fixture.stores.base import Store
from metrion_fixture.stores.near import NearCache

_BUSY_TIMEOUT_MS = 5000
_PURGE_EVERY = 1000
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


class SQLiteStore(Store):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._ready = False
        self._sets = itertools.count(1)
        # Connections inherited over fork() must never be used or closed by the child.
        self._forked: list[sqlite3.Connection] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_pid = 0

    def _conn(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._forked.extend(self._conns)
                    self._conns, self._local = [], threading.local()
                    self._pid = os.getpid()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            self._local.near = NearCache(_NEAR_CACHE_BYTES)
            self._local.version = None
        return conn

    def _connect(self) -> sqlite3.Connection:
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
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if not self._ready:
                self._prepare_file(conn)
                self._ready = True
            # Safe in WAL mode (a crash loses at most the last writes): enough for a cache.
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._conns.append(conn)
        return conn

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
        conn, local = self._conn(), self._local
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
        row = conn.execute(
            "SELECT value, expires_at FROM entries WHERE key = ? AND expires_at > ?", (key, now)
        ).fetchone()
        if row is None:
            return None
        value = bytes(row[0])
        near.put(key, value, row[1])
        return value

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
        if not self._ready:
            # The first connection of the process prepares the file, which writes (schema, purge).
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
        if not self._ready:
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

    def release(self, key: str, token: str) -> None:
        self._conn().execute("DELETE FROM locks WHERE key = ? AND token = ?", (key, token))

    def locked(self, key: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM locks WHERE key = ? AND expires_at > ?", (key, time.time()))
        return row.fetchone() is not None

    def ttl(self, key: str) -> float | None:
        now = time.time()
        row = (
            self._conn()
            .execute("SELECT expires_at FROM entries WHERE key = ? AND expires_at > ?", (key, now))
            .fetchone()
        )
        return None if row is None else row[0] - now

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
