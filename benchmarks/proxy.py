"""7. The proxy: `metrion-cache serve` against a direct call to the same loopback provider.

The proxy runs as the command does (its own process, Redis store, every provider routed to a
simulated one), and so does the provider (its own process: in the benchmark's process it would
share the GIL with the client it is compared with). Each measure compares the proxy with an
httpx2.AsyncClient calling that provider directly, timed in interleaved rounds:

- hit latency, p50 and p99: a cached answer through the proxy vs. the provider answering at once;
- hits per second with 1, 8 and 64 concurrent clients;
- time to the first byte of a streamed miss (100 ms before the provider's first event): what the
  proxy adds before the first chunk, which the cache passes on as it arrives.

Two more baselines show where the time goes: uvicorn serving prepared bytes (the floor of any
local HTTP hop in Python, no cache) and the cache inside the client (the httpx2 adapter, same
Redis entry); for first bytes, the proxy passing the request through without the cache.

    .venv/bin/python benchmarks/proxy.py [--requests 2000] [--redis redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
from common import MESSAGES, MODEL, Context, Row, ms, p50, percentile

from metrion_fixture.runtime.session import CacheSession
from metrion_fixture.stores import open_store
from metrion_fixture.transports.httpx2 import AsyncCacheTransport

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = (1, 8, 64)
BODY = {"model": MODEL, "max_tokens": 100, "messages": MESSAGES}
PATH = "/v1/messages"
ON = {"x-metrion-cache": "true", "x-api-key": "bench"}
_PROVIDER = """
import sys, time
from metrion_fixture.testing import provider as simulated
from metrion_fixture.testing.provider import SimulatedProvider
simulated._Server.request_queue_size = 256  # socketserver's 5 would refuse 64 clients connecting at once
provider = SimulatedProvider(latency=float(sys.argv[1]), chunk_delay=float(sys.argv[2])).start()
print(provider.url, flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The floor of any local HTTP hop in Python: uvicorn serving prepared bytes, no cache, no provider.
_FLOOR = """
import sys, uvicorn
from common import ANSWER_BYTES, ANSWER_HEADERS
HEADERS = [(k.encode(), v.encode()) for k, v in ANSWER_HEADERS] + [(b"content-length", str(len(ANSWER_BYTES)).encode())]

async def app(scope, receive, send):
    if scope["type"] == "http":
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": ANSWER_BYTES})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off", log_level="warning",
            server_header=False, date_header=False)
"""


@contextmanager
def floor_process() -> Iterator[str]:
    """A uvicorn app that answers every request with the prepared answer; yields its URL."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-c", _FLOOR, str(port)], cwd=Path(__file__).parent)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def _wait_for(url: str, process: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx2.get(url + "/_metrion/health")
            return
        except httpx2.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not start") from None
            time.sleep(0.05)


@contextmanager
def provider_process(latency: float = 0.0, chunk_delay: float = 0.0) -> Iterator[str]:
    """A simulated provider in its own process; yields its URL."""
    with script_process(_PROVIDER, latency, chunk_delay) as (_, url):
        yield url


@contextmanager
def script_process(script: str, *arguments: object) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``python -c script arguments...`` that prints its URL first and stops when its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, arguments)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        yield process, process.stdout.readline().strip()
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(10)


@contextmanager
def proxy_process(provider_url: str, store_url: str, namespace: str) -> Iterator[str]:
    """`metrion-cache serve` (mode off: the requests opt in) routing /anthropic to the provider; yields its URL."""
    port = _free_port()
    command = [sys.executable, "-m", "metrion_fixture.cli", "serve", "--port", str(port), "--url", store_url]
    command += ["--namespace", namespace, "--upstream", f"anthropic={provider_url}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METRION_CACHE_", "METRION_PROXY_"))}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx2.get(url + "/_metrion/health").status_code == 200:
                        break
                except httpx2.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"the proxy did not start:\n{log.read().decode()}") from None
                    time.sleep(0.05)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


async def _timed(call: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def _interleaved(paths: dict[str, Callable[[], Awaitable[Any]]], total: int, warmup: int) -> dict:
    for call in paths.values():
        await _timed(call, warmup)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    names, rounds = list(paths), 10
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            samples[name].extend(await _timed(paths[name], max(1, total // rounds)))
    return samples


async def _per_second(call: Callable[[], Awaitable[Any]], clients: int, total: int) -> float:
    remaining = total

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return total / (time.perf_counter() - started)


def _post(client: httpx2.AsyncClient, url: str, headers: dict[str, str], expect: str | None) -> Any:
    async def call() -> None:
        response = await client.post(url, json=BODY, headers=headers)
        assert response.status_code == 200 and response.headers.get("x-metrion-cache") == expect, response.headers

    return call


def _in_process(session: CacheSession, limits: httpx2.Limits | None = None) -> httpx2.AsyncClient:
    """A client with the cache inside it (the httpx2 adapter), on the proxy's store and namespace."""
    inner = httpx2.AsyncHTTPTransport(limits=limits) if limits is not None else httpx2.AsyncHTTPTransport()
    return httpx2.AsyncClient(transport=AsyncCacheTransport(inner, session=session), timeout=30)


async def _hits(ctx: Context, direct: str, proxied: str, floor: str, session: CacheSession) -> dict[str, Any]:
    limits = httpx2.Limits(max_connections=max(CLIENTS), max_keepalive_connections=max(CLIENTS))
    async with httpx2.AsyncClient(limits=limits, timeout=30) as client, _in_process(session, limits=limits) as cached:
        await _post(client, proxied, ON, "MISS")()  # the one miss; every later request is a hit
        paths = {
            "direct": _post(client, direct, {"x-api-key": "bench"}, None),
            "in-process hit": _post(cached, direct, ON, "HIT"),
            "uvicorn floor": _post(client, floor, ON, None),
            "proxy hit": _post(client, proxied, ON, "HIT"),
        }
        samples = await _interleaved(paths, ctx.count(ctx.requests), ctx.count(200, 5))
        rates: dict[str, dict[str, float]] = {name: {} for name in paths}
        total = ctx.count(1000, 20)
        for _ in range(2):  # each path twice per concurrency, best kept
            for clients in CLIENTS:
                for name, call in paths.items():
                    rate = await _per_second(call, clients, total)
                    rates[name][str(clients)] = max(rate, rates[name].get(str(clients), 0.0))
    latency = {
        name: {"p50_ms": ms(p50(values)), "p99_ms": ms(percentile(values, 0.99)), "n": len(values)}
        for name, values in samples.items()
    }
    return {"latency": latency, "per_second": rates}


async def _first_byte(ctx: Context, direct: str, proxied: str, session: CacheSession) -> dict[str, Any]:
    """Time to the first chunk of a streamed miss (a new question each time), and to its end."""
    asked = iter(range(1_000_000))

    async def streamed(client: httpx2.AsyncClient, url: str, headers: dict[str, str]) -> tuple[float, float]:
        question = f"Stream number {next(asked)} {uuid.uuid4().hex}: what are your delivery times?"
        body = {**BODY, "stream": True, "messages": [{"role": "user", "content": question}]}
        started = time.perf_counter()
        first = 0.0
        async with client.stream("POST", url, json=body, headers=headers) as response:
            assert response.headers.get("x-metrion-cache") in (None, "MISS", "BYPASS"), response.headers
            async for _ in response.aiter_raw():
                first = first or time.perf_counter() - started
        return first, time.perf_counter() - started

    async with httpx2.AsyncClient(timeout=30) as client, _in_process(session) as cached:
        targets = {
            "direct": (client, direct, {"x-api-key": "bench"}),
            "in-process miss": (cached, direct, ON),
            "proxy pass-through": (client, proxied, {"x-api-key": "bench"}),
            "proxy miss": (client, proxied, ON),
        }
        for target in targets.values():
            await streamed(*target)  # connections
        firsts: dict[str, list[float]] = {name: [] for name in targets}
        walls: dict[str, list[float]] = {name: [] for name in targets}
        names = list(targets)
        for index in range(ctx.count(10, 2)):
            for name in names[index % len(names) :] + names[: index % len(names)]:
                for _ in range(ctx.count(3, 1)):
                    first, wall = await streamed(*targets[name])
                    firsts[name].append(first)
                    walls[name].append(wall)
    return {
        name: {"first_byte_p50_ms": ms(p50(firsts[name])), "wall_p50_ms": ms(p50(walls[name])), "n": len(firsts[name])}
        for name in targets
    }


def measure(ctx: Context) -> tuple[list[Row], dict]:
    namespace = f"bench-proxy-{uuid.uuid4().hex[:8]}"
    session = CacheSession(ctx.redis, namespace=namespace)
    try:
        with provider_process() as quick, proxy_process(quick, ctx.redis, namespace) as proxy, floor_process() as floor:
            hits = asyncio.run(_hits(ctx, quick + PATH, proxy + "/anthropic" + PATH, floor + PATH, session))
        # 100 ms before the first event, 2 ms between events (as benchmarks/miss.py).
        latency, gap = (0.005, 0.0) if ctx.smoke else (0.1, 0.002)
        with provider_process(latency, gap) as slow, proxy_process(slow, ctx.redis, namespace) as proxy:
            streams = asyncio.run(_first_byte(ctx, slow + PATH, proxy + "/anthropic" + PATH, session))
    finally:
        store = open_store(ctx.redis)
        store.delete_prefix(f"{namespace}:")
        store.delete_prefix(f"_ledger:{namespace}:")
    raw = {**hits, "streamed_miss": streams}

    lat, rates = hits["latency"], hits["per_second"]
    baselines = {  # measured path: (short name, what it is)
        "direct": ("direct", "straight to the provider"),
        "uvicorn floor": ("floor", "uvicorn serving prepared bytes: any local HTTP hop"),
        "in-process hit": ("in-process", "the httpx2 adapter's hit on the same entry"),
    }
    rows = []
    for which in ("p50", "p99"):
        for baseline, (short, what) in baselines.items():
            rows.append(
                Row(
                    "proxy",
                    f"hit {which} vs {short}",
                    lat["proxy hit"][f"{which}_ms"],
                    lat[baseline][f"{which}_ms"],
                    note=f"vs {what}",
                )
            )
    for clients in CLIENTS:
        for baseline, (short, what) in baselines.items():
            rows.append(
                Row(
                    "proxy",
                    f"hits/s {clients} clients vs {short}",
                    rates["proxy hit"][str(clients)],
                    rates[baseline][str(clients)],
                    unit="/s",
                    note=f"vs {what}, same concurrency (higher is better)",
                )
            )
    first = {name: values["first_byte_p50_ms"] for name, values in streams.items()}
    added = first["proxy miss"] - first["direct"]
    hop, cache = first["proxy pass-through"] - first["direct"], first["in-process miss"] - first["direct"]
    rows += [
        Row(
            "proxy",
            "streamed miss first byte",
            first["proxy miss"],
            first["direct"],
            note=f"p50 vs straight to the provider; +{added:.2f} ms",
        ),
        Row(
            "proxy",
            "first byte added by the proxy",
            max(0.0, added),
            unit="ms",
            absolute=True,
            note=f"p50; the hop alone (pass-through) {hop:.2f} ms, the cache alone (in-process) {cache:.2f} ms",
        ),
        Row(
            "proxy",
            "first byte added vs its parts",
            max(0.0, added),
            hop + cache,
            target="<= 1.25x",
            limit=1.25,
            note="added by a proxy miss vs the hop's and the cache's own: nothing waits on anything else",
        ),
        Row(
            "proxy",
            "streamed miss wall",
            streams["proxy miss"]["wall_p50_ms"],
            streams["direct"]["wall_p50_ms"],
            note=f"p50 vs straight to the provider; "
            f"+{streams['proxy miss']['wall_p50_ms'] - streams['direct']['wall_p50_ms']:.2f} ms",
        ),
    ]
    return rows, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ctx = Context(args.redis, "", (), folder, requests=args.requests, smoke=args.smoke)
        rows, raw = measure(ctx)
    for row in rows:
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        print(f"{row.case:<36} {row.value:>10.3f} {row.unit:<3} {row.baseline or 0:>10.3f} {ratio:>7}  {row.note}")
    print(json.dumps(raw, indent=2))


if __name__ == "__main__":
    main()
