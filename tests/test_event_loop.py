"""The event loop is never blocked by the store: async requests go on while another process holds
SQLite's write lock, or while Redis does not answer, and the call ledger is written off the request path.

A heartbeat task ticks every 10 ms during each scenario and keeps the largest gap between two ticks
(less the time the machine gave the loop's thread no CPU): a store call made on the loop's thread while
the store waits (SQLite's busy timeout, a Redis socket timeout) shows as a gap of seconds. The 100 ms
bound is the promise itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis

import metrion_fixture
from metrion_fixture.core.stats import CallRecord
from metrion_fixture.runtime import ledger
from metrion_fixture.runtime.ledger import PREFIX, StoredLedger, read_records, retention_seconds
from metrion_fixture.stores import open_store, redis_tracking
from metrion_fixture.stores.memory import MemoryStore

LARGEST_GAP = 0.1  # seconds: the promise
PROVIDER = "http://llm.test/v1/messages"
OVERLOADED = "overloaded: "  # questions the provider answers with its 529, after the test lets it


class Heartbeat:
    """Ticks every 10 ms on the running loop; ``largest`` is the longest time between two ticks.

    Time the loop's thread spent runnable but waiting for a CPU (other processes on a busy machine:
    Linux's per-thread schedstat) is left out: that is the machine's load, not the loop being
    blocked, which a store call that waits (in a syscall, on a lock, for the GIL) is, and still shows.
    ``largest_wall`` is the gap as the clock saw it.
    """

    def __init__(self) -> None:
        self.largest = self.largest_wall = 0.0
        self.ticks = 0

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.create_task(self._beat())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _beat(self) -> None:
        schedstat = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")

        def waited_for_a_cpu() -> float:
            try:
                return int(schedstat.read_text().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                return 0.0  # not Linux, or no schedstats: the wall-clock gap it is

        last, last_waited = time.perf_counter(), waited_for_a_cpu()
        while True:
            await asyncio.sleep(0.01)
            now, waited = time.perf_counter(), waited_for_a_cpu()
            self.largest_wall = max(self.largest_wall, now - last)
            self.largest = max(self.largest, now - last - (waited - last_waited))
            self.ticks += 1
            last, last_waited = now, waited

    def stalled(self) -> str:
        return f"the event loop stalled for {self.largest * 1000:.0f} ms ({self.largest_wall * 1000:.0f} ms wall)"


class Provider:
    """An Anthropic-compatible provider behind an ``httpx2.MockTransport``, counting the questions it is asked."""

    def __init__(self) -> None:
        self.asked: Counter[str] = Counter()
        self.gate = asyncio.Event()  # the overloaded answers wait for it
        self.waiting = asyncio.Event()  # set once an overloaded question has arrived

    @staticmethod
    def answer(question: str) -> tuple[int, dict[str, Any]]:
        if question.startswith(OVERLOADED):
            return 529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        return 200, {
            "id": f"msg_{uuid.uuid5(uuid.NAMESPACE_OID, question).hex[:16]}",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": f"The answer to {question!r}."}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 12, "output_tokens": 7},
        }

    async def handle(self, request: httpx2.Request) -> httpx2.Response:
        question = json.loads(request.content)["messages"][0]["content"]
        self.asked[question] += 1
        if question.startswith(OVERLOADED):
            self.waiting.set()
            await self.gate.wait()
        await asyncio.sleep(0)  # a provider answers later, never at once
        status, body = self.answer(question)
        return httpx2.Response(status, json=body)


async def ask(client: httpx2.AsyncClient, question: str) -> tuple[str, int, Any, str | None]:
    body = {"model": "claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": question}]}
    response = await client.post(PROVIDER, json=body)
    return question, response.status_code, response.json(), response.headers.get("x-metrion-cache")


async def ask_all(client: httpx2.AsyncClient, questions: list[str], concurrency: int = 8) -> list[tuple[Any, ...]]:
    """Every question, by ``concurrency`` tasks at a time."""
    todo = list(reversed(questions))
    answers: list[tuple[Any, ...]] = []

    async def worker() -> None:
        while todo:
            answers.append(await ask(client, todo.pop()))
            await asyncio.sleep(0)  # a hit may complete without waiting for anything: let the others run

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def ask_at_once(client: httpx2.AsyncClient, question: str, times: int) -> list[tuple[Any, ...]]:
    """Identical cold requests at the same moment: one asks the provider (single flight), the others wait for it."""
    return list(await asyncio.gather(*(ask(client, question) for _ in range(times))))


def assert_provider_answers(answers: list[tuple[Any, ...]]) -> None:
    for question, status, body, _ in answers:
        assert (status, body) == Provider.answer(question), question


async def eventually(check: Callable[[], bool], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.02)


# --- SQLite: another process holds the write lock --------------------------------------------------

HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("HELD", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
"""


