"""Load: 10,000 mixed requests (hits, misses, streams) from 32 asyncio tasks and 8 threads through real Redis.

Every answer must belong to its own request, nothing may fail, and the counters must add up.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx2
import pytest

from metrion_fixture import CacheSession
from metrion_fixture.formats.base import sse_events
from metrion_fixture.stores import open_store
from metrion_fixture.transports.httpx2 import AsyncCacheTransport, CacheTransport

pytestmark = pytest.mark.slow  # run by .ci/run; skip in a quick local loop with -m 'not slow'

TASKS, TASK_REQUESTS = 32, 190  # 6,080 from asyncio tasks
THREADS, THREAD_REQUESTS = 8, 500  # 4,000 from threads
QUESTIONS = 1500
URL = "https://provider.test/v1/messages"


def answer_text(question: str) -> str:
    return f"answer to <{question}>"


class EchoProvider:
    """Answers each question with a text naming it, as JSON or as an Anthropic event stream; counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        with self._lock:
            self.calls += 1
        body = json.loads(request.content)
        text = answer_text(body["messages"][0]["content"])
        usage = {"input_tokens": 3, "output_tokens": 4}
        if not body.get("stream"):
            message = {
                "id": "msg_load",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": usage,
            }
            return httpx2.Response(200, json=message)
        start = {
            "type": "message_start",
            "message": {"id": "msg_load", "type": "message", "role": "assistant", "model": body["model"], "content": []}
            | {"stop_reason": None, "stop_sequence": None, "usage": usage},
        }
        events = [
            ("message_start", start),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            *(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                )
                for piece in (text[:10], text[10:])
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}),
            ("message_stop", {"type": "message_stop"}),
        ]
        chunks = [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))

    async def handle_async(self, request: httpx2.Request) -> httpx2.Response:
        response = self(request)
        if response.headers.get("content-type") != "text/event-stream":
            return response
        chunks = list(response.stream)

        async def events():
            for chunk in chunks:
                yield chunk

        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=events())


def text_of(content: bytes, stream: bool) -> str:
    if not stream:
        return "".join(block["text"] for block in json.loads(content)["content"])
    pieces = []
    for event, data in sse_events([content]):
        if event == "content_block_delta":
            pieces.append(json.loads(data)["delta"].get("text", ""))
    return "".join(pieces)


def plan(seed: int, count: int) -> list[tuple[str, bool]]:
    rng = random.Random(seed)
    return [(f"q{rng.randrange(QUESTIONS)}", rng.random() < 0.4) for _ in range(count)]


def body_for(question: str, stream: bool) -> dict:
    return {
        "model": "claude-load",
        "max_tokens": 10,
        "stream": stream,
        "messages": [{"role": "user", "content": question}],
    }


def check(question: str, stream: bool, status: int, tag: str, content: bytes) -> str:
    assert status == 200, (question, stream, status, content[:200])
    assert text_of(content, stream) == answer_text(question), (question, stream, tag)
    return tag


def run_thread(session: CacheSession, provider: EchoProvider, seed: int, tags: list[str]) -> None:
    with httpx2.Client(transport=CacheTransport(httpx2.MockTransport(provider), session=session)) as client:
        for question, stream in plan(seed, THREAD_REQUESTS):
            with client.stream("POST", URL, json=body_for(question, stream)) as response:
                content = response.read()
            tags.append(check(question, stream, response.status_code, response.headers["x-metrion-cache"], content))


async def run_tasks(session: CacheSession, provider: EchoProvider, tags: list[str]) -> None:
    transport = AsyncCacheTransport(httpx2.MockTransport(provider.handle_async), session=session)
    async with httpx2.AsyncClient(transport=transport, limits=httpx2.Limits(max_connections=None)) as client:

        async def task(seed: int) -> None:
            for question, stream in plan(seed, TASK_REQUESTS):
                async with client.stream("POST", URL, json=body_for(question, stream)) as response:
                    content = await response.aread()
                tags.append(check(question, stream, response.status_code, response.headers["x-metrion-cache"], content))

        await asyncio.gather(*(task(1000 + n) for n in range(TASKS)))


def test_ten_thousand_mixed_requests_through_redis(redis_url, namespace):
    """10,080 requests from 32 tasks and 8 threads at once: each gets its own answer, none fails, the stats add up."""
    # What is checked here is correctness under concurrency, with no store error at all. The default
    # timeouts (1 s to connect, 2 s to answer) are for a store that is down; on a CPU-starved CI machine
    # a healthy Redis can take longer, and that would be counted as a store error.
    patient_url = f"{redis_url}{'&' if '?' in redis_url else '?'}socket_connect_timeout=15&socket_timeout=15"
    session = CacheSession(patient_url, namespace=namespace)
    provider = EchoProvider()
    tags: list[str] = []
    errors: list[BaseException] = []

    def guarded(target, *args) -> None:
        try:
            target(*args)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=guarded, args=(run_thread, session, provider, n, tags)) for n in range(THREADS)]
    workers.append(threading.Thread(target=guarded, args=(lambda: asyncio.run(run_tasks(session, provider, tags)),)))
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
        assert errors == [], errors[:3]
        total = TASKS * TASK_REQUESTS + THREADS * THREAD_REQUESTS
        assert len(tags) == total >= 10_000
        stats = session.stats
        assert (stats.errors, stats.store_errors, stats.bypassed) == (0, 0, 0)
        assert stats.hits + stats.misses == stats.requests == total
        assert tags.count("HIT") == stats.hits and tags.count("MISS") == stats.misses
        assert stats.misses == provider.calls == stats.stored  # every provider call was needed, and stored
        assert stats.hits > total // 2 and stats.misses > 1000
        stored = [key for key in open_store(redis_url).keys(f"{namespace}:") if not key.endswith(":lock")]
        assert len(stored) == stats.stored
    finally:
        open_store(redis_url).delete_prefix(f"{namespace}:")
