from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import redis.asyncio

from metrion_fixture import stores
from metrion_fixture.errors import MetrionCacheError
from metrion_fixture.stores import default_store_url, open_store
from metrion_fixture.stores import sqlite as sqlite_store
from metrion_fixture.stores.base import Store
from metrion_fixture.stores.memory import MemoryStore
from metrion_fixture.stores.redis import RedisStore
from metrion_fixture.stores.sqlite import SQLiteStore, _prefix_upper_bound

ROOT = Path(__file__).resolve().parents[1]
# No skip when Redis is down: the redis-parametrized tests fail, as they should.
REDIS_URL = os.environ.get("METRION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
MiB = 1 << 20


@pytest.fixture
def p() -> str:
    """A key prefix of this test's own, so tests sharing one Redis never collide."""
    return f"mf-test:{uuid.uuid4().hex}:"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, p: str, tmp_path: Path) -> Iterator[Store]:
    url = {
        "memory": f"memory://{p}",
        "sqlite": f"sqlite:///{tmp_path / 'cache.sqlite3'}",
        "redis": REDIS_URL,
    }[kind]
    s = open_store(url)
    yield s
    s.delete_prefix(p)
    s.close()


def test_roundtrip_binary(store: Store, p: str) -> None:
    values = [b"", b"\x00", bytes(range(256)), os.urandom(MiB), os.urandom(16 * MiB)]
    for i, value in enumerate(values):
        store.set(f"{p}{i}", value, 60)
    for i, value in enumerate(values):
        assert store.get(f"{p}{i}") == value
    assert store.get(f"{p}missing") is None
    assert store.ttl(f"{p}missing") is None


def test_set_replaces_value_and_ttl(store: Store, p: str) -> None:
    store.set(f"{p}k", b"old", 100)
    store.set(f"{p}k", b"new", 10)
    assert store.get(f"{p}k") == b"new"
    ttl = store.ttl(f"{p}k")
    assert ttl is not None and 5 < ttl <= 10
    assert store.keys(p) == [f"{p}k"]


def test_rejects_non_positive_ttl(store: Store, p: str, kind: str) -> None:
    with pytest.raises((ValueError, redis.exceptions.ResponseError)):
        store.set(f"{p}k", b"v", 0)
    assert store.get(f"{p}k") is None


