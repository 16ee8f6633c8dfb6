"""Bulk warm-up (issue 15): does fetching a test run's entries in one round trip shorten the run?

Generates a suite of N tests (default 200, in 10 files), each making one anthropic SDK call with a
prompt of its own through the cache (``metrion_cache_all``), answered on a miss by an in-process
``httpx2.MockTransport``. One run fills the store (misses) and one more reads every entry (hits),
both with the warm-up on, so the store holds what each test read last time. Then fresh ``pytest``
processes run the suite again, alternately without and with the warm-up (order swapped every
round), every test a hit (checked by the tests themselves): the run's wall time (the whole process,
as a user waits for it), the session's time in the process (conftest import to session end), the
sum of the tests' setup + call + teardown times and of their call times, and the warm-up's own time.

Done twice: on Redis as given (loopback), and through a TCP relay started here that holds every
chunk ``--delay-ms`` in each direction (a Redis on another host; no ``tc netem``, which would slow
every user of loopback). The relay's own round trip is measured (``PING`` p50) and printed.

    .venv/bin/python benchmarks/warmup.py [--redis redis://127.0.0.1:6379/15] [--rounds 6] [--smoke]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HERE = Path(__file__).parent
FILES = 10

CONFTEST = """
import json, os, time

import anthropic
import httpx2
import pytest

ANSWER = {answer!r}
RESULTS = {{"setup": 0.0, "call": 0.0, "teardown": 0.0, "started": time.perf_counter()}}


@pytest.fixture(scope="session")
def client():
    answer = json.dumps(ANSWER).encode()
    transport = httpx2.MockTransport(
        lambda request: httpx2.Response(200, headers=[("content-type", "application/json")], content=answer)
    )
    return anthropic.Anthropic(api_key="bench", http_client=httpx2.Client(transport=transport), max_retries=0)


def pytest_runtest_logreport(report):
    RESULTS[report.when] += report.duration


@pytest.hookimpl(wrapper=True)
def pytest_collection_finish(session):
    # Around every implementation, the warm-up's included (with the imports a first test would make).
    started = time.perf_counter()
    try:
        return (yield)
    finally:
        RESULTS["warmup"] = time.perf_counter() - started


def pytest_sessionfinish(session):
    RESULTS["session"] = time.perf_counter() - RESULTS.pop("started")
    RESULTS["failed"] = session.testsfailed
    with open(os.environ["BENCH_RESULTS"], "w") as out:
        json.dump(RESULTS, out)
"""

TEST = """
import os

EXPECT = os.environ.get("BENCH_EXPECT", "")


def ask(client, number):
    raw = client.messages.with_raw_response.create(
        model="claude-bench",
        max_tokens=100,
        messages=[{{"role": "user", "content": f"Warm-up benchmark question number {{number}}?"}}],
    )
    if EXPECT:
        assert raw.headers["x-metrion-cache"] == EXPECT
    return raw.parse()
{tests}
"""


def write_suite(folder: Path, tests: int, namespace: str) -> None:
    from common import ANSWER

    (folder / "conftest.py").write_text(CONFTEST.format(answer=ANSWER))
    (folder / "pytest.ini").write_text(
        f"[pytest]\nmetrion_cache_all = true\nmetrion_cache_namespace = {namespace}\n"
        "addopts = -q -p no:cacheprovider -p no:randomly\n"
    )
    per_file = -(-tests // FILES)
    for number in range(FILES):
        numbers = range(number * per_file, min(tests, (number + 1) * per_file))
        body = "".join(f"\n\ndef test_question_{n}(client):\n    ask(client, {n})\n" for n in numbers)
        (folder / f"test_llm_{number}.py").write_text(TEST.format(tests=body))


# -- the relay -------------------------------------------------------------------------------------


class Relay:
    """A TCP relay to ``target`` that delivers every chunk ``delay`` seconds after it arrived, in order."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()

        def read() -> None:
            while True:
                try:
                    data = source.recv(65536)
                except OSError:
                    data = b""
                with ready:
                    queue.append((time.perf_counter() + self.delay, data))
                    ready.notify()
                if not data:
                    return

        def send() -> None:
            while True:
                with ready:
                    while not queue:
                        ready.wait()
                    due, data = queue.popleft()
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=send, daemon=True).start()

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{netloc[0]}{netloc[1]}127.0.0.1:{self.port}"))


def ping_p50_ms(url: str, count: int = 200) -> float:
    import redis

    client = redis.Redis.from_url(url)
    client.ping()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - started)
    client.close()
    return statistics.median(samples) * 1000


def bookkeeping_ms(url: str, namespace: str, tests: int, count: int = 10) -> dict[str, float]:
    """p50s, each on a fresh connection: reading the warm-up's index (what the warm-up adds before its
    one pipeline, which replaces the first reads), and, for comparison, finding the previous run in the
    ledger instead (a SCAN of the whole database, then the newest batches): the first prototype's way."""
    from metrion_fixture.runtime import warmup
    from metrion_fixture.stores.redis import RedisStore

    samples: dict[str, list[float]] = {"index": [], "ledger": []}
    for _ in range(count):
        for name in samples:
            store = RedisStore(url)
            store.get_many(["_bench_connect"])  # the connections, which a run has anyway
            store._sync().ping()
            started = time.perf_counter()
            if name == "index":
                warmup.read_index(store, namespace)
            else:
                batches = sorted(store.keys(f"_ledger:{namespace}:"), reverse=True)[:tests]
                [json.loads(line) for value in store.get_many(batches) for line in (value or b"").splitlines()]
            samples[name].append(time.perf_counter() - started)
            store.close()
    return {name: statistics.median(values) * 1000 for name, values in samples.items()}


