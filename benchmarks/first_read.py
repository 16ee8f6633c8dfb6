"""8. First reads: the way a test suite meets the cache, every hit the first read of its entry in the process.

Another process writes N distinct entries through the cache (Redis, default options); a fresh
process then reads each one once: non-streamed hits (p50 / p99), the first event of 2,000-event
streamed hits, and async hits per second at 1, 8 and 64 tasks (each task count on entries of
its own). The baseline is the same SDK call answered by a ``MockTransport`` with prepared bytes,
timed in the same reading process, interleaved call by call. The limit beside each target is the
floor plus a bare ``GET`` of the same value on the same connection type (timed in the same
process too): what a one-round-trip hit cannot go below.

    .venv/bin/python benchmarks/first_read.py [--redis redis://127.0.0.1:6379/15] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from common import MODEL, Context, Row, async_sdk, floor_transport, ms, p50, percentile, sdk

TASKS = (1, 8, 64)
HERE = Path(__file__).parent


def _messages(kind: str, index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"First-read benchmark, {kind} question number {index}?"}]


def _counts(ctx: Context) -> dict[str, int]:
    return {
        "warmup": ctx.count(30, 3),
        "hits": ctx.count(1000, 10),
        "streams": ctx.count(80, 3),
        "events": ctx.count(2000, 300),
        "per_level": ctx.count(400, 10),
        "rounds": 2,
    }


def measure(ctx: Context) -> tuple[list[Row], dict]:
    namespace = f"bench-first-{uuid.uuid4().hex[:8]}"
    counts = _counts(ctx)
    arguments = [ctx.redis, namespace, json.dumps(counts)]
    try:
        for role in ("write", "read"):
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), role, *arguments],
                capture_output=True,
                text=True,
                check=False,
                cwd=HERE,
            )
            if done.returncode != 0:
                raise RuntimeError(f"first_read {role} failed:\n{done.stdout}\n{done.stderr}")
        raw = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        from metrion_fixture.runtime.session import CacheSession

        CacheSession(ctx.redis, namespace=namespace).clear()
    return _rows(raw), raw


def _rows(raw: dict[str, Any]) -> list[Row]:
    hits, streams, rates = raw["hits"], raw["streams"], raw["rates"]
    get_ms, stream_get_ms = raw["bare_get_p50_ms"], raw["bare_stream_get_p50_ms"]
    floor50, floor99 = hits["floor_p50_ms"], hits["floor_p99_ms"]
    limit = (floor50 + get_ms) / floor50
    rows = [
        Row(
            "first read",
            "redis hit p50",
            hits["redis_p50_ms"],
            floor50,
            target=f"<= 1.25x (limit {limit:.2f}x)",
            limit=1.25,
            note=f"{hits['n']} entries written by another process, each read once",
        ),
        Row(
            "first read",
            "redis hit p99",
            hits["redis_p99_ms"],
            floor99,
            target=f"<= 1.5x (limit {(floor99 + get_ms) / floor99:.2f}x)",
            limit=1.5,
        ),
        Row(
            "first read",
            "redis stream first chunk",
            streams["redis_first_p50_ms"],
            streams["floor_first_p50_ms"],
            target=f"< 1 ms (limit {streams['floor_first_p50_ms'] + stream_get_ms:.2f})",
            limit=1.0,
            absolute=True,
            note=f"{streams['n']} streams of {streams['events']} events",
        ),
        Row("first read", "bare GET of a hit's value", get_ms, note="redis-py connection, same process"),
        Row("first read", "bare GET of a stream's value", stream_get_ms, note=f"{streams['events']} events"),
    ]
    for tasks in TASKS:
        floor_rate, redis_rate = rates[str(tasks)]["floor"], rates[str(tasks)]["redis"]
        bound = 1 / (1 + floor_rate * get_ms / 1000)  # one task: the floor's time plus one round trip
        rows.append(
            Row(
                "first read",
                f"redis hits/s, {tasks} tasks",
                redis_rate,
                floor_rate,
                unit="/s",
                target=">= 0.85x" + (f" (limit {bound:.2f}x)" if tasks == 1 else ""),
                limit=0.85,
                at_least=True,
            )
        )
    return rows


# -- the two processes -----------------------------------------------------------------------------


def _write(url: str, namespace: str, counts: dict[str, int]) -> None:
    import streams as stream_bench

    from metrion_fixture.runtime.session import CacheSession
    from metrion_fixture.transports.httpx2 import CacheTransport

    session = CacheSession(url, namespace=namespace)
    client = sdk(CacheTransport(floor_transport(), session=session))
    names = [("warmup", counts["warmup"]), ("hit", counts["hits"])]
    names += [(f"rate{tasks}-{round_}", counts["per_level"]) for tasks in TASKS for round_ in range(counts["rounds"])]
    for kind, count in names:
        for index in range(count):
            client.messages.create(model=MODEL, max_tokens=100, messages=_messages(kind, index))
    chunks = stream_bench.stream_chunks(counts["events"])
    streamer = sdk(CacheTransport(stream_bench.stream_transport(chunks), session=session))
    for kind, count in (("stream-warmup", 3), ("stream", counts["streams"])):
        for index in range(count):
            _consume(streamer, _messages(kind, index), [])
    session.flush_ledger()
    assert session.stats.misses == session.stats.stored, session.stats


def _consume(client: Any, messages: list[dict[str, str]], first: list[float]) -> None:
    started = time.perf_counter()
    with client.messages.create(model=MODEL, max_tokens=100, messages=messages, stream=True) as stream:
        for count, _ in enumerate(stream):
            if not count:
                first.append(time.perf_counter() - started)


def _read(url: str, namespace: str, counts: dict[str, int]) -> dict[str, Any]:
    import streams as stream_bench

    from metrion_fixture.runtime.session import CacheSession
    from metrion_fixture.transports.httpx2 import AsyncCacheTransport, CacheTransport

    session = CacheSession(url, namespace=namespace)
    floor, cached = sdk(floor_transport()), sdk(CacheTransport(floor_transport(), session=session))
    for index in range(counts["warmup"]):  # connections, tracking, the SDK's first-call costs
        for client in (floor, cached):
            client.messages.create(model=MODEL, max_tokens=100, messages=_messages("warmup", index))
    # The limit: a bare GET of a stored value (same size) on a redis-py connection of the store's own
    # client, in this process, timed between the same SDK calls (so on caches as cold as the hit's).
    store = session.store
    keys = store.keys(f"{namespace}:")
    json_keys = [key for key in keys if ":json:" in key]
    stream_keys = [key for key in keys if ":stream:" in key]
    redis_client = store._sync()  # type: ignore[attr-defined]
    bare: dict[str, list[float]] = {"json": [], "stream": []}

    def bare_get(kind: str, key: str) -> None:
        started = time.perf_counter()
        redis_client.get(key)
        bare[kind].append(time.perf_counter() - started)

    samples: dict[str, list[float]] = {"floor": [], "redis": []}
    for index in range(counts["hits"]):
        order = (("floor", floor), ("redis", cached)) if index % 2 else (("redis", cached), ("floor", floor))
        for name, client in order:
            started = time.perf_counter()
            client.messages.create(model=MODEL, max_tokens=100, messages=_messages("hit", index))
            samples[name].append(time.perf_counter() - started)
        bare_get("json", json_keys[index % len(json_keys)])
    assert session.stats.hits == counts["warmup"] + counts["hits"] and not session.stats.misses, session.stats

    chunks = stream_bench.stream_chunks(counts["events"])
    stream_floor = sdk(stream_bench.stream_transport(chunks))
    stream_cached = sdk(CacheTransport(stream_bench.stream_transport(chunks), session=session))
    for index in range(3):
        _consume(stream_cached, _messages("stream-warmup", index), [])
        _consume(stream_floor, _messages("stream-warmup", index), [])
    firsts: dict[str, list[float]] = {"floor": [], "redis": []}
    for index in range(counts["streams"]):
        _consume(stream_floor, _messages("stream", index), firsts["floor"])
        _consume(stream_cached, _messages("stream", index), firsts["redis"])
        bare_get("stream", stream_keys[index % len(stream_keys)])

    rates = asyncio.run(_rates(session, counts, AsyncCacheTransport))
    assert not session.stats.misses, session.stats
    return {
        "hits": {
            "n": counts["hits"],
            "floor_p50_ms": ms(p50(samples["floor"])),
            "floor_p99_ms": ms(percentile(samples["floor"], 0.99)),
            "redis_p50_ms": ms(p50(samples["redis"])),
            "redis_p99_ms": ms(percentile(samples["redis"], 0.99)),
        },
        "streams": {
            "n": counts["streams"],
            "events": counts["events"],
            "floor_first_p50_ms": ms(p50(firsts["floor"])),
            "redis_first_p50_ms": ms(p50(firsts["redis"])),
        },
        "bare_get_p50_ms": ms(p50(bare["json"])),
        "bare_stream_get_p50_ms": ms(p50(bare["stream"])),
        "rates": rates,
    }


async def _rates(session: Any, counts: dict[str, int], transport_class: Any) -> dict[str, dict[str, float]]:
    from concurrency import async_floor

    floor, cached = async_sdk(async_floor()), async_sdk(transport_class(async_floor(), session=session))
    for client in (floor, cached):  # the async client's connection and the SDK's first call
        for index in range(counts["warmup"]):
            await client.messages.create(model=MODEL, max_tokens=100, messages=_messages("warmup", index))
    rates: dict[str, dict[str, float]] = {str(tasks): {"floor": 0.0, "redis": 0.0} for tasks in TASKS}
    for round_ in range(counts["rounds"]):  # best of the rounds, each on entries not read before
        for tasks in TASKS:
            for name, client in (("floor", floor), ("redis", cached)):
                rate = await _per_second(client, tasks, f"rate{tasks}-{round_}", counts["per_level"])
                rates[str(tasks)][name] = max(rates[str(tasks)][name], rate)
    return rates


async def _per_second(client: Any, tasks: int, kind: str, total: int) -> float:
    indexes = iter(range(total))

    async def worker() -> None:
        for index in indexes:
            await client.messages.create(model=MODEL, max_tokens=100, messages=_messages(kind, index))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return total / (time.perf_counter() - started)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] in ("write", "read"):
        role, url, namespace, counts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        if role == "write":
            _write(url, namespace, counts)
        else:
            print(json.dumps(_read(url, namespace, counts)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    rows, _ = measure(Context(redis=args.redis, scale_redis="", scale_dbs=(), folder="", smoke=args.smoke))
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:5.2f}x"
        print(f"{row.case:<28} {row.value:>10.3f} {row.unit}  {ratio}  {row.target}  ok={row.ok}")


if __name__ == "__main__":
    main()
