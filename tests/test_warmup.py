"""Bulk warm-up (issue 15): the entries a run will read, fetched into the near cache in one round trip.

``RedisStore.warm`` reads keys ahead under the near cache's rules (tracking set up first, a ticket
taken before the read, nothing kept if anything changed meanwhile), so a warmed entry is then
answered from memory and still never outlives a change. ``runtime/warmup.py`` keeps, per namespace,
the keys each test read the last time it ran. The plugin's side is in ``test_pytest_plugin.py``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from test_near_cache import count_round_trips, eventually

from metrion_fixture.core.engine import storage_key
from metrion_fixture.runtime import warmup
from metrion_fixture.stores import open_store
from metrion_fixture.stores.redis import RedisStore


@pytest.fixture
def prefix() -> str:
    return f"warm-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[RedisStore]:
    store = RedisStore(redis_url)
    yield store
    store.delete_prefix(prefix)
    store.close()


def test_warmed_entries_are_read_from_memory(
    store: RedisStore, other: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [f"{prefix}{n}" for n in range(50)]
    for key in keys[:40]:
        other.set(key, key.encode(), ex=60)
    sent = count_round_trips(store, monkeypatch)
    assert store.warm(keys) == 40  # the ten absent keys are not kept
    warm_trips = len(sent)
    assert [store.get(key) for key in keys[:40]] == [key.encode() for key in keys[:40]]
    assert len(sent) == warm_trips, "a warmed entry made a round trip"
    # All 50 were read in one pipeline (after a first answer from Redis, which tracking waits for).
    assert [len(commands) for commands in sent] == [1, 100]
    assert store.get(keys[45]) is None and len(sent) == warm_trips + 1  # an absent key is still asked for


def test_a_namespace_warmed_while_tracking_is_up_for_another_is_kept(
    store: RedisStore, other: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracking set up for another prefix first (a notebook that read elsewhere): the warm-up asks for its
    own prefix and waits for Redis to say yes, rather than warming nothing."""
    elsewhere, key = f"{prefix[:-1]}-else:k", f"{prefix}k"
    other.set(elsewhere, b"E", ex=60)
    other.set(key, b"K", ex=60)
    try:
        assert store.get(elsewhere) == store.get(elsewhere) == b"E"
        assert store._near is not None and store._near.tracking
        assert store.warm([key]) == 1
        sent = count_round_trips(store, monkeypatch)
        assert store.get(key) == b"K" and sent == []
        other.set(key, b"K2", ex=60)
        assert eventually(lambda: store.get(key) == b"K2"), "the new prefix is tracked"
    finally:
        other.delete(elsewhere)


