"""Near caches: a hit read again in the same process comes from memory, and never outlives a change.

Redis keeps its near cache coherent through client tracking (invalidation pushes), SQLite through
``PRAGMA data_version``. Every test here changes an entry behind the reader's back (another client,
another connection, another process) and checks that the reader sees the change.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import select
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis._parsers import _HiredisParser, _RESP3Parser

from metrion_fixture import MetrionCacheError
from metrion_fixture.core.engine import decode_hit
from metrion_fixture.core.entry import Entry
from metrion_fixture.stores import redis_tracking
from metrion_fixture.stores.near import NearCache
from metrion_fixture.stores.redis import RedisStore
from metrion_fixture.stores.sqlite import SQLiteStore


def eventually(check: Callable[[], bool], within: float = 5.0) -> bool:
    """Whether ``check`` becomes true within ``within`` seconds (a message in flight is waited for, not timed)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.01)
    return check()


@pytest.fixture
def prefix() -> str:
    return f"near-{uuid.uuid4().hex[:10]}:"


PARSERS = {"hiredis": _HiredisParser, "python": _RESP3Parser}


@pytest.fixture(params=sorted(PARSERS))
def parser(request: pytest.FixtureRequest) -> type:
    """Both reply parsers: hiredis (with the ``fast`` extra) and redis-py's own (without)."""
    return PARSERS[request.param]


def redis_store(url: str, parser: type) -> RedisStore:
    """A RedisStore whose connections, tracking one included, all use ``parser``."""
    store = RedisStore(url)
    new_client = store._new_client

    def client_with_parser() -> Any:
        client = new_client()
        client.connection_pool.connection_kwargs["parser_class"] = parser  # the tracking connection's too
        return client

    store._new_client = client_with_parser  # type: ignore[method-assign]
    return store


@pytest.fixture
def store(redis_url: str, prefix: str, parser: type) -> Iterator[RedisStore]:
    store = redis_store(redis_url, parser)
    yield store
    store.delete_prefix(prefix)
    store.close()


