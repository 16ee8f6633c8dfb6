"""2. Scale: does a hit cost more when the cache holds more?

- metrion on Redis with 1,000 / 100,000 / 1,000,000 entries, one empty Redis DB per
  size, filled with pipelined SETs of a real encoded entry (with a TTL, as the cache
  writes them, and a one-hour expiry as a safety net), each DB flushed afterwards.
- vcrpy replaying from cassettes of 1 / 100 / 500 interactions matched on the body.
- hishel (httpx2 transport, SQLite storage) caching POST by body, with 1 / 100 / 500 entries.

Each is reported as a ratio to the same tool at its smallest size; the sizes are
timed in interleaved rounds.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx2
import redis
from common import MESSAGES, MODEL, Context, Row, ask, floor_transport, interleaved, ms, p50, percentile, sdk, timed

from metrion_fixture.core.key import cache_key
from metrion_fixture.runtime.session import CacheSession
from metrion_fixture.transports.httpx2 import CacheTransport

TOOL_SIZES = (1, 100, 500)
SMOKE_SIZES = (1, 5, 10)
_FILL_BATCH = 5_000


def redis_sizes(ctx: Context) -> tuple[int, ...]:
    if ctx.smoke:
        return (10, 100)
    return (1_000, 100_000) if ctx.quick else (1_000, 100_000, 1_000_000)


def _fill(client: redis.Redis, namespace: str, value: bytes, count: int) -> float:
    """``count`` entries under ``namespace`` as fast as Redis takes them; returns the seconds it took."""
    started = time.perf_counter()
    prefix = f"{namespace}:anthropic_messages:json:"
    for start in range(0, count, _FILL_BATCH):
        pipe = client.pipeline(transaction=False)
        for index in range(start, min(count, start + _FILL_BATCH)):
            pipe.set(prefix + hashlib.sha256(index.to_bytes(8, "big")).hexdigest(), value, ex=3600)
        pipe.execute()
    return time.perf_counter() - started


def measure_redis(ctx: Context) -> tuple[list[Row], dict]:
    sizes = redis_sizes(ctx)
    dbs = ctx.scale_dbs[: len(sizes)]
    if len(dbs) < len(sizes):
        return [], {"skipped": f"needs {len(sizes)} Redis DBs, got {list(ctx.scale_dbs)}"}
    admins = {db: redis.Redis.from_url(f"{ctx.scale_redis}/{db}") for db in dbs}
    busy = [db for db, admin in admins.items() if admin.dbsize()]
    if busy:
        return [], {"skipped": f"Redis DBs {busy} are not empty; pass --scale-dbs with empty ones"}
    namespace = "bench-scale"
    raw: dict[str, Any] = {}
    try:
        clients, sessions = {}, {}
        for size, db in zip(sizes, dbs, strict=True):
            # The near cache off: every hit is a GET, so this measures Redis's lookup at each size.
            session = CacheSession(f"{ctx.scale_redis}/{db}?near_cache=off", namespace=namespace)
            client = sdk(CacheTransport(floor_transport(), session=session))
            ask(client)  # the measured entry: stored by the cache itself
            value = admins[db].get(f"{namespace}:anthropic_messages:json:{cache_key(MODEL, MESSAGES)}")
            assert value is not None
            seconds = _fill(admins[db], namespace, value, size - 1)
            raw[str(size)] = {"db": db, "fill_seconds": round(seconds, 2), "entry_bytes": len(value)}
            raw[str(size)]["dbsize"] = admins[db].dbsize()
            clients[size], sessions[size] = client, session
        paths = {str(size): (lambda c=client: ask(c)) for size, client in clients.items()}
        samples = interleaved(paths, ctx.count(ctx.requests), warmup=ctx.count(200, 5))
        for session in sessions.values():
            assert session.stats.hits > 0 and session.stats.misses == 1, session.stats
    finally:
        for admin in admins.values():
            if admin.dbsize():
                admin.flushdb(asynchronous=True)  # only DBs found empty are ever filled
    for size in sizes:
        raw[str(size)].update(p50_ms=ms(p50(samples[str(size)])), p99_ms=ms(percentile(samples[str(size)], 0.99)))
    base = raw[str(sizes[0])]
    rows = [
        Row(
            "scale",
            f"metrion redis @{size:,}",
            raw[str(size)]["p50_ms"],
            base["p50_ms"],
            target="<= 1.1x" if size == sizes[-1] else "",
            limit=1.1 if size == sizes[-1] else None,
            note=f"p50 vs @{sizes[0]:,}; filled in {raw[str(size)]['fill_seconds']} s",
        )
        for size in sizes[1:]
    ]
    return rows, raw


def _recordable(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question number {index}: what are your delivery times?"}]


def tool_sizes(ctx: Context) -> tuple[int, ...]:
    return SMOKE_SIZES if ctx.smoke else TOOL_SIZES


def measure_vcrpy(ctx: Context) -> tuple[list[Row], dict]:
    sizes = tool_sizes(ctx)
    try:
        import vcr
    except ImportError:
        return [], {"skipped": "vcrpy is not installed (pip install -e '.[bench]')"}
    recorder = vcr.VCR(match_on=["method", "path", "body"], record_mode="all")
    folder = Path(ctx.folder) / "cassettes"
    raw: dict[str, Any] = {}
    for size in sizes:
        path = folder / f"{size}.yaml"
        with recorder.use_cassette(str(path)):
            client = sdk(floor_transport())
            for index in range(size):
                ask(client, _recordable(index))
        started = time.perf_counter()
        with recorder.use_cassette(str(path), record_mode="none", allow_playback_repeats=True):
            sdk(floor_transport())  # nothing to do with the cassette: just the load
        raw[str(size)] = {"load_ms": ms(time.perf_counter() - started)}
    # Replay one interaction from the middle of each cassette (matching is a linear scan).
    # vcrpy patches one global set of transports, so the sizes take turns, cassette by cassette.
    players = vcr.VCR(match_on=["method", "path", "body"], record_mode="none")
    samples: dict[str, list[float]] = {str(size): [] for size in sizes}
    count = ctx.count(max(50, ctx.requests // 20), 5)
    for round_index in range(4):
        for size in sizes:
            with players.use_cassette(str(folder / f"{size}.yaml"), allow_playback_repeats=True):
                client = sdk(floor_transport())
                messages = _recordable(size // 2)
                if round_index == 0:
                    timed(lambda c=client, m=messages: ask(c, m), 3)
                samples[str(size)] += timed(lambda c=client, m=messages: ask(c, m), count)
    for size in sizes:
        raw[str(size)].update(p50_ms=ms(p50(samples[str(size)])), p99_ms=ms(percentile(samples[str(size)], 0.99)))
    base = raw[str(sizes[0])]
    rows = [
        Row("scale", f"vcrpy cassette of {size}", raw[str(size)]["p50_ms"], base["p50_ms"], note="p50 vs 1 interaction")
        for size in sizes[1:]
    ]
    rows.append(
        Row(
            "scale",
            f"vcrpy open {sizes[-1]}-cassette",
            raw[str(sizes[-1])]["load_ms"],
            raw[str(sizes[0])]["load_ms"],
            note="loading it (each test that uses it pays this)",
        )
    )
    return rows, raw


class _KeyByBody(httpx2.BaseTransport):
    """What hishel needs to cache an LLM call: a key made of the request body."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        key = hashlib.sha256(f"{request.method} {request.url}\n".encode() + body).hexdigest()
        request.extensions = {**request.extensions, "caching": {"key": key}}
        return self.inner.handle_request(request)


