"""The benchmark command runs end to end (with tiny counts) and writes the JSON it promises.

No timing is asserted here: ``--smoke`` only proves that every measure still runs
against the current code and reports the keys the README documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
MEASURES = {"hit_overhead", "scale", "streams", "miss", "concurrency", "storage", "proxy", "first_read"}


def test_benchmark_smoke_run_writes_every_measure(tmp_path, redis_url):
    """`benchmarks/run.py --smoke` exits 0, prints the table and writes JSON with all eight measures."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--redis", REDIS_URL, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "measure" in done.stdout and "hit overhead" in done.stdout

    report = json.loads(out.read_text())
    assert set(report["measures"]) == MEASURES
    assert report["meta"]["smoke"] is True
    measured = {row["measure"] for row in report["rows"]}
    assert measured >= {"hit overhead", "streams", "miss overhead", "concurrency", "storage", "proxy", "first read"}
    for row in report["rows"]:
        assert row["value"] >= 0 and isinstance(row["case"], str)
        if row["baseline"]:
            assert row["ratio"] == row["value"] / row["baseline"]

    hits = report["measures"]["hit_overhead"]
    assert {"floor", "memory", "sqlite", "redis"} <= set(hits)
    assert all(hits[name]["p50_ms"] > 0 and hits[name]["p99_ms"] >= hits[name]["p50_ms"] for name in hits)
    storage = report["measures"]["storage"]
    assert all(case["stored_bytes"] > case["answer_bytes"] > 0 for case in storage.values())
    # Scale fills dedicated Redis DBs only when they are empty; otherwise it says why it skipped.
    redis_scale = report["measures"]["scale"]["redis"]
    assert "skipped" in redis_scale or all(size["dbsize"] == int(name) for name, size in redis_scale.items())
    cold = report["measures"]["concurrency"]["cold_stampede"]
    assert 1 <= cold["provider_calls"] <= cold["requests"]
    proxied = report["measures"]["proxy"]
    assert set(proxied["per_second"]["proxy hit"]) == {"1", "8", "64"}
    assert proxied["latency"]["proxy hit"]["p50_ms"] > 0 and proxied["streamed_miss"]["proxy miss"]["n"] > 0
    first = report["measures"]["first_read"]  # every read a hit of an entry another process wrote
    assert first["hits"]["redis_p50_ms"] > 0 and first["streams"]["redis_first_p50_ms"] > 0
    assert set(first["rates"]) == {"1", "8", "64"} and all(rate["redis"] > 0 for rate in first["rates"].values())


def test_long_stream_entry_decodes_to_the_same_chunks_and_rejects_damage():
    """A stored stream of thousands of chunks (cut lazily on replay) reads back as exactly its chunks."""
    import struct
    import zlib

    from metrion_fixture.core.entry import CorruptEntry, Entry

    chunks = [f"event: e\ndata: {index}\n\n".encode() for index in range(1000)]
    entry = Entry(200, [("content-type", "text/event-stream")], chunks, True, 1.0, 60, "m", "anthropic_messages", "k")
    value = entry.encode()
    decoded = Entry.decode(value)
    assert decoded == entry and decoded.chunks == chunks and chunks == decoded.chunks
    assert len(decoded.chunks) == 1000 and decoded.chunks[-1] == chunks[-1] and decoded.chunks[10:13] == chunks[10:13]
    assert list(decoded.chunks) == chunks and decoded.size == sum(map(len, chunks))
    assert Entry.decode(decoded.encode()) == entry

    # Damaged values are refused at decode: a truncated one, and one whose lengths do not add up.
    for cut in (4, 100, len(value) // 2):
        try:
            Entry.decode(value[:-cut])
        except CorruptEntry:
            pass
        else:
            raise AssertionError(f"a value cut by {cut} bytes was accepted")
    body = bytearray(value[:-4])
    (meta_length,) = struct.unpack_from(">I", body, 4)
    struct.pack_into(">I", body, 8 + meta_length, len(chunks[0]) + 7)  # first chunk claims 7 more bytes
    forged = bytes(body) + struct.pack(">I", zlib.crc32(bytes(body)))  # with a valid checksum
    try:
        Entry.decode(forged)
    except CorruptEntry:
        pass
    else:
        raise AssertionError("a value whose chunk lengths do not add up was accepted")