def test_expiry(store: Store, p: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store.set(f"{p}short", b"v", 1)
    store.set(f"{p}long", b"w", 100)
    ttl = store.ttl(f"{p}short")
    assert ttl is not None and 0.5 < ttl <= 1
    if kind == "redis":
        time.sleep(1.2)
    else:
        now = time.time()
        monkeypatch.setattr(time, "time", lambda: now + 1.5)
    assert store.get(f"{p}short") is None
    assert store.ttl(f"{p}short") is None
    assert store.get(f"{p}long") == b"w"
    assert store.keys(p) == [f"{p}long"]


def test_delete_prefix_and_keys_match_literally(store: Store, p: str) -> None:
    # Decoys a wildcard reading of _ % * ? [ ] \ would also match (LIKE or glob).
    decoys = [f"{p}kZm1", f"{p}kZZm1", f"{p}km1", f"{p}other"]
    specials = ["_", "%", "*", "?", "[", "]", "\\"]
    for key in decoys:
        store.set(key, b"d", 60)
    for s in specials:
        store.set(f"{p}k{s}m2", b"x", 60)
        store.set(f"{p}k{s}m1", b"x", 60)
    for s in specials:
        assert store.keys(f"{p}k{s}m") == [f"{p}k{s}m1", f"{p}k{s}m2"]
    for i, s in enumerate(specials):
        assert store.delete_prefix(f"{p}k{s}m") == 2
        assert store.get(f"{p}k{s}m1") is None
        assert len(store.keys(p)) == len(decoys) + 2 * (len(specials) - i - 1)
    assert store.keys(p) == sorted(decoys)
    assert store.delete_prefix(f"{p}nothing") == 0


def test_delete_removes_exactly_one_key(store: Store, p: str) -> None:
    """Issue 14, item 11: a key that is a prefix of others (a shared entry and its per-credential
    twins) is deleted alone; the answer says whether a live value went."""
    store.set(f"{p}k", b"shared", 60)
    store.set(f"{p}k:cred-1", b"scoped", 60)
    assert store.get(f"{p}k") == b"shared"  # remembered by a near cache, which must forget it too
    assert store.delete(f"{p}k") is True
    assert store.get(f"{p}k") is None and store.get(f"{p}k:cred-1") == b"scoped"
    assert store.delete(f"{p}k") is False
    assert store.keys(p) == [f"{p}k:cred-1"]


async def test_async_roundtrip(store: Store, p: str) -> None:
    await asyncio.gather(*(store.aset(f"{p}{i}", bytes([i]) * 3, 60) for i in range(20)))
    got = await asyncio.gather(*(store.aget(f"{p}{i}") for i in range(20)))
    assert got == [bytes([i]) * 3 for i in range(20)]
    assert await store.aget(f"{p}missing") is None
    assert store.get(f"{p}3") == b"\x03\x03\x03"  # the sync side sees async writes
    await store.aclose()


def test_threads_share_one_store(store: Store, p: str) -> None:
    def work(t: int) -> None:
        for i in range(50):
            store.set(f"{p}{t}:{i:02}", f"{t}-{i}".encode(), 60)
            assert store.get(f"{p}{t}:{i:02}") == f"{t}-{i}".encode()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert len(store.keys(p)) == 400
    assert store.get(f"{p}7:49") == b"7-49"


# SQLite


def _child(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT)


def test_sqlite_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    store = SQLiteStore(path)
    store.set("from-parent", b"p", 60)
    assert store.get("from-child") is None  # the parent's connection is already open
    code = (
        "import sys\n"
        "from metrion_fixture.stores.sqlite import SQLiteStore\n"
        "s = SQLiteStore(sys.argv[1])\n"
        "assert s.get('from-parent') == b'p'\n"
        "s.set('from-child', b'\\x00child', 60)\n"
    )
    assert _child(code, str(path)).wait(timeout=60) == 0
    assert store.get("from-child") == b"\x00child"
    store.close()


def test_sqlite_concurrent_writer_processes(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "cache.sqlite3"  # every child races to create it
    code = (
        "import sys\n"
        "from metrion_fixture.stores.sqlite import SQLiteStore\n"
        "s = SQLiteStore(sys.argv[1])\n"
        "for i in range(50):\n"
        "    s.set(f'{sys.argv[2]}:{i:02}', sys.argv[2].encode() * 1000, 60)\n"
    )
    children = [_child(code, str(path), f"w{n}") for n in range(4)]
    assert [c.wait(timeout=60) for c in children] == [0, 0, 0, 0]
    store = SQLiteStore(path)
    assert len(store.keys("w")) == 200
    assert store.get("w3:49") == b"w3" * 1000
    store.close()


def test_sqlite_file_is_lazy_wal_and_has_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "cache.sqlite3"
    store = open_store(f"sqlite:///{path}")
    assert not path.parent.exists()  # opening does not touch the disk
    store.set("k", b"v", 60)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = [(c[1], c[2], c[3], c[5]) for c in conn.execute("PRAGMA table_info(entries)")]
    assert columns == [("key", "TEXT", 0, 1), ("value", "BLOB", 1, 0), ("expires_at", "REAL", 1, 0)]
    indexed = [
        [col[2] for col in conn.execute(f"PRAGMA index_info('{index[1]}')")]
        for index in conn.execute("PRAGMA index_list(entries)")
    ]
    assert ["expires_at"] in indexed
    conn.close()
    store.close()


def test_sqlite_purges_expired_rows_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cache.sqlite3"
    store = SQLiteStore(path)
    store.set("old", b"v", 1)
    store.set("new", b"v", 100)
    store.close()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 5)
    reopened = SQLiteStore(path)
    assert reopened.get("new") == b"v"
    rows = reopened._conn().execute("SELECT key FROM entries").fetchall()
    assert rows == [("new",)]
    reopened.close()


async def test_sqlite_aset_does_not_block_the_loop(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cache.sqlite3")
    store.set("warm", b"", 60)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock, as a busy writer would
    task = asyncio.create_task(store.aset("k", b"v", 60))
    await asyncio.sleep(0.2)  # only runs if aset waits off the loop
    assert not task.done()
    blocker.execute("COMMIT")
    await task
    assert store.get("k") == b"v"
    blocker.close()
    store.close()


def in_a_new_thread(function, *args):
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(function(*args)))
    thread.start()
    thread.join()
    return result[0]


def test_sqlite_file_deleted_under_the_process_is_recreated(tmp_path: Path) -> None:
    """Issue 14, item 6: a new thread's connection finds the schema again, and a thread whose
    connection still holds the deleted file moves to the new one within the check interval."""
    path = tmp_path / "dir" / "cache.sqlite3"
    store = SQLiteStore(path)
    store.set("old", b"v", 60)
    assert store.get("old") == b"v"
    shutil.rmtree(path.parent)
    in_a_new_thread(store.set, "new", b"w", 60)  # a new connection: a new file, with its schema
    assert in_a_new_thread(store.get, "new") == b"w"
    deadline = time.monotonic() + sqlite_store._FILE_CHECK_SECONDS + 1
    while store.get("new") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get("new") == b"w" and store.get("old") is None  # this thread left the deleted file
    store.close()


async def test_sqlite_file_deleted_is_prepared_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Preparing the new file writes (and may wait for a lock): never on the event loop's thread."""
    path = tmp_path / "cache.sqlite3"
    store = SQLiteStore(path)
    await store.aset("k", b"v", 60)
    assert await store.aget("k") == b"v"
    path.unlink()
    prepared_on: list[threading.Thread] = []
    prepare = SQLiteStore._prepare_file
    monkeypatch.setattr(
        SQLiteStore,
        "_prepare_file",
        staticmethod(lambda conn: (prepared_on.append(threading.current_thread()), prepare(conn))),
    )
    store._local.next_check = 0.0  # this thread looks at the file at its next call
    assert await store.aget("k") is None
    assert prepared_on and threading.current_thread() not in prepared_on
    store.close()


def test_sqlite_tables_dropped_come_back_after_one_failed_call(tmp_path: Path) -> None:
    """Someone empties the file (same file, no tables): one call fails, the next re-creates the schema."""
    path = tmp_path / "cache.sqlite3"
    store = SQLiteStore(path)
    store.set("k", b"v", 60)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("DROP TABLE entries")
    other.close()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        store.set("k", b"v", 60)
    store.set("k", b"w", 60)
    assert store.get("k") == b"w"
    store.close()


def test_sqlite_close_then_reuse(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "cache.sqlite3")
    store.set("k", b"v", 60)
    threading.Thread(target=store.get, args=("k",)).start()
    store.close()
    assert store.get("k") == b"v"
    store.close()


def test_prefix_upper_bound() -> None:
    assert _prefix_upper_bound("ab") == "ac"
    assert _prefix_upper_bound("a\U0010ffff") == "b"
    assert _prefix_upper_bound("a\ud7ff") == "a\ue000"
    assert _prefix_upper_bound("\U0010ffff") is None
    assert _prefix_upper_bound("") is None


# Redis


def test_redis_async_client_per_event_loop(p: str) -> None:
    store = RedisStore(REDIS_URL)

    async def use(n: int) -> redis.asyncio.Redis:
        await store.aset(f"{p}{n}", b"v", 60)
        assert await store.aget(f"{p}{n}") == b"v"
        client = await store._async()
        assert await store._async() is client
        return client

    try:
        first = asyncio.run(use(1))
        # asyncio.run closed the client before closing its loop.
        assert not any(c.is_connected for c in first.connection_pool._available_connections)
        second = asyncio.run(use(2))  # a client shared across loops would fail here
        assert first is not second
        assert len(store._aclients) == 1  # the closed loop's client was dropped
        assert store.keys(p) == [f"{p}1", f"{p}2"]
    finally:
        store.delete_prefix(p)
        store.close()


def test_redis_ttl_is_pttl(p: str) -> None:
    store = RedisStore(REDIS_URL)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        store.set(f"{p}k", b"v", 30)
        ttl = store.ttl(f"{p}k")
        assert ttl is not None and 29 < ttl <= 30
        assert abs(ttl - raw.pttl(f"{p}k") / 1000) < 0.5
        raw.persist(f"{p}k")
        assert store.ttl(f"{p}k") == float("inf")
    finally:
        store.delete_prefix(p)
        store.close()
        raw.close()


def test_unreachable_redis_raises() -> None:
    store = open_store("redis://127.0.0.1:1")  # well-formed, so opening does not raise
    with pytest.raises(redis.exceptions.ConnectionError):
        store.get("k")
    with pytest.raises(redis.exceptions.ConnectionError):
        store.set("k", b"v", 60)
    with pytest.raises(redis.exceptions.ConnectionError):
        asyncio.run(store.aget("k"))
    store.close()


def test_redis_timeouts_default_and_url_override() -> None:
    def timeouts(url: str) -> tuple[float, float, int]:
        kwargs = RedisStore(url)._sync().connection_pool.connection_kwargs
        retries = kwargs["retry"].get_retries()
        return kwargs["socket_connect_timeout"], kwargs["socket_timeout"], retries

    # No retries: redis-py's default of 3 with backoff would multiply the wait on a dead server.
    assert timeouts("redis://127.0.0.1:6379/15") == (1.0, 2.0, 0)
    url = "redis://127.0.0.1:6379/15?socket_timeout=5&socket_connect_timeout=3"
    assert timeouts(url) == (3.0, 5.0, 0)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@localhost:6379/0", "redis://user:***@localhost:6379/0"),
        ("rediss://:hunter2@cache.example.com", "rediss://:***@cache.example.com"),
        ("redis://localhost/0?password=hunter2&db=1", "redis://localhost/0?password=***&db=1"),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
        ("redis://localhost:6379", "redis://localhost:6379"),
    ],
)
def test_redis_url_masks_password(url: str, shown: str) -> None:
    assert RedisStore(url).url == shown