def test_async_requests_go_on_while_another_process_holds_the_sqlite_write_lock(tmp_path: Path) -> None:
    """Hits, misses, single flight and a full ledger batch while another process holds the write lock: no stall."""
    path = tmp_path / "cache.sqlite3"
    url, namespace = f"sqlite:///{path}", f"loop-{uuid.uuid4().hex[:8]}"
    warm = [f"warm question {n}" for n in range(50)]
    cold = [f"cold question {n}" for n in range(20)]
    shared = [f"shared question {n}" for n in range(3)]
    hits = warm * 5  # with the warm-up, more records than a ledger batch, all while the lock is held

    async def scenario() -> tuple[Heartbeat, list[tuple[Any, ...]], Provider, metrion_fixture.CacheSession]:
        provider = Provider()
        with metrion_fixture.cache(url, namespace=namespace) as session:
            async with Heartbeat() as heartbeat:
                async with httpx2.AsyncClient(transport=httpx2.MockTransport(provider.handle)) as client:
                    answers = await ask_all(client, warm)  # stored before the lock is taken
                    # A request that holds its single-flight lock while its provider is slow...
                    overloaded = asyncio.create_task(ask(client, OVERLOADED + "slow"))
                    await provider.waiting.wait()
                    holder = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", HOLDER, str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE
                    )
                    assert holder.stdin is not None and holder.stdout is not None
                    assert await holder.stdout.readline() == b"HELD\n"
                    # ...and releases it (no answer to store) while another process holds the write lock;
                    # meanwhile new questions take their locks and store their answers, and hits are served.
                    provider.gate.set()
                    misses = asyncio.gather(
                        ask_all(client, cold), *(ask_at_once(client, question, 5) for question in shared)
                    )
                    answers += await ask_all(client, hits)
                    holder.stdin.write(b"commit\n")  # before SQLite's busy timeout (5 s) fails the writers
                    await holder.stdin.drain()
                    for some in await misses:
                        answers += some
                    answers.append(await overloaded)
                    assert await holder.wait() == 0
            # The block's end, on the loop: the ledger write it asks for is not made here either.
        return heartbeat, answers, provider, session

    heartbeat, answers, provider, session = asyncio.run(scenario())

    assert heartbeat.largest < LARGEST_GAP, heartbeat.stalled()
    assert len(answers) == len(warm) + len(hits) + len(cold) + 5 * len(shared) + 1
    assert_provider_answers(answers)
    statuses = Counter(status for *_, status in answers)
    assert statuses["HIT"] == len(hits) + 4 * len(shared)
    # Each question reached the provider once: the identical ones waited for the first (single flight).
    assert set(provider.asked.values()) == {1} and len(provider.asked) == len(warm) + len(cold) + len(shared) + 1
    # Nothing was lost on the way to the ledger: written by its thread, the rest by a flush here.
    session.flush_ledger()
    assert len(read_records(open_store(url), namespace)) == len(answers)


def test_a_cancelled_lock_acquire_does_not_leave_the_lock_taken(tmp_path: Path) -> None:
    """A request cancelled while its single-flight lock is being taken (off the loop) does not leave the lock
    held until it expires, which every identical request would wait for."""
    path = tmp_path / "cache.sqlite3"
    store = open_store(f"sqlite:///{path}")
    store.set("ns:warm", b"v", 60)  # the file is prepared
    finished = threading.Event()
    acquire = store.acquire

    def watched_acquire(*args: Any) -> bool:
        try:
            return acquire(*args)
        finally:
            finished.set()

    store.acquire = watched_acquire  # type: ignore[method-assign]
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # another connection
    writer.execute("BEGIN IMMEDIATE")

    async def cancelled_while_waiting_for_the_write_lock() -> None:
        taking = asyncio.create_task(store.aacquire("ns:k:lock", "token", 60_000))
        await asyncio.sleep(0.2)
        taking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await taking
        writer.execute("COMMIT")  # now the acquire that went on takes the lock

    try:
        asyncio.run(cancelled_while_waiting_for_the_write_lock())
    finally:
        writer.close()
    assert finished.wait(30), "the acquire went on after the cancel"
    assert wait_for(lambda: not store.locked("ns:k:lock")), "the lock it took was released"


