"""4. Miss overhead: a streamed miss through the cache vs. straight to a loopback provider.

The provider is the simulated one from ``metrion_fixture.testing.provider``, with 100 ms
before the first event and 2 ms between events, so that a stream takes a while to arrive
(a real provider takes seconds: the absolute overhead in ms is printed too). Every
request asks a new question, so every one through the cache is a miss that
is recorded and stored; the direct requests go to the same provider without the cache.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import anthropic
import httpx2
from common import Context, Row, ms, p50

from metrion_fixture.runtime.session import CacheSession
from metrion_fixture.testing.provider import SimulatedProvider
from metrion_fixture.transports.httpx2 import CacheTransport

_questions = itertools.count()


def streamed_call(client: anthropic.Anthropic) -> tuple[float, float]:
    """Wall time and time to the first event of one streamed call with a new question."""
    question = f"Miss number {next(_questions)} {uuid.uuid4().hex}: what are your delivery times?"
    started = time.perf_counter()
    first = 0.0
    stream = client.messages.create(
        model="claude-bench", max_tokens=100, messages=[{"role": "user", "content": question}], stream=True
    )
    with stream:
        for _ in stream:
            if not first:
                first = time.perf_counter() - started
    return time.perf_counter() - started, first


def _client(provider: SimulatedProvider, transport: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="bench", base_url=provider.url, http_client=httpx2.Client(transport=transport), max_retries=0
    )


def measure(ctx: Context, store_urls: dict[str, str]) -> tuple[list[Row], dict]:
    sessions = {name: CacheSession(url, namespace=f"bench-{uuid.uuid4().hex[:8]}") for name, url in store_urls.items()}
    # 100 ms to the first event, 2 ms between events (~45 of them): a quick provider, still slow next to the cache.
    latency, gap = (0.005, 0.0) if ctx.smoke else (0.1, 0.002)
    with SimulatedProvider(latency=latency, chunk_delay=gap) as provider:
        clients = {"direct": _client(provider, httpx2.HTTPTransport())}
        for name, session in sessions.items():
            clients[name] = _client(provider, CacheTransport(httpx2.HTTPTransport(), session=session))
        walls: dict[str, list[float]] = {name: [] for name in clients}
        firsts: dict[str, list[float]] = {name: [] for name in clients}
        try:
            for client in clients.values():
                streamed_call(client)  # connections, imports
            rounds, per_round = ctx.count(8, 2), ctx.count(3, 1)
            names = list(clients)
            for index in range(rounds):
                for name in names[index % len(names) :] + names[: index % len(names)]:
                    for _ in range(per_round):
                        wall, first = streamed_call(clients[name])
                        walls[name].append(wall)
                        firsts[name].append(first)
            for name, session in sessions.items():
                assert session.stats.hits == 0 and session.stats.stored == session.stats.misses, (name, session.stats)
        finally:
            for session in sessions.values():
                session.clear()
    raw = {
        name: {"wall_p50_ms": ms(p50(walls[name])), "first_chunk_p50_ms": ms(p50(firsts[name])), "n": len(walls[name])}
        for name in clients
    }
    direct = raw["direct"]
    rows = []
    for name in sessions:
        rows.append(
            Row(
                "miss overhead",
                f"{name} streamed miss wall",
                raw[name]["wall_p50_ms"],
                direct["wall_p50_ms"],
                target="<= 1.05x",
                limit=1.05,
                note=f"p50 vs straight to the provider; +{raw[name]['wall_p50_ms'] - direct['wall_p50_ms']:.2f} ms",
            )
        )
        rows.append(
            Row(
                "miss overhead",
                f"{name} miss first chunk",
                raw[name]["first_chunk_p50_ms"],
                direct["first_chunk_p50_ms"],
                note=f"p50; +{raw[name]['first_chunk_p50_ms'] - direct['first_chunk_p50_ms']:.2f} ms",
            )
        )
    return rows, raw
