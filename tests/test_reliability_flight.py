"""Single flight: concurrent identical misses make one provider call; the others wait and get its entry.

A leader that fails or dies releases the waiters, a waiter that waits too long asks
the provider itself, and requests for different keys never wait on each other.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from metrion_fixture import CacheSession
from metrion_fixture.stores import open_store
from metrion_fixture.testing.provider import SimulatedProvider
from metrion_fixture.transports.httpx2 import AsyncCacheTransport, CacheTransport

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "one question"}]}
ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "the answer"}]}
SSE = [
    # A full message_start (id, model, usage) so the stream also answers a non-streamed duplicate.
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
    b'"role":"assistant","model":"claude-test","content":[],"stop_reason":null,"stop_sequence":null,'
    b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"the answer"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":2}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]
CONCURRENCY = 50


class SlowProvider:
    """A MockTransport provider that takes a moment to answer, so identical requests overlap, and counts calls."""

    def __init__(self, decide: Callable[[int], str] = lambda n: "ok", pause: float = 0.2) -> None:
        self.calls = 0
        self.pause = pause
        self.decide = decide  # call number -> "ok", "fail" (HTTP 500) or "raise" (a connection error)
        self._lock = threading.Lock()

    def _next(self, request: httpx2.Request) -> tuple[str, bool]:
        with self._lock:
            self.calls += 1
            return self.decide(self.calls), json.loads(request.content).get("stream", False)

    def _response(self, verdict: str, stream: bool, request: httpx2.Request) -> httpx2.Response:
        if verdict == "raise":
            raise httpx2.ConnectError("provider went away", request=request)
        if verdict == "fail":
            return httpx2.Response(500, json={"type": "error", "error": {"type": "api_error", "message": "boom"}})
        if stream:
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=iter(SSE))
        return httpx2.Response(200, json=ANSWER)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        verdict, stream = self._next(request)
        time.sleep(self.pause)
        return self._response(verdict, stream, request)

    async def handle_async(self, request: httpx2.Request) -> httpx2.Response:
        verdict, stream = self._next(request)
        await asyncio.sleep(self.pause)
        return self._response(verdict, stream, request)


@pytest.fixture
def flight_session(store_url: str, namespace: str) -> CacheSession:
    return CacheSession(store_url, namespace=namespace)


def sync_request(session: CacheSession, provider: SlowProvider, body: dict = BODY) -> tuple[int, str, bytes]:
    with httpx2.Client(transport=CacheTransport(httpx2.MockTransport(provider), session=session)) as client:
        response = client.post("https://provider.test/v1/messages", json=body)
        return response.status_code, response.headers["x-metrion-cache"], response.content


def run_threads(count: int, target: Callable[[int], object]) -> list:
    results: list = [None] * count
    start = threading.Barrier(count)

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = target(index)
        except Exception as error:  # noqa: BLE001 - reported in the results
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def text_of(content: bytes, stream: bool) -> str:
    if stream:
        return "the answer" if b"message_stop" in content and b"the answer" in content else content.decode()
    return json.loads(content)["content"][0]["text"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_50_threads_make_one_provider_call(flight_session, stream):
    """50 threads ask the same thing at once: one MISS reaches the provider, 49 HITs from its entry."""
    provider = SlowProvider()
    body = {**BODY, "stream": stream}
    results = run_threads(CONCURRENCY, lambda _: sync_request(flight_session, provider, body))
    assert provider.calls == 1
    assert sorted(tag for _, tag, _ in results) == ["HIT"] * (CONCURRENCY - 1) + ["MISS"]
    assert {text_of(content, stream) for _, _, content in results} == {"the answer"}
    assert flight_session.stats.stored == 1


async def _async_requests(session: CacheSession, provider: SlowProvider, count: int) -> list:
    transport = AsyncCacheTransport(httpx2.MockTransport(provider.handle_async), session=session)
    async with httpx2.AsyncClient(transport=transport) as client:

        async def one() -> tuple[int, str, bytes]:
            response = await client.post("https://provider.test/v1/messages", json=BODY)
            return response.status_code, response.headers["x-metrion-cache"], response.content

        return await asyncio.gather(*(one() for _ in range(count)))


def test_50_asyncio_tasks_make_one_provider_call(flight_session):
    """50 tasks in one event loop: one provider call, the waiting tasks do not block the loop, all get the answer."""
    provider = SlowProvider()
    results = asyncio.run(_async_requests(flight_session, provider, CONCURRENCY))
    assert provider.calls == 1
    assert sorted(tag for _, tag, _ in results) == ["HIT"] * (CONCURRENCY - 1) + ["MISS"]
    assert {json.loads(content)["content"][0]["text"] for _, _, content in results} == {"the answer"}


@pytest.mark.parametrize("failure", ["fail", "raise"])
def test_a_failing_leader_releases_the_waiters(flight_session, failure):
    """The first call fails (HTTP 500, or the connection breaks): the waiters all learn it at once and all go
    to the provider together (issue 14: one waiter after another would make the last wait 20 failures)."""
    provider = SlowProvider(decide=lambda n: failure if n == 1 else "ok")
    started = time.monotonic()
    results = run_threads(20, lambda _: sync_request(flight_session, provider))
    elapsed = time.monotonic() - started
    assert provider.calls == 20
    assert elapsed < 4 * provider.pause + 1.5, elapsed  # the leader's call, then every waiter's at once
    failed = [r for r in results if isinstance(r, Exception) or r[0] != 200]
    assert len(failed) == 1
    if failure == "raise":
        assert isinstance(failed[0], httpx2.ConnectError)
    else:
        assert failed[0][0] == 500
    good = [r for r in results if not isinstance(r, Exception) and r[0] == 200]
    assert sorted(tag for _, tag, _ in good) == ["MISS"] * 19


def test_a_waiter_that_waits_too_long_asks_the_provider_itself(namespace):
    """With a leader stuck, a waiter gives up at its deadline and calls the provider; nothing fails."""
    session = CacheSession("memory://flight-timeout", namespace=namespace, single_flight_wait=0.3)
    entered, gate = threading.Event(), threading.Event()

    def handler(request: httpx2.Request) -> httpx2.Response:
        if not entered.is_set():
            entered.set()
            assert gate.wait(timeout=30)  # the leader is stuck until the waiter got its answer
        return httpx2.Response(200, json=ANSWER)

    calls: list[str] = []
    counting = lambda request: (calls.append("call"), handler(request))[1]
    leader = threading.Thread(target=lambda: calls.append(sync_request(session, counting)[1]))
    leader.start()
    assert entered.wait(timeout=30)
    status, tag, _ = sync_request(session, counting)
    gate.set()
    leader.join(timeout=30)
    assert (status, tag) == (200, "MISS")
    assert calls.count("call") == 2


def test_different_keys_never_wait_on_each_other(flight_session):
    """Ten different questions at once all reach the provider together (a barrier they must all reach)."""
    barrier = threading.Barrier(10, timeout=20)

    def handler(request: httpx2.Request) -> httpx2.Response:
        barrier.wait()  # breaks (and the test fails) if any request waited for another key
        return httpx2.Response(200, json=ANSWER)

    bodies = [{**BODY, "messages": [{"role": "user", "content": f"question {n}"}]} for n in range(10)]
    results = run_threads(10, lambda n: sync_request(flight_session, handler, bodies[n]))
    assert [r[:2] for r in results] == [(200, "MISS")] * 10


# A process with 12 threads that all ask the same question once the parent says go.
CHILD = """
import json, sys, threading
import httpx2
from metrion_fixture import CacheSession
from metrion_fixture.transports.httpx2 import CacheTransport

