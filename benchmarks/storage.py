"""6. Storage: bytes stored per entry vs. bytes of the provider's answer.

Answers come from the loopback provider (with its real headers), recorded through
the cache: a JSON answer, a streamed one, and the 2 MiB ``big`` answer. The stored
value is read back from the store; on Redis, ``MEMORY USAGE`` adds the server's own
per-key cost.
"""

from __future__ import annotations

import uuid
from typing import Any

import anthropic
import httpx2
import redis
from common import MESSAGES, MODEL, Context, Row

from metrion_fixture.runtime.session import CacheSession
from metrion_fixture.testing.provider import SimulatedProvider
from metrion_fixture.transports.httpx2 import CacheTransport

OVERHEAD_LIMIT = 1024


def measure(ctx: Context, store_urls: dict[str, str]) -> tuple[list[Row], dict]:
    session = CacheSession(ctx.redis, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    raw: dict[str, Any] = {}
    cases = {
        "json answer": ({}, False),
        "streamed answer": ({}, True),
        "2 MiB json answer": ({"x-simulate": "big"}, False),
    }
    with SimulatedProvider() as provider:
        client = anthropic.Anthropic(
            api_key="bench",
            base_url=provider.url,
            http_client=httpx2.Client(transport=CacheTransport(httpx2.HTTPTransport(), session=session)),
            max_retries=0,
        )
        admin = redis.Redis.from_url(ctx.redis)
        try:
            for case, (headers, stream) in cases.items():
                before = set(session.store.keys(f"{session.settings.namespace}:"))
                answer_bytes = _call(client, case, headers, stream)
                (key,) = set(session.store.keys(f"{session.settings.namespace}:")) - before
                value = session.store.get(key)
                assert value is not None
                raw[case] = {
                    "answer_bytes": answer_bytes,
                    "stored_bytes": len(value),
                    "overhead_bytes": len(value) - answer_bytes,
                    "redis_memory_usage": admin.memory_usage(key),
                }
        finally:
            session.clear()
    rows = [
        Row(
            "storage",
            f"{case} (+{row['overhead_bytes']} B)",
            row["stored_bytes"],
            row["answer_bytes"],
            unit="B",
            target="<= answer + 1 KiB",
            limit=row["answer_bytes"] + OVERHEAD_LIMIT,
            absolute=True,
            note=f"stored vs answer bytes; Redis MEMORY USAGE {row['redis_memory_usage']} B",
        )
        for case, row in raw.items()
    ]
    return rows, raw


def _call(client: anthropic.Anthropic, case: str, headers: dict[str, str], stream: bool) -> int:
    """Make one call and return the number of body bytes the provider answered with."""
    messages = [{"role": "user", "content": f"{case}: {MESSAGES[0]['content']}"}]
    request: dict[str, Any] = {"model": MODEL, "max_tokens": 100, "messages": messages, "extra_headers": headers}
    if stream:
        with client.messages.with_streaming_response.create(**request, stream=True) as response:
            return sum(len(chunk) for chunk in response.iter_bytes())
    return len(client.messages.with_raw_response.create(**request).http_response.content)
