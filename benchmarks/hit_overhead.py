"""1. Hit overhead: an SDK call answered by the cache vs. the same call answered in-process.

The floor is the anthropic SDK with an ``httpx2.MockTransport`` that returns a
prepared answer: no network, no cache; nothing any cache can beat. Each store's
hit path is reported as a ratio to that floor, timed in interleaved rounds in the
same run.

    .venv/bin/python benchmarks/hit_overhead.py [--requests 2000] [--redis redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import uuid
from pathlib import Path

from common import Context, Row, ask, floor_transport, interleaved, ms, p50, percentile, sdk

from metrion_fixture.runtime.session import CacheSession
from metrion_fixture.transports.httpx2 import CacheTransport

TARGETS = {"memory": 1.2, "sqlite": 1.2, "redis": 1.3}


def store_urls(ctx: Context) -> dict[str, str]:
    return {
        "memory": "memory://bench",
        "sqlite": f"sqlite:///{ctx.folder}/hits.sqlite3",
        "redis": ctx.redis,
        # Every hit a GET: what a process's first read of an entry costs, or any read with ?near_cache=off.
        "redis one-GET": ctx.redis + ("&" if "?" in ctx.redis else "?") + "near_cache=off",
    }


def measure(ctx: Context) -> tuple[list[Row], dict]:
    sessions = {
        name: CacheSession(url, namespace=f"bench-{uuid.uuid4().hex[:8]}") for name, url in store_urls(ctx).items()
    }
    clients = {"floor": sdk(floor_transport())}
    for name, session in sessions.items():
        clients[name] = sdk(CacheTransport(floor_transport(), session=session))
    try:
        paths = {name: (lambda client=client: ask(client)) for name, client in clients.items()}
        samples = interleaved(paths, ctx.count(ctx.requests), warmup=ctx.count(200, 5))
        for name, session in sessions.items():
            assert session.stats.misses == 1 and session.stats.hits > 0, (name, session.stats)
    finally:
        for session in sessions.values():
            session.clear()
    raw = {name: {"p50_ms": ms(p50(s)), "p99_ms": ms(percentile(s, 0.99)), "n": len(s)} for name, s in samples.items()}
    floor = raw["floor"]
    rows = []
    for name in sessions:
        rows.append(
            Row(
                "hit overhead",
                f"{name} hit p50",
                raw[name]["p50_ms"],
                floor["p50_ms"],
                target=f"<= {TARGETS[name]}x" if name in TARGETS else "",
                limit=TARGETS.get(name),
                note="vs MockTransport floor",
            )
        )
        rows.append(
            Row("hit overhead", f"{name} hit p99", raw[name]["p99_ms"], floor["p99_ms"], note="vs MockTransport floor")
        )
    return rows, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "hit_overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ctx = Context(redis=args.redis, scale_redis="", scale_dbs=(), folder=folder, requests=args.requests)
        rows, raw = measure(ctx)
    for row in rows:
        print(f"{row.case:<16} {row.value:>7.3f} ms  floor {row.baseline:>7.3f} ms  {row.ratio:>5.2f}x  {row.target}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