# open_store


def test_open_store_memory_is_shared_per_url(p: str) -> None:
    store = open_store(f"memory://{p}")
    assert isinstance(store, MemoryStore)
    assert open_store(f"memory://{p}") is store
    assert open_store(f"memory://{p}other") is not store
    assert open_store("memory://") is open_store("memory://")


def test_open_store_sqlite_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///sub/cache.sqlite3")
    absolute = open_store(f"sqlite:///{tmp_path / 'abs.sqlite3'}")
    assert isinstance(relative, SQLiteStore) and isinstance(absolute, SQLiteStore)
    assert str(tmp_path).startswith("/")  # so the URL above had four slashes
    assert absolute.path == tmp_path / "abs.sqlite3"
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the relative path was fixed at open time
    relative.set("k", b"v", 60)
    assert (tmp_path / "sub" / "cache.sqlite3").exists()
    assert not (other / "sub").exists()
    relative.close()


def test_default_store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_store_url() == f"sqlite:///{tmp_path}/.metrion_cache/cache.sqlite3"
    store = open_store(default_store_url())
    assert isinstance(store, SQLiteStore)
    assert store.path == tmp_path / ".metrion_cache" / "cache.sqlite3"


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "rediss://h:6380",
        "unix:///run/redis.sock",
        "redis://127.0.0.1:1",
    ],
)
def test_open_store_redis_does_not_connect(url: str) -> None:
    # A fresh store, not the process-wide one for this URL that earlier tests may have used.
    store = stores._new_store(url)
    assert isinstance(store, RedisStore)
    assert store._client is None


