"""`metrion-cache serve` against LiteLLM's proxy, side by side in one run.

Both proxies run as their own processes with a Redis cache, in front of the same simulated provider
(its own process, 100 ms before the first event, 2 ms between events). The same httpx2 client
code asks both on the OpenAI chat route (`/v1/chat/completions`): our proxy opts in per request
with `x-metrion-cache: true`, LiteLLM caches every request by its config (`cache: true`, Redis).
Every hit is checked to be one: ours answers `x-metrion-cache: HIT`; for LiteLLM the provider's
count of calls must not grow while its hits are measured (and each answer carries the
`x-litellm-cache-key` LiteLLM sets only on a cache hit).

Measured: hit latency p50/p99 (interleaved rounds), hits per second at 1, 8 and 64 concurrent
clients, time to the first byte of a streamed miss and of a streamed hit, and resident memory of
each server (its whole process tree) after the run.

LiteLLM is installed in a virtual environment of its own, `.cache/bench-litellm` (gitignored,
reused between runs): `pip install 'litellm[proxy]'`. It runs with no database, a master key,
and `LITELLM_LOCAL_MODEL_COST_MAP=True` so it reads its bundled price list instead of the internet.
Not run by the test suite nor by `run.py`.

    .venv/bin/python benchmarks/litellm_proxy.py [--requests 500] [--redis redis://127.0.0.1:6379/14]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx2
from common import MESSAGES, ms, p50, percentile
from proxy import _PROVIDER, _free_port, _interleaved, _per_second, script_process

from metrion_fixture.stores import open_store

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "bench-litellm"
LITELLM = VENV / "bin" / "litellm"
CLIENTS = (1, 8, 64)
MODEL = "gpt-bench"
BODY = {"model": MODEL, "max_tokens": 100, "messages": MESSAGES}
ROUTE = "/v1/chat/completions"
# The provider answers "count" on its stdin with how many API calls it has received.
_COUNTING_PROVIDER = _PROVIDER.replace(
    "sys.stdin.read()  # until the benchmark closes our stdin",
    "for line in sys.stdin:\n    print(provider.call_count, flush=True)",
)


def ensure_litellm() -> str:
    """LiteLLM's proxy in its own virtual environment (built once); returns its version."""
    if not LITELLM.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    script = "from importlib.metadata import version as v; print(v('litellm'), v('uvicorn'), v('fastapi'))"
    return subprocess.run(
        [str(VENV / "bin" / "python"), "-c", script], capture_output=True, text=True, check=True
    ).stdout


class Provider:
    """The simulated provider in its own process, asked for its call count over stdin."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process, self.url = process, url

    def calls(self) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())


@contextmanager
def provider_process(latency: float, chunk_delay: float) -> Iterator[Provider]:
    with script_process(_COUNTING_PROVIDER, latency, chunk_delay) as (process, url):
        yield Provider(process, url)


@contextmanager
def server(name: str, command: list[str], port: int, health: str, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """Runs a server, waits for its health route; yields (its URL, its pid)."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for(name, url + health, process, log)
            yield url, process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _wait_for(name: str, url: str, process: subprocess.Popen[Any], log: IO[bytes]) -> None:
    deadline = time.monotonic() + 120  # LiteLLM's proxy takes about 30 s to start on 2 cores
    while True:
        try:
            if httpx2.get(url).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError(f"{name} did not start:\n{log.read().decode()[-4000:]}")
        time.sleep(0.2)


def _litellm_config(folder: str, provider_url: str, redis_url: str, namespace: str, key: str) -> Path:
    redis = urlsplit(redis_url)
    config = Path(folder) / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {provider_url}/v1
      api_key: bench
litellm_settings:
  cache: true
  cache_params:
    type: redis
    host: {redis.hostname}
    port: {redis.port}
    db: {int(redis.path.strip("/") or 0)}
    namespace: {namespace}
general_settings:
  master_key: {key}
