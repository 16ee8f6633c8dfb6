"""The offline demo: an FAQ bot whose repeated questions are answered from the cache.

Everything runs on this machine: a simulated provider on loopback speaks the
Anthropic wire format with a realistic delay, the real anthropic SDK calls it,
and the cache sits in between on the embedded store unless told otherwise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from ..api import cache
from ..core.stats import Stats
from ..reporting.reports import money, plural
from ..testing.provider import SimulatedProvider

DEMO_NAMESPACE = "metrion-demo"
DEMO_MODEL = "claude-haiku-4-5"  # a model with a list price, so the demo shows dollars


@dataclass
class Row:
    who: str
    question: str
    streamed: bool
    cache: str
    latency_ms: float
    input_tokens: int
    output_tokens: int


def run_demo(url: str | None = None, *, latency: float = 0.8, out: TextIO = sys.stdout) -> list[Row]:
    import anthropic  # the demo extra; imported here so the CLI starts without it

    script = [
        ("User A", "What are your delivery times?", False),
        ("User B", "What are your delivery times?", False),
        ("User C", "What are your delivery times?", False),
        ("User D", "Can I change my delivery address after ordering?", True),
        ("User E", "Can I change my delivery address after ordering?", True),
    ]
    rows: list[Row] = []
    with (
        SimulatedProvider(latency=latency, chunk_delay=latency / 40) as provider,
        cache(url, namespace=DEMO_NAMESPACE) as session,
    ):
        cleared = session.clear()
        print(f"metrion-cache demo: simulated provider at {provider.url}, cache store {session.url}", file=out)
        if cleared:
            print(
                f"(cleared {plural(cleared, 'entry')} of an earlier demo run, so the first call is a real miss)",
                file=out,
            )
        client = anthropic.Anthropic(base_url=provider.url, api_key="demo-no-key-needed", max_retries=0)
        system = "You are the FAQ bot of an online shop. Answer in one or two sentences."
        for who, question, streamed in script:
            args: dict[str, Any] = dict(
                model=DEMO_MODEL,
                max_tokens=200,
                system=system,
                messages=[{"role": "user", "content": question}],
            )
            started = time.perf_counter()
            if streamed:
                with client.messages.stream(**args) as stream:
                    for _ in stream.text_stream:
                        pass
                    usage = stream.get_final_message().usage
                    tag = stream.response.headers.get("x-metrion-cache", "")
            else:
                raw = client.messages.with_raw_response.create(**args)
                usage, tag = raw.parse().usage, raw.headers.get("x-metrion-cache", "")
            elapsed = (time.perf_counter() - started) * 1000
            rows.append(Row(who, question, streamed, tag, elapsed, usage.input_tokens, usage.output_tokens))
        provider_calls = provider.call_count
        stats = session.stats
    _print_table(rows, provider_calls, out)
    _print_dollars(stats, out)
    return rows


def _print_table(rows: list[Row], provider_calls: int, out: TextIO) -> None:
    print(file=out)
    print(f"{'request':<60} {'cache':<5} {'latency':>11} {'tokens spent':>14}", file=out)
    print("-" * 93, file=out)
    for row in rows:
        label = f"{row.who}{' (streamed)' if row.streamed else ''}: {row.question}"
        spent = row.input_tokens + row.output_tokens
        tokens = f"{spent:>14}" if row.cache != "HIT" else f"{'0 (saved ' + str(spent) + ')':>14}"
        print(f"{label[:60]:<60} {row.cache:<5} {row.latency_ms:>8.1f} ms {tokens}", file=out)
    misses = [row.latency_ms for row in rows if row.cache != "HIT"]
    hits = [row.latency_ms for row in rows if row.cache == "HIT"]
    print(file=out)
    print(
        f"{plural(len(rows), 'request')}, {provider_calls} reached the provider, {len(hits)} answered by the cache.",
        file=out,
    )
    if misses and hits:
        miss_ms, hit_ms = sum(misses) / len(misses), sum(hits) / len(hits)
        speedup = miss_ms / hit_ms
        print(f"A miss took {miss_ms:.0f} ms on average, a hit {hit_ms:.2f} ms: {speedup:,.0f}x faster.", file=out)


def _print_dollars(stats: Stats, out: TextIO) -> None:
    """What the provider was paid and what the cache saved, at the model's list price."""
    saved_tokens = stats.saved_input_tokens + stats.saved_output_tokens
    print(
        f"Spent {money(stats.cost_usd)} at the provider; the cache saved {money(stats.saved_usd)} "
        f"({plural(saved_tokens, 'token')}) at {DEMO_MODEL}'s list price.",
        file=out,
    )
