"""The main job, offline: the demo shows the miss, then the hits, on the embedded store."""

from __future__ import annotations

import io
import subprocess
import sys

from metrion_fixture.core.records import Usage
from metrion_fixture.demo.faq_bot import DEMO_MODEL, run_demo
from metrion_fixture.reporting.prices import cost_usd
from metrion_fixture.reporting.reports import money


def test_demo_story_misses_once_per_question_then_hits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METRION_CACHE_URL", raising=False)
    out = io.StringIO()

    rows = run_demo(latency=0.05, out=out)

    assert [row.cache for row in rows] == ["MISS", "HIT", "HIT", "MISS", "HIT"]
    assert [row.streamed for row in rows] == [False, False, False, True, True]
    assert (tmp_path / ".metrion_cache" / "cache.sqlite3").exists()  # the embedded default store
    assert "2 reached the provider, 3 answered by the cache" in out.getvalue()
    assert rows[0].input_tokens > 0 and rows[1].input_tokens == rows[0].input_tokens


def test_demo_shows_the_dollars_spent_and_saved(tmp_path, monkeypatch):
    """The first thing a newcomer sees has dollars: the demo's model has a list price."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METRION_CACHE_URL", raising=False)
    out = io.StringIO()
    rows = run_demo(latency=0.0, out=out)

    def dollars(chosen):
        return sum(cost_usd(DEMO_MODEL, Usage(row.input_tokens, row.output_tokens)) or 0.0 for row in chosen)

    hits = [row for row in rows if row.cache == "HIT"]
    spent, saved = dollars(row for row in rows if row.cache == "MISS"), dollars(hits)
    saved_tokens = sum(row.input_tokens + row.output_tokens for row in hits)
    assert saved > 0
    assert (
        f"Spent {money(spent)} at the provider; the cache saved {money(saved)} ({saved_tokens} tokens) "
        f"at {DEMO_MODEL}'s list price." in out.getvalue()
    )


def test_demo_runs_again_from_a_clean_slate(tmp_path, monkeypatch):
    """A second run clears its own namespace, so it still shows a real miss first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METRION_CACHE_URL", raising=False)
    run_demo(latency=0.0, out=io.StringIO())
    out = io.StringIO()
    rows = run_demo(latency=0.0, out=out)
    assert rows[0].cache == "MISS"
    assert "cleared 2 entries" in out.getvalue()


def test_metrion_cache_demo_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "metrion_fixture.cli", "demo", "--latency", "0.05"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "METRION_CACHE_URL": ""},
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("User ")]
    assert [line.split()[-5] if "HIT" in line else "MISS" for line in lines]  # one line per request
    assert [("HIT" if " HIT " in line else "MISS") for line in lines] == ["MISS", "HIT", "HIT", "MISS", "HIT"]


def test_bad_store_url_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "metrion_fixture.cli", "demo", "--url", "ftp://nowhere"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "metrion-cache:" in result.stderr and "redis://" in result.stderr
    assert "Traceback" not in result.stderr