# --- Redis: the server stops answering --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, which it can stop (SIGSTOP): connections are accepted, nothing answers."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is needed to make a Redis hang (.ci/run installs Redis)")
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(30)


def test_async_requests_go_on_while_redis_does_not_answer(
    own_redis: tuple[str, subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests while Redis hangs get the provider's answer, and the near cache's reconnect does not stall the loop."""
    url, server = own_redis
    # An idle process lets its tracking connection go: the next read would set it up again.
    monkeypatch.setattr(redis_tracking, "IDLE_CLOSE", 0.3)
    namespace = f"loop-{uuid.uuid4().hex[:8]}"
    warm = [f"warm question {n}" for n in range(30)]
    shared = [f"shared question {n}" for n in range(3)]
    later = [f"later question {n}" for n in range(20)]

    async def scenario() -> tuple[Heartbeat, list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        provider = Provider()
        with metrion_fixture.cache(url, namespace=namespace) as session:
            near = getattr(session.store, "_near", None)
            async with Heartbeat() as heartbeat:
                async with httpx2.AsyncClient(transport=httpx2.MockTransport(provider.handle)) as client:
                    healthy = await ask_all(client, warm)
                    for question in shared:
                        healthy += await ask_at_once(client, question, 5)
                    healthy += await ask_all(client, warm * 7)
                    assert near is not None and near.tracking, "the near cache was in use"
                    await eventually(lambda: not near.tracking)  # idle: its connection closed
                    server.send_signal(signal.SIGSTOP)
                    hung = await ask_all(client, later + warm[:10])
        return heartbeat, healthy, hung

    heartbeat, healthy, hung = asyncio.run(scenario())

    assert heartbeat.largest < LARGEST_GAP, heartbeat.stalled()
    assert len(healthy) + len(hung) > ledger.BATCH_SIZE
    assert_provider_answers(healthy)
    assert_provider_answers(hung)
    assert Counter(status for *_, status in healthy)["HIT"] == 7 * len(warm) + 4 * len(shared)


# --- the ledger: written off the request path, never lost to one failed write ----------------------


def call_record(number: int) -> CallRecord:
    return CallRecord(
        key=f"{number:064d}",
        wire_format="anthropic_messages",
        model="claude-test",
        status="HIT",
        stream=False,
        latency=float(number),
        http_status=200,
        at=time.time(),
    )


class FailingOnce(MemoryStore):
    """A store whose first write fails: before storing anything, or (``after_storing``) once stored, as a
    Redis SET whose reply times out."""

    def __init__(self, after_storing: bool = False) -> None:
        super().__init__(f"memory://{uuid.uuid4().hex}")
        self.after_storing, self.failures = after_storing, 0
        self.writers: set[threading.Thread] = set()

    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        self.writers.add(threading.current_thread())
        if self.failures == 0:
            self.failures += 1
            if self.after_storing:
                super().set(key, value, ttl_seconds)
            raise ConnectionError("the store failed this once")
        super().set(key, value, ttl_seconds)


def wait_for(check: Callable[[], bool], within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while not check() and time.monotonic() < deadline:
        time.sleep(0.01)
    return check()


def test_a_ledger_write_that_fails_once_loses_nothing() -> None:
    """The records of a failed write stay pending, and the next flush writes them."""
    store = FailingOnce()
    sink = StoredLedger(store, "once", retention_seconds())
    for number in range(3):
        sink.add(call_record(number))
    assert sink.flush() == 0 and len(sink.pending) == 3 and sink.dropped == 0
    assert sink.flush() == 3 and sink.pending == []
    assert [record["latency"] for record in read_records(store, "once")] == [0.0, 1.0, 2.0]


def test_the_ledger_thread_retries_a_failed_batch_and_never_writes_it_twice() -> None:
    """A full batch is written by the ledger's thread; a write that failed after reaching the store is
    retried under the same key, so its records are counted once."""
    store = FailingOnce(after_storing=True)
    sink = StoredLedger(store, "retry", retention_seconds())
    for number in range(ledger.BATCH_SIZE):
        sink.add(call_record(number))
    assert wait_for(lambda: not sink.pending), "the ledger thread wrote the batch, after one retry"
    assert store.writers and threading.current_thread() not in store.writers, "never on the caller's thread"
    assert store.failures == 1 and sink.dropped == 0 and len(store.keys(f"{PREFIX}retry:")) == 1
    assert len(read_records(store, "retry")) == ledger.BATCH_SIZE


def test_a_retried_batch_holds_only_its_own_records_so_a_period_never_skips_newer_ones() -> None:
    """A write that failed after reaching the store is retried under its key with the same records;
    records added since go under a newer key, or ``since`` (which skips batches by their key's time)
    would drop them."""
    store = FailingOnce(after_storing=True)
    sink = StoredLedger(store, "period", retention_seconds())
    sink.add(call_record(0))
    assert sink.flush() == 0  # failed, though it reached the store
    time.sleep(0.01)
    since = time.time()
    newer = call_record(1)  # at >= since
    sink.add(newer)
    assert sink.flush() == 2 and sink.pending == []
    assert len(store.keys(f"{PREFIX}period:")) == 2
    assert [record["latency"] for record in read_records(store, "period")] == [0.0, 1.0], "nothing counted twice"
    assert [record["latency"] for record in read_records(store, "period", since=since)] == [1.0]


def test_a_flush_on_an_event_loop_is_left_to_the_ledger_thread() -> None:
    """flush() on a loop's thread returns at once; the ledger thread writes the records soon after."""
    store = MemoryStore(f"memory://{uuid.uuid4().hex}")
    sink = StoredLedger(store, "loop", retention_seconds())
    sink.add(call_record(1))

    async def flush_on_the_loop() -> int:
        return sink.flush()

    assert asyncio.run(flush_on_the_loop()) == 0
    assert wait_for(lambda: not sink.pending) and len(read_records(store, "loop")) == 1


def test_records_beyond_the_pending_bound_are_counted_as_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the store fails, the pending records are bounded; what does not fit is counted."""

    class Down(MemoryStore):
        def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
            raise ConnectionError("down")

    monkeypatch.setattr(ledger, "MAX_PENDING", 5)
    sink = StoredLedger(Down(f"memory://{uuid.uuid4().hex}"), "bounded", retention_seconds())
    for number in range(8):
        sink.add(call_record(number))
    assert sink.flush() == 0 and len(sink.pending) == 5 and sink.dropped == 3


_FORKED: StoredLedger | None = None


def _add_a_batch_in_child(done: Any) -> None:
    assert _FORKED is not None
    for number in range(ledger.BATCH_SIZE):
        _FORKED.add(call_record(1000 + number))
    done.put(wait_for(lambda: not _FORKED.pending))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_has_its_own_ledger_thread(tmp_path: Path) -> None:
    """A child forked while the parent's ledger thread runs writes its own batches, never the parent's records."""
    global _FORKED
    url = f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    sink = StoredLedger(open_store(url), "fork", retention_seconds())
    for number in range(ledger.BATCH_SIZE):
        sink.add(call_record(number))
    assert wait_for(lambda: not sink.pending), "the parent's ledger thread runs"
    sink.add(call_record(-1))  # pending in the parent when it forks
    context = multiprocessing.get_context("fork")
    done = context.Queue()
    _FORKED = sink
    try:
        child = context.Process(target=_add_a_batch_in_child, args=(done,))
        child.start()
        assert done.get(timeout=60) is True
        child.join(60)
        assert child.exitcode == 0
    finally:
        _FORKED = None
    latencies = sorted(record["latency"] for record in read_records(open_store(url), "fork"))
    assert latencies == [float(n) for n in range(ledger.BATCH_SIZE)] + [
        float(1000 + n) for n in range(ledger.BATCH_SIZE)
    ]
    assert sink.flush() == 1 and len(read_records(open_store(url), "fork")) == 1 + 2 * ledger.BATCH_SIZE


def test_the_ledger_thread_does_not_keep_a_process_alive(tmp_path: Path) -> None:
    """A script whose ledger thread runs (its store failing) still exits, after its last flush."""
    script = """
import sys, threading, time
from metrion_fixture.core.stats import CallRecord
from metrion_fixture.runtime import ledger
from metrion_fixture.runtime.ledger import StoredLedger
from metrion_fixture.stores import open_store

class Down:
    def set(self, *args):
        raise ConnectionError("down")

def record(number):
    return CallRecord(key="k" * 64, wire_format="openai_chat", model="m", status="HIT", stream=False,
                      latency=float(number), http_status=200, at=time.time())

failing = StoredLedger(Down(), "exit", 60)
for number in range(ledger.BATCH_SIZE):
    failing.add(record(number))
assert "metrion-ledger" in [thread.name for thread in threading.enumerate()]
kept = StoredLedger(open_store(sys.argv[1]), "exit", 60)
kept.add(record(7))
"""
    url = f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    done = subprocess.run([sys.executable, "-c", script, url], timeout=120, env={**os.environ})
    assert done.returncode == 0
    assert [record["latency"] for record in read_records(open_store(url), "exit")] == [7.0], "written at exit"
