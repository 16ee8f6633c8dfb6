"""Fail open, fast: a dead, silent or flaky store costs one attempt per cool-down, never a failed request."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from collections.abc import Iterator

import anthropic
import pytest
from sdk_calls import SDKS, acall, call

import metrion_fixture
from metrion_fixture import MetrionCacheError
from metrion_fixture.core.breaker import CircuitBreaker, StoreSkipped
from metrion_fixture.stores.memory import MemoryStore

# Nothing listens on port 1. Its own URL (with /0): open_store shares a store per URL, and
# tests/test_stores.py expects the plain "redis://127.0.0.1:1" store never to have connected.
DEAD_REDIS = "redis://127.0.0.1:1/0"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SilentServer:
    """A loopback TCP server that accepts connections and never answers (a hung store)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)  # kept open, never read from or written to

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_redis_url() -> Iterator[tuple[str, SilentServer]]:
    server = SilentServer()
    yield f"redis://127.0.0.1:{server.port}/0?socket_timeout=0.3&socket_connect_timeout=0.3", server
    server.close()


class FlakyStore(MemoryStore):
    """A memory store that fails while ``broken`` is set, and counts the calls that reached it."""

    def __init__(self) -> None:
        super().__init__(f"memory://{uuid.uuid4().hex}")
        self.broken = False
        self.calls = 0

    def get(self, key: str) -> bytes | None:
        self.calls += 1
        if self.broken:
            raise ConnectionError("flaky store is down")
        return super().get(key)

    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        self.calls += 1
        if self.broken:
            raise ConnectionError("flaky store is down")
        super().set(key, value, ttl_seconds)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("sdk", SDKS)
def test_a_stopped_store_is_tried_once_per_cooldown(provider, namespace, caplog, sdk, use_async):
    """Ten requests with the store refusing connections: one store attempt, the rest skipped; all answered, one warning."""
    caplog.set_level(logging.WARNING, logger="metrion_fixture")

    async def many() -> list:
        return [await acall(sdk, provider.url) for _ in range(10)]

    with metrion_fixture.cache(DEAD_REDIS, namespace=namespace, store_cooldown=30) as session:
        answers = asyncio.run(many()) if use_async else [call(sdk, provider.url) for _ in range(10)]

    assert [a.cache for a in answers] == ["MISS"] * 10
    assert all("delivery" in a.text for a in answers)
    assert provider.call_count == 10
    assert session.breaker.attempts == 1 and session.breaker.failures == 1
    assert session.stats.store_errors == 20  # ten reads and ten writes, none served
    assert session.stats.store_skipped == 19
    warnings = [r for r in caplog.records if r.name == "metrion_fixture" and r.levelno == logging.WARNING]
    assert len(warnings) == 1


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_store_that_never_answers_costs_one_attempt(provider, namespace, silent_redis_url, use_async):
    """A store that accepts and hangs: the first read times out, the next requests skip it without connecting again."""
    url, server = silent_redis_url

    async def many() -> list:
        return [await acall("anthropic", provider.url) for _ in range(8)]

    with metrion_fixture.cache(url, namespace=namespace, store_cooldown=30) as session:
        answers = asyncio.run(many()) if use_async else [call("anthropic", provider.url) for _ in range(8)]

    assert [a.cache for a in answers] == ["MISS"] * 8
    assert provider.call_count == 8
    assert session.breaker.attempts == 1
    assert "Timeout" in type(session.breaker.last_error).__name__
    assert len(server.accepted) == 1  # one connection, made by the one attempt
    assert session.stats.store_skipped == 15


def test_without_a_cooldown_every_request_tries_the_store(provider, namespace):
    """store_cooldown=0 turns the breaker off: each read and write reaches the (dead) store."""
    with metrion_fixture.cache(DEAD_REDIS, namespace=namespace, store_cooldown=0) as session:
        for _ in range(3):
            assert call("anthropic", provider.url).cache == "MISS"
    assert session.breaker.skipped == 0 and session.stats.store_skipped == 0  # nothing skipped
    assert session.breaker.attempts >= 6 and session.stats.store_errors >= 6  # every read and write was tried


def test_the_breaker_half_opens_after_the_cooldown_and_closes_on_success(provider, namespace):
    """Fail → skipped during the cool-down → one probe after it → healthy again: stored, then a HIT."""
    session = metrion_fixture.CacheSession(f"memory://{uuid.uuid4().hex}", namespace=namespace)
    clock = FakeClock()
    session.breaker = CircuitBreaker(cooldown=5, clock=clock)
    session.store = store = FlakyStore()

    with metrion_fixture.cache(session=session):
        store.broken = True
        assert call("anthropic", provider.url).cache == "MISS"  # read fails: breaker opens
        assert store.calls == 1 and session.breaker.state == "open"

        store.broken = False  # the store recovers, but the breaker does not know yet
        clock.now += 4
        assert call("anthropic", provider.url).cache == "MISS"
        assert store.calls == 1  # skipped: no read, no write
        assert session.stats.stored == 0

        clock.now += 2  # cool-down over: half-open
        assert session.breaker.state == "half-open"
        assert call("anthropic", provider.url).cache == "MISS"  # the probe reads (absent), then writes
        assert store.calls > 1 and session.breaker.state == "closed"  # it reached the store again
        assert session.stats.stored == 1

        assert call("anthropic", provider.url).cache == "HIT"
    assert provider.call_count == 3
    assert session.stats.store_errors == 4  # the failed read, then three skipped reads and writes
    assert session.stats.store_skipped == 3


def test_a_failed_probe_opens_the_breaker_for_another_period():
    """Half-open lets exactly one call through; if it fails, calls are skipped for a new cool-down."""
    clock = FakeClock()
    breaker = CircuitBreaker(cooldown=10, clock=clock)
    assert breaker.allow()
    breaker.failed(ConnectionError("down"))
    assert not breaker.allow()
    clock.now += 10
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # others skip while it runs
    breaker.failed(ConnectionError("still down"))
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.allow() and breaker.allow() and breaker.state == "closed"
    assert (breaker.attempts, breaker.failures, breaker.skipped) == (5, 2, 3)
    assert "still down" in str(breaker.skipped_error())


def test_replay_with_a_skipped_store_is_still_the_clear_400(provider, namespace):
    """In replay mode a read the breaker skips is the 400 naming the store failure; the provider is never called."""
    with metrion_fixture.cache(DEAD_REDIS, namespace=namespace, mode="replay", store_cooldown=30) as session:
        errors = []
        for _ in range(3):
            with pytest.raises(anthropic.APIStatusError) as raised:
                call("anthropic", provider.url)
            errors.append(raised.value)

    assert [e.status_code for e in errors] == [400, 400, 400]
    assert all("store could not be read" in str(e) and "replay" in str(e) for e in errors)
    assert "ConnectionError" in str(errors[0])
    assert StoreSkipped.__name__ in str(errors[1]) and "ConnectionError" in str(errors[1])
    assert provider.call_count == 0
    assert session.breaker.attempts == 1 and session.stats.errors == 3


def test_a_bad_cooldown_is_refused_at_once():
    """A negative or non-numeric cool-down raises MetrionCacheError when the session is made."""
    for bad in (-1, "soon", True):
        with pytest.raises(MetrionCacheError, match="cool-down"):
            metrion_fixture.CacheSession("memory://", store_cooldown=bad)
