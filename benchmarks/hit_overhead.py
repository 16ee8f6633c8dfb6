"""Hit overhead: an SDK call answered by the cache vs. the same call answered in-process.

The floor is the anthropic SDK with an ``httpx2.MockTransport`` that returns a
prepared answer: no network, no cache; nothing any cache can beat. Each store's
hit path is reported as a ratio to that floor, measured in the same run (absolute
times on a shared machine are noise).

    .venv/bin/python benchmarks/hit_overhead.py [--requests 2000] [--redis redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import anthropic
import httpx2

import metrion_fixture

ANSWER = {
    "id": "msg_bench",
    "type": "message",
    "role": "assistant",
    "model": "claude-bench",
    "content": [{"type": "text", "text": "Standard delivery takes 3-5 business days. " * 8}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 42, "output_tokens": 96},
}
MESSAGES = [{"role": "user", "content": "What are your delivery times?"}]


def timings(client: anthropic.Anthropic, requests: int) -> list[float]:
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        client.messages.create(model="claude-bench", max_tokens=100, messages=MESSAGES)
        samples.append(time.perf_counter() - started)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1000, "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "hit_overhead.json")
    args = parser.parse_args()

    def client() -> anthropic.Anthropic:
        transport = httpx2.MockTransport(lambda request: httpx2.Response(200, json=ANSWER))
        return anthropic.Anthropic(api_key="bench", http_client=httpx2.Client(transport=transport), max_retries=0)

    results: dict[str, dict[str, float]] = {}
    timings(client(), 200)  # warm-up: imports, pydantic model building
    results["floor (MockTransport)"] = summary(timings(client(), args.requests))
    with tempfile.TemporaryDirectory() as folder:
        stores = {
            "memory": "memory://bench",
            "sqlite": f"sqlite:///{folder}/bench.sqlite3",
            "redis": args.redis,
        }
        for name, url in stores.items():
            namespace = f"bench-{uuid.uuid4().hex[:8]}"
            with metrion_fixture.cache(url, namespace=namespace) as session:
                sdk = client()
                timings(sdk, 200)
                results[f"hit on {name}"] = summary(timings(sdk, args.requests))
                assert session.stats.misses == 1, session.stats
                session.clear()

    floor = results["floor (MockTransport)"]
    print(f"{'path':<24} {'p50':>9} {'p99':>9} {'p50 / floor':>12} {'p99 / floor':>12}")
    for name, row in results.items():
        print(
            f"{name:<24} {row['p50_ms']:>7.3f}ms {row['p99_ms']:>7.3f}ms"
            f" {row['p50_ms'] / floor['p50_ms']:>11.2f}x {row['p99_ms'] / floor['p99_ms']:>11.2f}x"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