@pytest.mark.parametrize(
    "url",
    [
        "",
        "memory",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/cache.sqlite3",
        "redis://:notaport",
        "redis://localhost/notadb",
        "redis://localhost?socket_timeout=soon",
        "redis://localhost?socket_timeout=0",
        "redis://localhost?socket_connect_timeout=-1",
        "redis://localhost?socket_timeout=inf",
        "unix://",
        "ftp://example.com/cache",
        "/tmp/cache.sqlite3",
    ],
)
def test_open_store_rejects_bad_urls(url: str) -> None:
    with pytest.raises(MetrionCacheError) as info:
        open_store(url)
    message = str(info.value)
    for scheme in ("memory://", "sqlite:///", "redis://", "rediss://", "unix://", "for example"):
        assert scheme in message


def test_bad_url_error_hides_password() -> None:
    with pytest.raises(MetrionCacheError) as info:
        open_store("redis://user:hunter2@localhost:notaport")
    assert "hunter2" not in str(info.value)
    assert "user:***@" in str(info.value)


@pytest.mark.parametrize("password", ["pa#ss-7f3k", "pa/ss-7f3k", "pa?ss-7f3k", "p@ss/w#rd-7f3k"])
@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_a_password_a_url_would_cut_is_refused_without_showing_it(scheme: str, password: str) -> None:
    """Issue 14, item 7: a URL parser would cut such a password and connect elsewhere with a part of it."""
    with pytest.raises(MetrionCacheError) as info:
        open_store(f"{scheme}://user:{password}@localhost:6390/0")
    message = str(info.value)
    assert "percent-encode" in message and f"{scheme}://user:***@localhost:6390/0" in message
    for fragment in (password, password[:4], password[-6:]):
        assert fragment not in message


