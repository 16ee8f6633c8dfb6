"""Store round trips before a miss reaches the provider: the lock and the look again are one.

A miss looks up its key in both modes, then takes the single-flight lock and looks again (another
caller may have stored the answer in between). The look again is read in the same round trip as
the lock (``Store.acquire_and_get``: on Redis one pipeline, whose GETs run after the SET), so a
miss makes three store calls before the provider, not five; the answers are the same.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from conftest import REDIS_URL

from metrion_fixture import CacheSession
from metrion_fixture.stores import open_store
from metrion_fixture.stores.base import Store
from metrion_fixture.transports.httpx2 import AsyncCacheTransport, CacheTransport

BODY = b'{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"2+2?"}]}'
ANSWER = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text",'
    b'"text":"4"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":1}}'
)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = {"memory": "memory://rt", "sqlite": f"sqlite:///{tmp_path / 'c.sqlite3'}", "redis": REDIS_URL}
    opened = open_store(url[request.param])
    yield opened
    opened.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_acquire_and_get_reads_the_keys_once_the_lock_is_taken(store: Store, blocking: bool) -> None:
    p = f"mf-test:{uuid.uuid4().hex}:"

    def call(token: str, keys: tuple[str, ...]) -> tuple[bool, list[bytes | None]]:
        if blocking:
            return store.acquire_and_get(f"{p}lock", token, 5000, keys)
        return asyncio.run(store.aacquire_and_get(f"{p}lock", token, 5000, keys))

    try:
        store.set(f"{p}a", b"A", 60)
        assert call("t1", (f"{p}a", f"{p}b")) == (True, [b"A", None])
        assert store.locked(f"{p}lock")
        assert call("t2", (f"{p}a",)) == (False, [])  # held by t1: not taken, nothing read
        store.release(f"{p}lock", "t2")  # not its holder: the lock stays
        assert store.locked(f"{p}lock")
        store.release(f"{p}lock", "t1")
        assert not store.locked(f"{p}lock")
    finally:
        store.delete_prefix(p)


class CountingStore(Store):
    """A store that notes each call a request makes (a round trip each on a networked store)."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url, self.calls = inner, inner.url, []  # type: list[str]

    def get(self, key: str) -> bytes | None:
        self.calls.append("get")
        return self.inner.get(key)

    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        self.calls.append("set")
        self.inner.set(key, value, ttl_seconds)

    def acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        self.calls.append("acquire")
        return self.inner.acquire(key, token, ttl_ms)

    def acquire_and_get(
        self, key: str, token: str, ttl_ms: int, keys: tuple[str, ...]
    ) -> tuple[bool, list[bytes | None]]:
        self.calls.append("acquire_and_get")
        return self.inner.acquire_and_get(key, token, ttl_ms, keys)

    async def aacquire_and_get(
        self, key: str, token: str, ttl_ms: int, keys: tuple[str, ...]
    ) -> tuple[bool, list[bytes | None]]:
        self.calls.append("acquire_and_get")
        return await self.inner.aacquire_and_get(key, token, ttl_ms, keys)

    def release(self, key: str, token: str) -> None:
        self.calls.append("release")
        self.inner.release(key, token)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        return self.inner.delete_prefix(prefix)

    def keys(self, prefix: str) -> list[str]:
        return self.inner.keys(prefix)

    def ttl(self, key: str) -> float | None:
        return self.inner.ttl(key)


def _provider(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, headers={"content-type": "application/json"}, content=ANSWER)


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_a_miss_makes_three_store_calls_before_the_provider(blocking: bool) -> None:
    session = CacheSession(REDIS_URL, namespace=f"rt-{uuid.uuid4().hex[:8]}")
    counting = session.store = CountingStore(session.store)
    provider_calls: list[list[str]] = []

    def provider(request: httpx2.Request) -> httpx2.Response:
        provider_calls.append(list(counting.calls))  # what the store saw before the provider was asked
        return _provider(request)

    async def ask_async() -> int:
        transport = AsyncCacheTransport(httpx2.MockTransport(provider), session=session)
        async with httpx2.AsyncClient(transport=transport) as client:
            response = await client.post("https://api.anthropic.com/v1/messages", content=BODY)
        return response.status_code

    try:
        if blocking:
            with httpx2.Client(transport=CacheTransport(httpx2.MockTransport(provider), session=session)) as client:
                status = client.post("https://api.anthropic.com/v1/messages", content=BODY).status_code
        else:
            status = asyncio.run(ask_async())
        assert status == 200 and session.stats.misses == 1 and session.stats.stored == 1
        # Both modes looked up, then the lock taken with the look again in the same call.
        assert provider_calls == [["get", "get", "acquire_and_get"]]
        assert counting.calls == ["get", "get", "acquire_and_get", "set", "release"]
    finally:
        session.clear()