def count_round_trips(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Each pipeline the store sends (its commands), from now on."""
    sent: list[tuple[Any, ...]] = []
    pipelined = store._pipelined

    def spy(*commands: tuple[Any, ...], **options: Any) -> list[Any]:
        sent.append(commands)
        return pipelined(*commands, **options)

    monkeypatch.setattr(store, "_pipelined", spy)
    return sent


# --- Redis ---------------------------------------------------------------------------------


def test_a_repeated_read_makes_no_round_trip(
    store: RedisStore, prefix: str, monkeypatch: pytest.MonkeyPatch, parser: type
) -> None:
    store.set(prefix + "k", b"answer", 60)
    sent = count_round_trips(store, monkeypatch)
    assert [store.get(prefix + "k") for _ in range(20)] == [b"answer"] * 20
    # The write found Redis up, so the first read sets up tracking and keeps the value; the rest are memory.
    assert len(sent) == 1
    assert store._near is not None and store._near.tracking
    assert type(store._near._conn._parser) is parser


def test_a_write_by_another_client_is_seen(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    key = prefix + "k"
    store.set(key, b"old", 60)
    store.get(key), store.get(key)
    assert store.get(key) == b"old"  # from memory now
    other.set(key, b"new", ex=60)
    assert eventually(lambda: store.get(key) == b"new")
    # And it is kept again: the new value, not the old one.
    assert [store.get(key) for _ in range(5)] == [b"new"] * 5


def test_a_delete_by_another_client_is_seen(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    for name in ("a", "b"):
        store.set(prefix + name, name.encode(), 60)
        store.get(prefix + name), store.get(prefix + name)
    other.delete(prefix + "a")
    assert eventually(lambda: store.get(prefix + "a") is None)
    assert store.get(prefix + "b") == b"b"  # only the deleted key is dropped


def test_a_flush_drops_everything_kept(store: RedisStore, prefix: str) -> None:
    # FLUSHDB / FLUSHALL arrive as one invalidation without keys. Not sent for real here: this
    # Redis is shared with other test runs, so the message is handed to the handler as parsed.
    for name in ("a", "b"):
        store.set(prefix + name, name.encode(), 60)
        store.get(prefix + name), store.get(prefix + name)
    near = store._near
    assert near is not None and len(near._values) == 2
    _, ticket = near.lookup(prefix + "c")
    near._invalidated([b"invalidate", None])
    assert len(near._values) == 0
    assert near.lookup(prefix + "c")[1] != ticket  # a read in flight during the flush keeps nothing


def test_another_databases_marker_drops_everything_kept(
    store: RedisStore, other: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a SWAPDB looks like to the near cache: no invalidation, another database's marker. (The real
    SWAPDB is in test_chaos.py, on a Redis of its own: this one is shared.)"""
    monkeypatch.setattr(redis_tracking, "PING_EVERY", 0.05)
    key = prefix + "k"
    store.set(key, b"v", 60)
    assert store.get(key) == store.get(key) == b"v"
    near = store._near
    assert near is not None and near._db_marker is not None and len(near._values) == 1
    sent = count_round_trips(store, monkeypatch)
    assert store.get(key) == b"v" and sent == []  # from memory
    swapped_in = uuid.uuid4().hex.encode()
    other.set(redis_tracking.DB_MARKER_KEY, swapped_in)  # the marker key itself is not tracked
    assert eventually(lambda: store.get(key) == b"v" and near._db_marker == swapped_in)
    sent.clear()
    assert store.get(key) == b"v" and sent == [], "memory is used again once the new database is confirmed"


def test_the_database_check_keeps_repeated_hits_in_memory(
    store: RedisStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The health check confirms the database ahead of time: reads going on for several check periods stay
    in memory (no round trip), as they did before the check existed, and each check answered renews it."""
    # A loaded machine may answer a check later than DB_CONFIRMED_FOR: the renewal is asserted below,
    # not timed, so a slow reply cannot send the reads to Redis here.
    monkeypatch.setattr(redis_tracking, "DB_CONFIRMED_FOR", 600.0)
    key = prefix + "k"
    store.set(key, b"v", 60)
    store.get(key), store.get(key)
    near = store._near
    assert near is not None and near._confirmed_at > 0
    confirmed_first = near._confirmed_at
    sent = count_round_trips(store, monkeypatch)
    until = time.monotonic() + 5 * redis_tracking.PING_EVERY
    reads = 0
    while time.monotonic() < until:
        assert store.get(key) == b"v"
        reads += 1
        time.sleep(0.002)
    assert eventually(lambda: store.get(key) == b"v" and near._confirmed_at > confirmed_first), "no check renewed it"
    assert reads > 100 and sent == [], f"{len(sent)} round trips for {reads} repeated reads"


def test_writes_made_here_are_seen_at_once(store: RedisStore, prefix: str) -> None:
    key = prefix + "k"
    store.set(key, b"one", 60)
    store.get(key), store.get(key)
    store.set(key, b"two", 60)
    assert store.get(key) == b"two"  # no waiting: this process's own write
    store.delete_prefix(prefix)
    assert store.get(key) is None


def test_threads_reading_while_another_client_writes_end_on_the_last_value(
    store: RedisStore, other: redis.Redis, prefix: str
) -> None:
    """Readers racing a writer only ever see written values, and all settle on the last one."""
    key, last = prefix + "k", 150
    other.set(key, b"0", ex=60)
    written = {str(i).encode() for i in range(last + 1)}
    seen: list[set[bytes | None]] = [set() for _ in range(4)]
    done = threading.Event()

    def read(into: set[bytes | None]) -> None:
        while not done.is_set():
            into.add(store.get(key))

    readers = [threading.Thread(target=read, args=(into,)) for into in seen]
    for reader in readers:
        reader.start()
    for i in range(1, last + 1):
        other.set(key, str(i).encode(), ex=60)
        time.sleep(0.001)
    done.set()
    for reader in readers:
        reader.join()
    assert all(values <= written for values in seen)
    assert eventually(lambda: store.get(key) == str(last).encode())
    assert store._near is not None and store._near.tracking  # it kept tracking through the churn


def test_a_value_read_while_its_key_changed_is_not_kept(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    key = prefix + "k"
    other.set(key, b"old", ex=60)
    store.get(key)  # Redis has answered: tracking may be set up from now on
    near = store._near
    assert near is not None
    value, ticket = near.lookup(key)
    assert value is None and ticket is not None
    # What a slow reader would have read; meanwhile another client replaces it.
    stale = store._pipelined(("GET", key), ("PTTL", key))
    other.set(key, b"new", ex=60)
    assert eventually(lambda: near.lookup(key)[1] != ticket)  # the invalidation has arrived
    near.remember(key, stale[0], stale[1], ticket)
    assert store.get(key) == b"new"


def test_the_near_copy_expires_with_the_key(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    key = prefix + "k"
    other.set(key, b"short", px=300)
    assert store.get(key) == store.get(key) == b"short"
    assert store._near is not None and len(store._near._values) == 1
    time.sleep(0.35)
    assert store.get(key) is None


def test_a_killed_tracking_connection_turns_the_near_cache_off(
    store: RedisStore, other: redis.Redis, prefix: str
) -> None:
    key = prefix + "k"
    store.set(key, b"old", 60)
    store.get(key), store.get(key)
    near = store._near
    assert near is not None and near._conn is not None
    port = near._conn._sock.getsockname()[1]
    (client,) = [c for c in other.client_list() if c["addr"].endswith(f":{port}")]
    assert "t" in client["flags"]  # the connection Redis tracks keys for
    other.client_kill_filter(_id=client["id"])
    other.set(key, b"new", ex=60)  # no invalidation can reach us now
    assert store.get(key) == b"new"  # the closed socket was noticed before memory was trusted
    assert not near.tracking


def test_an_idle_process_closes_its_tracking_connection(
    store: RedisStore, other: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis queues an invalidation per write for every tracking client: one that stopped reading lets go."""
    monkeypatch.setattr(redis_tracking, "IDLE_CLOSE", 0.2)
    key = prefix + "k"
    store.set(key, b"old", 60)
    assert store.get(key) == store.get(key) == b"old"
    near = store._near
    assert near is not None and near._conn is not None
    port = near._conn._sock.getsockname()[1]

    def tracking_client_gone() -> bool:
        return not near.tracking and not [c for c in other.client_list() if c["addr"].endswith(f":{port}")]

    assert eventually(tracking_client_gone)
    other.set(key, b"new", ex=60)  # while nobody tracks for this process
    assert store.get(key) == b"new"
    assert store.get(key) == b"new" and near.tracking  # tracking again, from the first read on


class FreezingProxy:
    """A TCP proxy to Redis that can stop forwarding without closing anything (a silent network)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not self.frozen.is_set():
                sink.sendall(data)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_a_silent_tracking_connection_stops_the_near_cache(
    redis_url: str, other: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch, parser: type
) -> None:
    monkeypatch.setattr(redis_tracking, "PING_EVERY", 0.05)
    monkeypatch.setattr(redis_tracking, "PONG_WITHIN", 0.3)
    target = int(redis_url.split(":")[2].split("/")[0])
    proxy = FreezingProxy(target)
    store = redis_store(f"redis://127.0.0.1:{proxy.port}/{redis_url.rsplit('/', 1)[1]}?socket_timeout=0.5", parser)
    key = prefix + "k"
    try:
        other.set(key, b"old", ex=60)
        assert store.get(key) == store.get(key) == b"old"
        assert store._near is not None and store._near.tracking
        proxy.frozen.set()
        other.set(key, b"new", ex=60)  # its invalidation is lost in the frozen proxy

        def stopped_serving_old() -> bool:
            try:
                return store.get(key) != b"old"
            except redis.RedisError:
                return True  # the frozen GET timed out: memory is no longer trusted

        assert eventually(stopped_serving_old)
        assert not store._near.tracking
    finally:
        store.close()
        proxy.close()
        other.delete(key)


def test_near_cache_off_reads_redis_every_time(redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore(redis_url + "?near_cache=off")
    try:
        store.set(prefix + "k", b"v", 60)
        sent = count_round_trips(store, monkeypatch)
        assert [store.get(prefix + "k") for _ in range(5)] == [b"v"] * 5
        assert len(sent) == 5
        assert store._near is None
    finally:
        store.delete_prefix(prefix)
        store.close()


def test_a_bad_near_cache_option_is_refused() -> None:
    with pytest.raises(MetrionCacheError, match="near_cache must be on or off, not 'maybe'"):
        RedisStore("redis://127.0.0.1:6379/0?near_cache=maybe")


def test_async_reads_use_and_respect_the_near_cache(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    key = prefix + "k"

    async def scenario() -> list[bytes | None]:
        await store.aset(key, b"old", 60)
        seen = [await store.aget(key) for _ in range(3)]
        assert store._near is not None and len(store._near._values) == 1
        other.set(key, b"new", ex=60)
        deadline = time.monotonic() + 5
        while (value := await store.aget(key)) == b"old" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return [*seen, value]

    assert asyncio.run(scenario()) == [b"old", b"old", b"old", b"new"]


_FORKED_STORE: RedisStore | None = None


def _read_in_child(key: str, results: Any) -> None:
    assert _FORKED_STORE is not None
    results.put(_FORKED_STORE.get(key))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_never_touches_the_parents_tracking(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    global _FORKED_STORE
    key = prefix + "k"
    store.set(key, b"old", 60)
    store.get(key), store.get(key)
    near = store._near
    assert near is not None and near._conn is not None
    other.set(key, b"new", ex=60)
    # The invalidation now waits in the tracking socket, which a forked child shares: if the child
    # drained it, the parent would never hear of the change and would serve "old" for good.
    # (select on the socket, not can_read(): redis-py's own parser reads what it finds into its buffer)
    assert eventually(lambda: bool(select.select([near._conn._sock], [], [], 0)[0]))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    _FORKED_STORE = store
    try:
        child = context.Process(target=_read_in_child, args=(key, results))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert results.get(timeout=5) == b"new"
    finally:
        _FORKED_STORE = None
    assert store.get(key) == b"new"
    assert near.tracking  # and the child did not close the parent's connection


# --- SQLite --------------------------------------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "near.sqlite3"


def _selects(store: SQLiteStore) -> list[str]:
    statements: list[str] = []
    store._conn().set_trace_callback(statements.append)
    return statements


def test_sqlite_repeated_read_runs_one_query(sqlite_path: Path) -> None:
    store = SQLiteStore(sqlite_path)
    store.set("k", b"answer", 60)
    statements = _selects(store)
    assert [store.get("k") for _ in range(10)] == [b"answer"] * 10
    assert sum("FROM entries" in s for s in statements) == 1


def test_sqlite_changes_by_another_connection_are_seen_at_once(sqlite_path: Path) -> None:
    reader, writer = SQLiteStore(sqlite_path), SQLiteStore(sqlite_path)
    writer.set("k", b"old", 60)
    assert reader.get("k") == reader.get("k") == b"old"
    writer.set("k", b"new", 60)
    assert reader.get("k") == b"new"  # exact: data_version moved before the read
    raw = sqlite3.connect(sqlite_path)
    with raw:
        raw.execute("DELETE FROM entries WHERE key = 'k'")
    raw.close()
    assert reader.get("k") is None


def test_sqlite_changes_by_another_process_are_seen(sqlite_path: Path) -> None:
    reader = SQLiteStore(sqlite_path)
    reader.set("k", b"old", 60)
    assert reader.get("k") == reader.get("k") == b"old"
    code = "import sys\nfrom metrion_fixture.stores.sqlite import SQLiteStore\nSQLiteStore(sys.argv[1]).set('k', b'new', 60)\n"
    import subprocess

    subprocess.run([sys.executable, "-c", code, str(sqlite_path)], check=True)
    assert reader.get("k") == b"new"


def test_sqlite_a_write_from_another_thread_is_seen(sqlite_path: Path) -> None:
    store = SQLiteStore(sqlite_path)
    store.set("k", b"old", 60)
    assert store.get("k") == store.get("k") == b"old"
    writer = threading.Thread(target=store.set, args=("k", b"new", 60))  # its own connection
    writer.start()
    writer.join()
    assert store.get("k") == b"new"
    store.delete_prefix("k")
    assert store.get("k") is None


def test_sqlite_near_copy_expires_with_the_row(sqlite_path: Path) -> None:
    store = SQLiteStore(sqlite_path)
    store.set("k", b"v", 60)
    assert store.get("k") == store.get("k") == b"v"
    raw = sqlite3.connect(sqlite_path)  # an expiry in the past, written by someone else
    with raw:
        raw.execute("UPDATE entries SET expires_at = 0 WHERE key = 'k'")
    raw.close()
    assert store.get("k") is None


def test_sqlite_prepare_retries_only_a_locked_file(sqlite_path: Path) -> None:
    """Processes creating one file at once get "database is locked" without a busy wait: retried."""

    class Flaky:
        def __init__(self, conn: sqlite3.Connection, failures: list[str]) -> None:
            self.conn, self.failures = conn, failures

        def execute(self, *args: Any) -> Any:
            if self.failures:
                raise sqlite3.OperationalError(self.failures.pop(0))
            return self.conn.execute(*args)

    conn = sqlite3.connect(sqlite_path, isolation_level=None)
    SQLiteStore._prepare_file(Flaky(conn, ["database is locked", "database is locked"]))  # type: ignore[arg-type]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        SQLiteStore._prepare_file(Flaky(conn, ["disk I/O error"]))  # type: ignore[arg-type]
    conn.close()


# --- the near cache itself and the decoded-entry memo ----------------------------------------


def test_near_cache_bounds_its_bytes_and_drops_the_least_recently_used() -> None:
    near = NearCache(max_bytes=100, max_value_bytes=60)
    near.put("a", b"x" * 40)
    near.put("b", b"x" * 40)
    assert near.get("a", 0) is not None  # "a" is now the most recently used
    near.put("c", b"x" * 40)
    assert (near.get("a", 0), near.get("b", 0), near.get("c", 0)) == (b"x" * 40, None, b"x" * 40)
    near.put("big", b"x" * 61)
    assert near.get("big", 0) is None
    near.put("old", b"v", expires_at=10.0)
    assert near.get("old", 9.9) == b"v" and near.get("old", 10.0) is None


def _entry(text: str) -> bytes:
    return Entry(
        status=200,
        headers=[("content-type", "application/json")],
        chunks=[text.encode()],
        stream=False,
        stored_at=1.0,
        ttl=60,
        model="m",
        wire_format="anthropic_messages",
        key="0" * 64,
    ).encode()


def test_decoded_entries_are_reused_only_for_identical_bytes() -> None:
    from metrion_fixture.core.entry import RecentEntries

    recent = RecentEntries()
    good = _entry(f"answer {uuid.uuid4().hex}")
    first = decode_hit(bytes(bytearray(good)), recent)
    assert first is not None and decode_hit(bytes(bytearray(good)), recent) is first  # an equal value: same entry
    # Same length and same stored checksum, one byte changed in the middle: not the remembered value.
    middle = len(good) // 2
    damaged = good[:middle] + bytes([good[middle] ^ 1]) + good[middle + 1 :]
    assert decode_hit(damaged, recent) is None


def test_the_near_cache_option_leaves_the_other_url_options_as_written() -> None:
    from metrion_fixture.stores.redis import near_cache_option

    url = "redis://:p%20w@cache:6379/2?socket_timeout=0.5&near_cache=off&password=a%2Bb"
    assert near_cache_option(url) == ("redis://:p%20w@cache:6379/2?socket_timeout=0.5&password=a%2Bb", False)
    assert near_cache_option("redis://cache/0?near_cache=on") == ("redis://cache/0", True)
    assert near_cache_option("redis://cache/0") == ("redis://cache/0", None)