# -- the hit path polls its socket before a blocking read --------------------------------------------


class _Conn:
    def __init__(self, sock: object) -> None:
        self._sock = sock


def test_a_reply_waited_for_by_polling_first_and_not_once_replies_come_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waking a blocked thread costs about a loopback round trip, so a hit first polls its socket; a
    Redis whose replies do not come within the window (another host, a busy machine) stops that."""
    import select
    import socket

    from metrion_fixture.stores import redis as redis_store

    polled: list[object] = []
    real_poll = select.poll

    class CountingPoll:
        def __init__(self) -> None:
            self._poll = real_poll()
            polled.append(self)

        def register(self, *args: object) -> None:
            self._poll.register(*args)

        def poll(self, timeout: int) -> list[tuple[int, int]]:
            return self._poll.poll(timeout)

    monkeypatch.setattr(redis_store.select, "poll", CountingPoll)
    store = RedisStore("redis://127.0.0.1:1/0")
    ours, theirs = socket.socketpair()
    try:
        conn = _Conn(ours)
        theirs.sendall(b"+OK\r\n")  # a reply that is already there: found by the poll
        for _ in range(20):
            store._await_reply(conn)  # type: ignore[arg-type]
        assert len(polled) == 20 and store._poll_score == redis_store._SCORE_MAX
        ours.recv(64)

        # No reply within the window, again and again: the score drains, then reads block at once.
        misses = 0
        while store._poll_score > 0:
            store._await_reply(conn)  # type: ignore[arg-type]
            misses += 1
        assert misses == redis_store._SCORE_MAX // redis_store._MISS_COST
        before = len(polled)
        for _ in range(redis_store._RETRY_EVERY - 1):
            store._await_reply(conn)  # type: ignore[arg-type]
        assert len(polled) == before  # no poll at all while it is off

        # Every _RETRY_EVERY-th read tries the window again; a reply within it turns polling back on.
        theirs.sendall(b"+OK\r\n")
        store._await_reply(conn)  # type: ignore[arg-type]
        assert len(polled) == before + 1 and store._poll_score > 0
        store._await_reply(conn)  # type: ignore[arg-type]
        assert len(polled) == before + 2
    finally:
        ours.close()
        theirs.close()
        store.close()


def test_hits_read_right_whether_the_socket_is_polled_first_or_not(p: str) -> None:
    store = RedisStore(REDIS_URL + "?near_cache=off")
    try:
        values = {f"{p}{index}": os.urandom(index * 97 + 1) for index in range(40)}
        for key, value in values.items():
            store.set(key, value, 60)
        for score in (8, -100):  # polling on; off (40 reads, none of them a retry of the window)
            store._poll_score, store._poll_skipped = score, 0
            assert [store.get(key) for key in values] == list(values.values())
            assert store.acquire_and_get(f"{p}lock", "t", 1000, tuple(values)[:3]) == (True, list(values.values())[:3])
            store.release(f"{p}lock", "t")
    finally:
        store.delete_prefix(p)
        store.close()