"""
    )
    return config


def resident_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        for line in Path(f"/proc/{current}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


Call = Callable[[], Awaitable[Any]]


def _ask(
    client: httpx2.AsyncClient, url: str, headers: dict[str, str], check: Callable[[httpx2.Response], bool]
) -> Call:
    async def call() -> None:
        response = await client.post(url, json=BODY, headers=headers)
        assert response.status_code == 200 and check(response), (response.status_code, response.headers)

    return call


def _is_metrion_hit(response: httpx2.Response) -> bool:
    return response.headers.get("x-metrion-cache") == "HIT"


def _is_litellm_hit(response: httpx2.Response) -> bool:
    return "x-litellm-cache-key" in response.headers


async def _hits(urls: dict[str, str], headers: dict[str, str], provider: Provider, requests: int) -> dict[str, Any]:
    limits = httpx2.Limits(max_connections=max(CLIENTS), max_keepalive_connections=max(CLIENTS))
    async with httpx2.AsyncClient(limits=limits, timeout=60) as client:
        for url in urls.values():  # the one miss each; every later request is a hit
            assert (await client.post(url, json=BODY, headers=headers)).status_code == 200
        calls = provider.calls()
        paths = {
            "metrion": _ask(client, urls["metrion"], headers, _is_metrion_hit),
            "litellm": _ask(client, urls["litellm"], headers, _is_litellm_hit),
        }
        samples = await _interleaved(paths, requests, 20)
        rates: dict[str, dict[str, float]] = {name: {} for name in paths}
        for _ in range(2):  # each twice per concurrency, best kept
            for clients in CLIENTS:
                for name, call in paths.items():
                    rate = await _per_second(call, clients, requests)
                    rates[name][str(clients)] = max(rate, rates[name].get(str(clients), 0.0))
        assert provider.calls() == calls, "a hit reached the provider"
    latency = {
        name: {"p50_ms": ms(p50(v)), "p99_ms": ms(percentile(v, 0.99)), "n": len(v)} for name, v in samples.items()
    }
    return {"latency": latency, "per_second": rates}


async def _streams(urls: dict[str, str], headers: dict[str, str], provider: Provider, rounds: int) -> dict[str, Any]:
    """First byte of a streamed miss (a new question each time) and of a streamed hit."""

    async def first_byte(client: httpx2.AsyncClient, url: str, question: str) -> float:
        body = {**BODY, "stream": True, "messages": [{"role": "user", "content": question}]}
        started, first = time.perf_counter(), 0.0
        async with client.stream("POST", url, json=body, headers=headers) as response:
            assert response.status_code == 200, response.status_code
            async for _ in response.aiter_raw():
                first = first or time.perf_counter() - started
        return first

    def new_question() -> str:
        return f"Stream {uuid.uuid4().hex}: what are your delivery times?"

    misses: dict[str, list[float]] = {name: [] for name in urls}
    hits: dict[str, list[float]] = {name: [] for name in urls}
    async with httpx2.AsyncClient(timeout=60) as client:
        repeated = {name: new_question() for name in urls}
        for name, url in urls.items():
            await first_byte(client, url, repeated[name])  # the streamed entry every hit reads
            await first_byte(client, url, repeated[name])
        names = list(urls)
        for index in range(rounds):
            for name in names[index % 2 :] + names[: index % 2]:
                before = provider.calls()
                misses[name].append(await first_byte(client, urls[name], new_question()))
                assert provider.calls() == before + 1, f"{name}: a new question did not reach the provider"
                hits[name].append(await first_byte(client, urls[name], repeated[name]))
                assert provider.calls() == before + 1, f"{name}: a streamed hit reached the provider"
    return {
        name: {"miss_first_byte_p50_ms": ms(p50(misses[name])), "hit_first_byte_p50_ms": ms(p50(hits[name]))}
        for name in urls
    }


def _versions(litellm_versions: str) -> str:
    litellm, litellm_uvicorn, fastapi = litellm_versions.split()
    return (
        f"Python {platform.python_version()}; metrion-fixture {version('metrion-fixture')} "
        f"(uvicorn {version('uvicorn')}, httpx2 {version('httpx2')}); "
        f"litellm {litellm} (uvicorn {litellm_uvicorn}, fastapi {fastapi}); load average {os.getloadavg()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="hits per latency path and per concurrency")
    parser.add_argument("--streams", type=int, default=20, help="streamed misses and hits per proxy")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    versions = ensure_litellm()
    namespace = f"bench-vs-litellm-{uuid.uuid4().hex[:8]}"
    key = "sk-" + secrets.token_hex(32)
    headers = {"authorization": f"Bearer {key}", "x-metrion-cache": "true"}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("METRION_CACHE_", "METRION_PROXY_"))}
    ours, theirs = _free_port(), _free_port()
    try:
        with (
            tempfile.TemporaryDirectory() as folder,
            provider_process(0.1, 0.002) as provider,
            server(
                "metrion-cache serve",
                [sys.executable, "-m", "metrion_fixture.cli", "serve", "--port", str(ours), "--url", args.redis]
                + ["--namespace", namespace, "--upstream", f"openai={provider.url}"],
                ours,
                "/_metrion/health",
                base_env,
            ) as (metrion_url, metrion_pid),
            server(
                "LiteLLM's proxy",
                [str(LITELLM), "--config", str(_litellm_config(folder, provider.url, args.redis, namespace, key))]
                + ["--host", "127.0.0.1", "--port", str(theirs)],
                theirs,
                "/health/liveliness",
                {**base_env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
            ) as (litellm_url, litellm_pid),
        ):
            urls = {"metrion": metrion_url + "/openai" + ROUTE, "litellm": litellm_url + ROUTE}
            hits = asyncio.run(_hits(urls, headers, provider, args.requests))
            streams = asyncio.run(_streams(urls, headers, provider, args.streams))
            memory = {"metrion": resident_mib(metrion_pid), "litellm": resident_mib(litellm_pid)}
    finally:
        store = open_store(args.redis)
        for prefix in (f"{namespace}:", f"_ledger:{namespace}:"):
            store.delete_prefix(prefix)
    print(_versions(versions))
    rows: list[tuple[str, float, float, str, bool]] = []  # (measure, ours, theirs, unit, higher is better)
    for which in ("p50", "p99"):
        lat = hits["latency"]
        rows.append((f"hit latency {which}", lat["metrion"][f"{which}_ms"], lat["litellm"][f"{which}_ms"], "ms", False))
    for clients in CLIENTS:
        rate = hits["per_second"]
        rows.append(
            (f"hits/s, {clients} clients", rate["metrion"][str(clients)], rate["litellm"][str(clients)], "/s", True)
        )
    for kind in ("miss", "hit"):
        field = f"{kind}_first_byte_p50_ms"
        rows.append(
            (f"streamed {kind} first byte p50", streams["metrion"][field], streams["litellm"][field], "ms", False)
        )
    rows.append(("resident memory", memory["metrion"], memory["litellm"], "MiB", False))
    print(f"{'measure':<32} {'metrion':>13} {'litellm':>13}  {'metrion better by':>17}")
    for measure, mine, other, unit, higher in rows:
        better = mine / other if higher else other / mine  # > 1: ours is ahead
        print(f"{measure:<32} {mine:>9.2f} {unit:<3} {other:>9.2f} {unit:<3} {better:>16.2f}x")


if __name__ == "__main__":
    main()
