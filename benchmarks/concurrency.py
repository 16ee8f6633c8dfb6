"""5. Concurrency: hits per second with 1, 8 and 64 asyncio tasks, and a cold stampede.

Hits per second on each store is compared with the async SDK answered by a
``MockTransport`` at the same concurrency. The stampede sends 64 identical requests
at once to a cold cache in front of the loopback provider and reports how many reached
the provider (no single-flight yet: each concurrent miss calls the provider).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import anthropic
import httpx2
from common import ANSWER_BYTES, ANSWER_HEADERS, MESSAGES, MODEL, Context, Row, async_sdk

from metrion_fixture.runtime.session import CacheSession
from metrion_fixture.testing.provider import SimulatedProvider
from metrion_fixture.transports.httpx2 import AsyncCacheTransport

TASKS = (1, 8, 64)


def async_floor() -> httpx2.MockTransport:
    async def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=ANSWER_HEADERS, content=ANSWER_BYTES)

    return httpx2.MockTransport(answer)


async def hits_per_second(client: anthropic.AsyncAnthropic, tasks: int, total: int) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return total / (time.perf_counter() - started)


async def _throughput(ctx: Context, store_urls: dict[str, str]) -> dict[str, dict[str, float]]:
    sessions = {name: CacheSession(url, namespace=f"bench-{uuid.uuid4().hex[:8]}") for name, url in store_urls.items()}
    clients = {"floor": async_sdk(async_floor())}
    for name, session in sessions.items():
        clients[name] = async_sdk(AsyncCacheTransport(async_floor(), session=session))
    total = ctx.count(1000, 20)
    results: dict[str, dict[str, float]] = {name: {} for name in clients}
    try:
        for client in clients.values():
            await hits_per_second(client, 1, ctx.count(100, 3))  # warm-up, and the one miss
        for _ in range(2):  # interleaved: each path twice per concurrency, best kept
            for tasks in TASKS:
                for name, client in clients.items():
                    rate = await hits_per_second(client, tasks, total)
                    results[name][str(tasks)] = max(rate, results[name].get(str(tasks), 0.0))
        for name, session in sessions.items():
            assert session.stats.misses == 1 and session.stats.hits > 0, (name, session.stats)
    finally:
        for session in sessions.values():
            session.clear()
        for client in clients.values():
            await client.close()
    return results


async def _stampede(ctx: Context, store_url: str) -> dict[str, Any]:
    session = CacheSession(store_url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    tasks = ctx.count(64, 8)
    with SimulatedProvider(latency=0.05) as provider:
        client = anthropic.AsyncAnthropic(
            api_key="bench",
            base_url=provider.url,
            http_client=httpx2.AsyncClient(transport=AsyncCacheTransport(httpx2.AsyncHTTPTransport(), session=session)),
            max_retries=0,
        )
        try:
            await asyncio.gather(
                *(client.messages.create(model=MODEL, max_tokens=100, messages=MESSAGES) for _ in range(tasks))
            )
            calls = provider.call_count
        finally:
            await client.close()
            session.clear()
    return {"requests": tasks, "provider_calls": calls, "store": store_url.split("://")[0]}


def measure(ctx: Context, store_urls: dict[str, str]) -> tuple[list[Row], dict]:
    throughput = asyncio.run(_throughput(ctx, store_urls))
    stampede = asyncio.run(_stampede(ctx, store_urls["redis"]))
    rows = []
    for tasks in TASKS:
        floor = throughput["floor"][str(tasks)]
        for name in store_urls:
            rows.append(
                Row(
                    "concurrency",
                    f"{name} hits/s, {tasks} tasks",
                    throughput[name][str(tasks)],
                    floor,
                    unit="/s",
                    note="vs async MockTransport floor (higher is better)",
                )
            )
    rows.append(
        Row(
            "concurrency",
            f"cold stampede of {stampede['requests']}",
            stampede["provider_calls"],
            stampede["requests"],
            unit="calls",
            note="provider calls / identical cold requests (single-flight: issue 5)",
        )
    )
    return rows, {"hits_per_second": throughput, "cold_stampede": stampede}
