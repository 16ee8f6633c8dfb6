"""3. Streams: a 2,000-event answer replayed from the cache through the SDK's streaming iterator.

The baseline is the same SDK iterator parsing the same bytes, chunk for chunk, from a
``MockTransport``. Time to first chunk is from the call to the first event the SDK yields.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx2
from common import MESSAGES, MODEL, Context, Row, interleaved, ms, p50, percentile, sdk

from metrion_fixture.runtime.session import CacheSession
from metrion_fixture.transports.httpx2 import CacheTransport

EVENTS = 2000


def _event(name: str, **data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, separators=(',', ':'))}\n\n".encode()


def stream_chunks(events: int = EVENTS) -> list[bytes]:
    """An Anthropic Messages stream of exactly ``events`` events, one per chunk."""
    message = {"id": "msg_bench", "type": "message", "role": "assistant", "model": MODEL, "content": []}
    usage = {"input_tokens": 42, "output_tokens": 1}
    head = [
        _event("message_start", message={**message, "stop_reason": None, "stop_sequence": None, "usage": usage}),
        _event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    ]
    tail = [
        _event("content_block_stop", index=0),
        _event("message_delta", delta={"stop_reason": "end_turn", "stop_sequence": None}, usage={"output_tokens": 9}),
        _event("message_stop"),
    ]
    deltas = [
        _event("content_block_delta", index=0, delta={"type": "text_delta", "text": f" word{index}"})
        for index in range(events - len(head) - len(tail))
    ]
    return head + deltas + tail


def stream_transport(chunks: list[bytes]) -> httpx2.MockTransport:
    headers = [("content-type", "text/event-stream; charset=utf-8"), ("request-id", "req_0123456789abcdef01234567")]
    return httpx2.MockTransport(lambda request: httpx2.Response(200, headers=headers, stream=_Chunks(chunks)))


class _Chunks(httpx2.SyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    def __iter__(self) -> Any:
        return iter(self._chunks)


def consume(client: Any, first: list[float]) -> int:
    """Read a whole streamed answer through the SDK iterator; note the time to its first event."""
    started = time.perf_counter()
    count = 0
    stream = client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES, stream=True)
    with stream:
        for _ in stream:
            if not count:
                first.append(time.perf_counter() - started)
            count += 1
    return count


def measure(ctx: Context, store_urls: dict[str, str]) -> tuple[list[Row], dict]:
    chunks = stream_chunks(EVENTS if not ctx.smoke else 300)  # past the lazy-cutting threshold
    sessions = {name: CacheSession(url, namespace=f"bench-{uuid.uuid4().hex[:8]}") for name, url in store_urls.items()}
    clients = {"floor": sdk(stream_transport(chunks))}
    for name, session in sessions.items():
        clients[name] = sdk(CacheTransport(stream_transport(chunks), session=session))
    firsts: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for name, client in clients.items():
            assert consume(client, []) == len(chunks), name  # the cache's first call records the stream
        paths = {name: (lambda c=client, f=firsts[name]: consume(c, f)) for name, client in clients.items()}
        samples = interleaved(paths, ctx.count(60, 4), rounds=ctx.count(6, 2), warmup=ctx.count(3, 1))
        for name, session in sessions.items():
            assert session.stats.misses == 1 and session.stats.hits > 0, (name, session.stats)
    finally:
        for session in sessions.values():
            session.clear()
    raw = {
        name: {
            "p50_ms": ms(p50(values)),
            "p99_ms": ms(percentile(values, 0.99)),
            "first_chunk_p50_ms": ms(p50(firsts[name])),
            "events": len(chunks),
            "bytes": sum(map(len, chunks)),
        }
        for name, values in samples.items()
    }
    floor = raw["floor"]
    rows = []
    for name in sessions:
        rows.append(
            Row(
                "streams",
                f"{name} replay p50",
                raw[name]["p50_ms"],
                floor["p50_ms"],
                target="<= 1.2x",
                limit=1.2,
                note=f"{len(chunks)} events vs SDK parsing MockTransport",
            )
        )
    for name in sessions:
        rows.append(
            Row(
                "streams",
                f"{name} first chunk",
                raw[name]["first_chunk_p50_ms"],
                floor["first_chunk_p50_ms"],
                target="< 1 ms",
                limit=1.0,
                absolute=True,
                note="p50 vs the floor's first chunk",
            )
        )
    return rows, raw