# -- the runs --------------------------------------------------------------------------------------


def run_suite(folder: Path, url: str, warmup: bool | None, expect: str = "HIT") -> dict[str, Any]:
    results = folder / f"results-{uuid.uuid4().hex[:8]}.json"
    env = {
        **os.environ,
        "METRION_CACHE_URL": url,
        "BENCH_RESULTS": str(results),
        "BENCH_EXPECT": expect,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [sys.executable, "-m", "pytest", str(folder)]
    if warmup:
        command.append("--metrion-cache-warmup")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=folder, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"pytest failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    data = json.loads(results.read_text())
    results.unlink()
    warmed = re.search(r"warm-up: (\d+) entr", done.stdout)
    data["warmed"] = int(warmed.group(1)) if warmed else 0
    if bool(warmup and expect == "HIT") != bool(data["warmed"]):
        raise RuntimeError(f"the warm-up was {'not ' if warmup else ''}expected:\n{done.stdout[-3000:]}")
    data["wall"] = wall
    data["tests_total"] = data["setup"] + data["call"] + data["teardown"]
    return data


def compare(folder: Path, url: str, rounds: int) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for index in range(rounds):
        order = ("off", "on") if index % 2 == 0 else ("on", "off")
        for name in order:
            samples[name].append(run_suite(folder, url, warmup=name == "on"))
    summary: dict[str, Any] = {"rounds": rounds}
    summary["warmed"] = [sample.get("warmed") for sample in samples["on"]]
    summary["collection_finish_ms"] = {
        name: statistics.median(sample["warmup"] for sample in samples[name]) * 1000 for name in samples
    }
    for figure in ("wall", "session", "tests_total", "call"):
        off = [sample[figure] for sample in samples["off"]]
        on = [sample[figure] for sample in samples["on"]]
        ratios = [b / a for a, b in zip(off, on, strict=True)]
        summary[figure] = {
            "off_ms": statistics.median(off) * 1000,
            "on_ms": statistics.median(on) * 1000,
            "ratio_median": statistics.median(ratios),
            "ratios": [round(r, 3) for r in ratios],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6, help="pairs of runs (without / with) per Redis")
    parser.add_argument("--delay-ms", type=float, default=0.5, help="the relay's delay in each direction")
    parser.add_argument("--smoke", action="store_true", help="20 tests, 1 round: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.tests, args.rounds = 20, 1
    sys.path.insert(0, str(HERE))

    import anthropic
    import httpx2
    import redis

    from metrion_fixture.runtime.session import CacheSession

    where = urlsplit(args.redis)
    relay = Relay((where.hostname or "127.0.0.1", where.port or 6379), args.delay_ms / 1000)
    targets = {"loopback": args.redis, f"relayed (+{args.delay_ms:g} ms each way)": relay.url(args.redis)}
    report: dict[str, Any] = {
        "tests": args.tests,
        "python": platform.python_version(),
        "versions": {
            "anthropic": anthropic.__version__,
            "httpx2": getattr(httpx2, "__version__", "?"),
            "redis-py": redis.__version__,
            "redis-server": redis.Redis.from_url(args.redis).info("server")["redis_version"],
        },
        "load_before": os.getloadavg(),
        "targets": {},
    }
    for name, url in targets.items():
        namespace = f"bench-warm-{uuid.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_suite(folder, args.tests, namespace)
            try:
                run_suite(folder, url, warmup=True, expect="MISS")  # fills the store, notes what each test read
                run_suite(folder, url, warmup=True)  # a previous run of the same tests, all hits
                result = compare(folder, url, args.rounds)
                result["ping_p50_ms"] = ping_p50_ms(url)
                result["bookkeeping_ms"] = bookkeeping_ms(url, namespace, args.tests)
                result["db_keys"] = redis.Redis.from_url(args.redis).dbsize()
                report["targets"][name] = result
            finally:
                session = CacheSession(args.redis, namespace=namespace)
                session.clear()
                session.store.delete_prefix(f"_ledger:{namespace}:")
                session.store.delete(f"_warmup:{namespace}")
    report["load_after"] = os.getloadavg()

    print(f"{args.tests} tests, every one a hit; Python {report['python']}, {report['versions']}")
    print(f"load average before {report['load_before']}, after {report['load_after']}")
    for name, result in report["targets"].items():
        print(f"\n{name}: Redis PING p50 {result['ping_p50_ms']:.3f} ms, {result['rounds']} rounds")
        hook = result["collection_finish_ms"]
        print(
            f"  warm-up: entries kept {result['warmed']}; collection_finish hooks {hook['off']:.1f} ms without, "
            f"{hook['on']:.1f} ms with (imports included); reading the index p50 "
            f"{result['bookkeeping_ms']['index']:.2f} ms (finding the last run in the ledger instead: "
            f"{result['bookkeeping_ms']['ledger']:.1f} ms, with {result['db_keys']} keys in the database)"
        )
        for figure in ("wall", "session", "tests_total", "call"):
            row = result[figure]
            print(
                f"  {figure:<12} without {row['off_ms']:8.1f} ms  with {row['on_ms']:8.1f} ms  "
                f"with/without {row['ratio_median']:.3f}  (each round: {row['ratios']})"
            )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