url, namespace, base_url = sys.argv[1:4]
session = CacheSession(url, namespace=namespace)
body = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "cross-process question"}]}
results = []

def one():
    with httpx2.Client(transport=CacheTransport(session=session)) as client:
        r = client.post(base_url + "/v1/messages", json=body, headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
        results.append([r.status_code, r.headers["x-metrion-cache"], r.json()["content"][0]["text"]])

print("READY", flush=True)
sys.stdin.readline()
threads = [threading.Thread(target=one) for _ in range(12)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results), flush=True)
"""


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[str]:
    url = (
        f"sqlite:///{tmp_path / 'flight.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("redis_url")
    )
    yield url
    open_store(url).delete_prefix(f"{namespace}:")


def test_4_processes_make_one_provider_call(shared_url, namespace):
    """4 processes × 12 threads ask the same question at once through a shared store: one provider call."""
    with SimulatedProvider(latency=1.0) as provider:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, shared_url, namespace, provider.url],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        try:
            for child in children:
                assert child.stdout.readline().strip() == "READY", child.stderr.read()
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            outputs = [child.communicate(timeout=120) for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
        results = [row for out, err in outputs for row in json.loads(out.strip().splitlines()[-1])]
        assert provider.call_count == 1
    assert len(results) == 48
    assert sorted(tag for _, tag, _ in results) == ["HIT"] * 47 + ["MISS"]
    assert len({text for _, _, text in results}) == 1


def test_single_flight_can_be_turned_off(namespace):
    """single_flight_wait=0: identical concurrent requests each call the provider, as before."""
    session = CacheSession("memory://flight-off", namespace=namespace, single_flight_wait=0)
    barrier = threading.Barrier(5, timeout=20)

    def handler(request: httpx2.Request) -> httpx2.Response:
        barrier.wait()  # all five must be at the provider together
        return httpx2.Response(200, json=ANSWER)

    results = run_threads(5, lambda _: sync_request(session, handler))
    assert [r[:2] for r in results] == [(200, "MISS")] * 5


def drop_a_stream_unread(session: CacheSession, provider: SlowProvider, use_async: bool) -> None:
    """Open a recorded stream and drop the response: never read, never closed. (An iterator dropped
    half-way closes the response itself, in httpx: that case ends the stream already.)"""
    body = {**BODY, "stream": True}
    if not use_async:
        client = httpx2.Client(transport=CacheTransport(httpx2.MockTransport(provider), session=session))
        response = client.send(
            client.build_request("POST", "https://provider.test/v1/messages", json=body), stream=True
        )
        assert response.headers["x-metrion-cache"] == "MISS"
        del response
        gc.collect()
        return

    async def sse() -> AsyncIterator[bytes]:
        for event in SSE:
            yield event

    async def streaming_provider(request: httpx2.Request) -> httpx2.Response:
        provider.calls += 1
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=sse())

    async def dropped() -> None:
        transport = AsyncCacheTransport(httpx2.MockTransport(streaming_provider), session=session)
        client = httpx2.AsyncClient(transport=transport)
        request = client.build_request("POST", "https://provider.test/v1/messages", json=body)
        response = await client.send(request, stream=True)
        assert response.headers["x-metrion-cache"] == "MISS"
        del response

    asyncio.run(dropped())
    gc.collect()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_stream_dropped_unread_gives_its_lock_back(store_url, namespace, use_async):
    """A recorded stream dropped unread (not closed) ends when it is garbage-collected: the next identical
    request does not wait for the lock to expire (single_flight_wait, 30 s here), and nothing was stored."""
    session = CacheSession(store_url, namespace=namespace)
    provider = SlowProvider(pause=0)
    drop_a_stream_unread(session, provider, use_async)
    started = time.monotonic()
    # From another thread: a thread never waits for a lock it holds itself.
    ((status, tag, content),) = run_threads(1, lambda _: sync_request(session, provider, {**BODY, "stream": True}))
    assert time.monotonic() - started < 5, "the dropped stream's single-flight lock was not given back"
    assert (status, tag, text_of(content, True)) == (200, "MISS", "the answer") and provider.calls == 2
