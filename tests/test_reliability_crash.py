"""Crash safety and integrity: a killed writer leaves nothing visible and nothing immortal; damaged entries are misses."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sdk_calls import QUESTION, call

import metrion_fixture
from metrion_fixture.core import entry as entry_module
from metrion_fixture.core.entry import Entry
from metrion_fixture.stores import open_store
from metrion_fixture.testing.provider import SimulatedProvider

pytestmark = pytest.mark.slow  # run by .ci/run; skip in a quick local loop with -m 'not slow'

ROOT = Path(__file__).resolve().parents[1]

# A writer that streams through the cache and says when the first chunk reached it; the test then kills it.
STREAMING_CHILD = """
import sys
import anthropic
import metrion_fixture

url, namespace, base_url = sys.argv[1:4]
metrion_fixture.enable(url, namespace=namespace, single_flight_wait=1)  # its lock expires 2 s after it dies
client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-child", max_retries=0)
with client.messages.create(
    model="claude-test", max_tokens=100, stream=True,
    messages=[{"role": "user", "content": "What are your delivery times?"}],
) as events:
    for index, event in enumerate(events):
        if index == 0:
            print("FIRST", flush=True)
print("DONE", flush=True)
"""

# A writer that stores big answers in a loop as fast as it can; the test kills it at some point of a write.
LOOPING_CHILD = """
import sys
import anthropic
import metrion_fixture

url, namespace, base_url = sys.argv[1:4]
metrion_fixture.enable(url, namespace=namespace)
client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-child", max_retries=0)
for n in range(10_000):
    client.messages.create(
        model="claude-test", max_tokens=100, extra_headers={"x-simulate": "big"},
        messages=[{"role": "user", "content": f"question {n}"}],
    )
    print(n, flush=True)
"""


@pytest.fixture(scope="module")
def slow_provider() -> Iterator[SimulatedProvider]:
    """Streams one event every 0.2 s, so a writer can be killed mid-stream."""
    with SimulatedProvider(chunk_delay=0.2) as slow:
        yield slow


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> Iterator[str]:
    url = (
        f"sqlite:///{tmp_path / 'crash.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("redis_url")
    )
    yield url
    open_store(url).delete_prefix(f"{namespace}:")


def start_child(script: str, url: str, namespace: str, base_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, url, namespace, base_url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_9(child: subprocess.Popen[str]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


def raw_keys_and_ttls(url: str, namespace: str) -> dict[str, float]:
    """Every key under the namespace, read with the store's own client (not the cache), with its TTL in seconds."""
    if url.startswith("redis"):
        client = redis.Redis.from_url(url)
        return {key.decode(): client.pttl(key) / 1000 for key in client.scan_iter(match=f"{namespace}:*", count=1000)}
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found: dict[str, float] = {}
        for table in names:
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            if "key" in columns and "expires_at" in columns:
                rows = conn.execute(f"SELECT key, expires_at - strftime('%s','now') FROM {table}")
                found.update({key: ttl for key, ttl in rows if str(key).startswith(f"{namespace}:")})
            else:
                assert "key" not in columns, f"table {table} holds keys without an expiry"
        return found


def test_a_writer_killed_mid_stream_leaves_no_entry(slow_provider, provider, shared_url, namespace):
    """kill -9 after the first streamed chunk: no visible entry, no key without a TTL, and the next request is a clean MISS."""
    child = start_child(STREAMING_CHILD, shared_url, namespace, slow_provider.url)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == "FIRST", child.stderr.read() if child.stderr else ""
    finally:
        kill_9(child)

    left = open_store(shared_url).keys(f"{namespace}:")
    assert [key for key in left if not key.endswith(":lock")] == []  # at most its single-flight lock, which expires
    assert all(ttl > 0 for ttl in raw_keys_and_ttls(shared_url, namespace).values())

    with metrion_fixture.cache(shared_url, namespace=namespace) as session:
        after = call("anthropic", provider.url, stream=True, messages=QUESTION)  # same key, a fast provider
    assert after.cache == "MISS" and "delivery" in after.text
    assert session.stats.stored == 1