def test_each_namespace_warmed_is_tracked(
    store: RedisStore, other: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys of two namespaces (a test whose marker names another): each is tracked before it is read, one
    round trip each, so a change under either is seen; a key outside any namespace is not kept."""
    second = f"{prefix[:-1]}-2:"
    keys = [f"{prefix}a", f"{second}b", f"{prefix}c", "no-namespace"]
    for key in keys:
        other.set(key, b"old", ex=60)
    try:
        sent = count_round_trips(store, monkeypatch)
        assert store.warm(keys) == 3
        assert sorted(len(commands) for commands in sent) == [1, 2, 4]  # the first answer, then one per namespace
        other.set(f"{second}b", b"new", ex=60)
        assert eventually(lambda: store.get(f"{second}b") == b"new")
        assert store.get(f"{prefix}a") == b"old"
    finally:
        other.delete(f"{second}b", "no-namespace")


def test_a_warmed_entry_never_outlives_a_change(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    changed, deleted, kept = f"{prefix}changed", f"{prefix}deleted", f"{prefix}kept"
    for key in (changed, deleted, kept):
        other.set(key, b"old", ex=60)
    assert store.warm([changed, deleted, kept]) == 3
    other.set(changed, b"new", ex=60)
    other.delete(deleted)
    assert eventually(lambda: store.get(changed) == b"new")
    assert eventually(lambda: store.get(deleted) is None)
    assert store.get(kept) == b"old"


def test_a_change_while_the_warm_up_reads_keeps_nothing(
    store: RedisStore, other: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ticket is taken before the read: an invalidation that arrives before the values are kept
    (here handed to the handler as parsed, at the worst moment) means none of them is kept."""
    a, b = f"{prefix}a", f"{prefix}b"
    other.set(a, b"A", ex=60)
    other.set(b, b"B", ex=60)
    store.get(a)  # Redis has answered: the warm-up sets tracking up at once
    pipelined = store._pipelined

    def read_then_change(*commands: tuple[Any, ...], **options: Any) -> list[Any]:
        replies = pipelined(*commands, **options)
        if len(commands) > 2:  # the warm-up's read
            assert store._near is not None
            store._near._invalidated([b"invalidate", [a.encode()]])
        return replies

    monkeypatch.setattr(store, "_pipelined", read_then_change)
    assert store.warm([a, b]) == 0
    sent = count_round_trips(store, monkeypatch)
    assert store.get(b) == b"B" and len(sent) == 1, "a value read during a change was kept"


def test_the_warm_up_keeps_the_keys_expiry(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    key = f"{prefix}short"
    other.set(key, b"v", px=300)
    assert store.warm([key]) == 1
    assert store.get(key) == b"v"
    time.sleep(0.4)
    assert store.get(key) is None


def test_stores_without_a_near_cache_warm_nothing(redis_url: str, tmp_path: Path, prefix: str) -> None:
    off = RedisStore(redis_url + ("&" if "?" in redis_url else "?") + "near_cache=off")
    sqlite = open_store(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    memory = open_store(f"memory://{uuid.uuid4().hex}")
    try:
        for each in (off, sqlite, memory):
            each.set(f"{prefix}k", b"v", 60)
            assert each.warm([f"{prefix}k"]) == 0
            assert each.get_many([f"{prefix}k", f"{prefix}absent"]) == [b"v", None]
    finally:
        off.delete_prefix(prefix)
        off.close()


def test_a_store_that_is_down_fails_the_warm_up_and_nothing_else() -> None:
    down = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(redis.ConnectionError):
        down.warm(["ns:k"])
    with pytest.raises(redis.ConnectionError):
        down.get("ns:k")  # reads go on as they would have: a GET each
    down.close()


# --- the index: what each test read last time --------------------------------------------------


@dataclass
class Call:
    key: str
    status: str = "HIT"
    stream: bool = False
    wire_format: str = "anthropic"


def test_a_tests_keys_are_those_its_requests_looked_up() -> None:
    calls = [Call("a"), Call("b", "MISS", stream=True), Call("a"), Call("c", "ERROR"), Call("", "BYPASS")]
    assert warmup.keys_read("ns", calls) == [
        storage_key("ns", "anthropic", "json", "a"),
        storage_key("ns", "anthropic", "stream", "b"),
    ]


def test_the_index_keeps_the_latest_run_of_each_test(
    store: RedisStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    namespace = prefix.rstrip(":")
    try:
        assert warmup.read_index(store, namespace) == {}
        warmup.update_index(store, namespace, {"t::a": ["k1"], "t::b": ["k2"], "t::c": ["k3"]}, 60)
        warmup.update_index(store, namespace, {"t::a": ["k4", "k5"], "t::b": []}, 60)  # t::b read nothing now
        assert warmup.read_index(store, namespace) == {"t::c": ["k3"], "t::a": ["k4", "k5"]}
        monkeypatch.setattr(warmup, "MAX_TESTS", 2)
        warmup.update_index(store, namespace, {"t::d": ["k6"]}, 60)
        assert warmup.read_index(store, namespace) == {"t::a": ["k4", "k5"], "t::d": ["k6"]}  # least recent dropped
        assert 0 < store.ttl(warmup.index_key(namespace)) <= 60  # type: ignore[operator]
    finally:
        store.delete(warmup.index_key(namespace))


@pytest.mark.parametrize("value", [b"not json", b"[1, 2]", b'{"t::a": "k1", "t::b": ["k2", 3], "4": null}'])
def test_a_damaged_index_is_read_as_what_it_still_says(store: RedisStore, prefix: str, value: bytes) -> None:
    namespace = prefix.rstrip(":")
    store.set(warmup.index_key(namespace), value, 60)
    try:
        index = warmup.read_index(store, namespace)
        assert index == ({"t::b": ["k2"]} if value.startswith(b"{") else {})
        warmup.update_index(store, namespace, {"t::c": ["k3"]}, 60)  # and it is repaired by the next run
        assert warmup.read_index(store, namespace) == {**index, "t::c": ["k3"]}
    finally:
        store.delete(warmup.index_key(namespace))


def test_warm_fetches_the_keys_of_the_tests_asked_for(store: RedisStore, other: redis.Redis, prefix: str) -> None:
    for name in ("a", "b", "c"):
        other.set(f"{prefix}{name}", name.encode(), ex=60)
    index = {"t::1": [f"{prefix}a", f"{prefix}b"], "t::2": [f"{prefix}b"], "t::3": [f"{prefix}c"]}
    assert warmup.warm(store, index, ["t::1", "t::2", "t::new"]) == 2
    assert store._near is not None
    assert sorted(store._near._values._values) == [f"{prefix}a", f"{prefix}b"]
    assert warmup.warm(store, index, ["t::new"]) == 0


def test_a_warm_up_waiting_on_redis_never_holds_up_another_thread_s_event_loop(tmp_path: Path) -> None:
    """The warm-up waits (up to PONG_WITHIN) for Redis to start tracking a new prefix: never under the lock
    every read takes, so an event loop reading meanwhile goes on (tracking's promise)."""
    import asyncio
    import signal
    import threading

    from test_redis_multiplex import OwnRedis

    server = OwnRedis(tmp_path)
    server.start()
    assert server.process is not None
    store = RedisStore(f"redis://127.0.0.1:{server.port}/15")
    client = redis.Redis(port=server.port, db=15)
    client.set("warm-a:k", b"a")
    try:
        assert eventually(lambda: store.get("warm-a:k") == b"a" and store._near is not None and store._near.tracking)
        server.process.send_signal(signal.SIGSTOP)  # Redis stops answering: CLIENT TRACKING for warm-b: too
        try:
            warming = threading.Thread(target=lambda: store.warm(["warm-b:k"]))
            warming.start()
            time.sleep(0.1)  # the warm-up is waiting for Redis's answer now

            async def longest_gap() -> float:
                longest, last = 0.0, time.monotonic()

                async def beat() -> None:
                    nonlocal longest, last
                    while True:
                        await asyncio.sleep(0.01)
                        now = time.monotonic()
                        longest, last = max(longest, now - last), now

                beating = asyncio.ensure_future(beat())
                await asyncio.sleep(0.05)
                try:
                    await asyncio.wait_for(store.aget("warm-a:k"), 5)  # near.begin() on this loop's thread
                except Exception:  # noqa: BLE001, S110 - Redis is frozen: only the loop's freedom is asserted
                    pass
                beating.cancel()
                return longest

            longest = asyncio.run(longest_gap())
        finally:
            server.process.send_signal(signal.SIGCONT)
        warming.join(10)
        # 10 ms beats; the lock held through the wait stood the loop still for ~3 s. 1 s is generous.
        assert longest < 1.0, f"the event loop stood still for {longest:.2f} s"
    finally:
        client.close()
        store.close()
        server.stop()