def measure_hishel(ctx: Context) -> tuple[list[Row], dict]:
    sizes = tool_sizes(ctx)
    try:
        import hishel
        import hishel.httpx2
        import hishel.httpx2._sync as hishel_sync
    except ImportError:
        return [], {"skipped": "hishel (with its httpx2 transport) is not installed (pip install -e '.[bench]')"}
    # hishel's plain (non-RFC) mode caches GET and HEAD by URL; RFC 9111 mode never serves a
    # POST from cache. Caching an LLM call takes both: POST allowed, and a key made of the body.
    hishel_sync.CACHEABLE_METHODS = frozenset({"GET", "HEAD", "POST"})
    clients = {}
    for size in sizes:
        storage = hishel.SqliteStorage(database_path=str(Path(ctx.folder) / f"hishel-{size}.db"))
        client = sdk(_KeyByBody(hishel.httpx2.CacheTransport(floor_transport(), storage=storage)))
        for index in range(size):
            ask(client, _recordable(index))
        clients[size] = client
    wanted = {size: _recordable(size // 2) for size in sizes}
    paths = {str(size): (lambda c=client, m=wanted[size]: ask(c, m)) for size, client in clients.items()}
    samples = interleaved(paths, ctx.count(max(200, ctx.requests // 4)), warmup=ctx.count(50, 3))
    raw = {
        name: {"p50_ms": ms(p50(values)), "p99_ms": ms(percentile(values, 0.99)), "version": _version("hishel")}
        for name, values in samples.items()
    }
    base = raw[str(sizes[0])]
    rows = [
        Row("scale", f"hishel with {size} entries", raw[str(size)]["p50_ms"], base["p50_ms"], note="p50 vs 1 entry")
        for size in sizes[1:]
    ]
    return rows, raw


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def measure(ctx: Context) -> tuple[list[Row], dict]:
    rows: list[Row] = []
    raw: dict[str, Any] = {}
    for name, part in (("redis", measure_redis), ("vcrpy", measure_vcrpy), ("hishel", measure_hishel)):
        part_rows, raw[name] = part(ctx)
        rows += part_rows
    # The alternatives against metrion's own hit, in absolute terms, for the comparison.
    largest = [v for v in raw["redis"].values() if isinstance(v, dict)]
    biggest = str(tool_sizes(ctx)[-1])
    if largest and "p50_ms" in raw["vcrpy"].get(biggest, {}):
        rows.append(
            Row(
                "scale",
                f"vcrpy@{biggest} vs metrion redis@max",
                raw["vcrpy"][biggest]["p50_ms"],
                largest[-1]["p50_ms"],
                unit="ms",
                note="how much slower a replay is",
            )
        )
    return rows, raw