def test_a_writer_killed_between_or_during_writes_leaves_only_whole_entries(provider, shared_url, namespace):
    """kill -9 of a process storing 2 MiB entries in a loop: every visible entry decodes whole, every key expires."""
    child = start_child(LOOPING_CHILD, shared_url, namespace, provider.url)
    try:
        assert child.stdout is not None
        for _ in range(3):  # let it store a few, then kill it while it works on the next ones
            assert child.stdout.readline().strip(), child.stderr.read() if child.stderr else ""
    finally:
        kill_9(child)

    store = open_store(shared_url)
    every_key = store.keys(f"{namespace}:")
    keys = [key for key in every_key if not key.endswith(":lock")]  # its single-flight lock may remain, expiring
    assert len(keys) >= 3 and len(every_key) - len(keys) <= 1
    for key in keys:
        stored = Entry.decode(store.get(key))  # raises if any visible value is partial
        assert stored.status == 200 and stored.size > 1024 * 1024
    ttls = raw_keys_and_ttls(shared_url, namespace)
    assert set(every_key) <= set(ttls) and all(ttl > 0 for ttl in ttls.values())


def _unknown_version(good: bytes) -> bytes:
    decoded = Entry.decode(good)
    original = entry_module.FORMAT_VERSION
    entry_module.FORMAT_VERSION = original + 1
    try:
        value = decoded.encode()  # the same answer, written as the next version would write it
    finally:
        entry_module.FORMAT_VERSION = original
    assert b'"v":%d' % (original + 1) in value
    return value


def _wrong_chunk_count(good: bytes) -> bytes:
    import struct
    import zlib

    body = good[:-4]
    meta_length = struct.unpack(">I", body[4:8])[0]
    meta = json.loads(body[8 : 8 + meta_length])
    meta["chunks"] += 1
    new_meta = json.dumps(meta, separators=(",", ":")).encode()
    body = body[:4] + struct.pack(">I", len(new_meta)) + new_meta + body[8 + meta_length :]
    return body + struct.pack(">I", zlib.crc32(body))


DAMAGES = {
    "unknown-version": _unknown_version,
    "wrong-magic": lambda good: b"MFE9" + good[4:],
    "cut-after-checksum-fixed": lambda good: good[: len(good) // 3],
    "chunk-count-mismatch": _wrong_chunk_count,
    "no-checksum": lambda good: good[:-4],
    "one-byte": lambda good: good[:1],
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_entry_is_a_miss_and_is_overwritten(provider, session, namespace, damage, stream):
    """On every store: an entry of an unknown version, or damaged, is a MISS (never an exception), then replaced."""
    first = call("anthropic", provider.url, stream=stream)
    key = f"{namespace}:anthropic_messages:{'stream' if stream else 'json'}:{first.headers['x-metrion-cache-key']}"
    good = session.store.get(key)
    assert good is not None
    session.store.set(key, DAMAGES[damage](good), 3600)

    second = call("anthropic", provider.url, stream=stream)
    assert second.cache == "MISS" and second.text == first.text
    replaced = session.store.get(key)
    assert replaced is not None and Entry.decode(replaced).chunks  # a good entry again
    assert call("anthropic", provider.url, stream=stream).cache == "HIT"
    assert provider.call_count == 2


def test_an_entry_of_another_request_under_this_key_is_a_miss(provider, memory_session, namespace):
    """A whole, valid entry that belongs to another key (moved or copied by hand) is never replayed for this one."""
    first = call("anthropic", provider.url)
    other = call("anthropic", provider.url, messages=[{"role": "user", "content": "something else"}])
    key_of = lambda answer: f"{namespace}:anthropic_messages:json:{answer.headers['x-metrion-cache-key']}"
    memory_session.store.set(key_of(first), memory_session.store.get(key_of(other)), 3600)

    again = call("anthropic", provider.url)
    assert again.cache == "MISS" and again.text == first.text
    assert provider.call_count == 3
