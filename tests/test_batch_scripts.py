"""Batch scripts: the line printed at exit, on_call, and the README's progress-bar example, in real processes.

Scripts run as subprocesses (the line is printed by an atexit handler) against the simulated provider,
with the real anthropic / openai SDKs. tqdm is replaced by a fake bar that writes down what it was told.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Imported before any pytester run, as in test_pytest_plugin: modules first imported during an
# in-process run are dropped when its test ends.
import httpcore  # noqa: F401
import httpcore2  # noqa: F401
import openai
import pytest
from sdk_calls import call

import metrion_fixture
import metrion_fixture.api  # noqa: F401
import metrion_fixture.transports.httpx  # noqa: F401
import metrion_fixture.transports.httpx2  # noqa: F401
from metrion_fixture.core.stats import Stats
from metrion_fixture.reporting.reports import duration
from metrion_fixture.reporting.run_summary import summary_line
from metrion_fixture.runtime.activation import enabled_session

pytest_plugins = ["pytester"]
ROOT = Path(__file__).parent.parent
TESTS = Path(__file__).parent
SUMMARY = re.compile(
    r"^metrion cache: (?P<counts>[^;]+)(?:; saved (?P<tokens>[\d,]+) tokens \((?P<dollars>[^)]+)\))?; "
    r"provider time saved (?P<saved>[\d.]+ (?:s|min)) \(summed over calls, which overlap when concurrent\), "
    r"wall time (?P<wall>[\d.]+ (?:s|min))$"
)

FAKE_TQDM = '''
import json
import threading

class tqdm:
    """Writes down what a progress bar is told, and prints it as JSON when closed."""

    def __init__(self, total=None, unit="it"):
        self.total, self.unit, self.n, self.postfixes = total, unit, 0, []
        self._lock = threading.Lock()

    def update(self, n=1):
        with self._lock:
            self.n += n

    def set_postfix_str(self, text, refresh=True):
        with self._lock:
            self.postfixes.append(text)

    def close(self):
        print(json.dumps({"total": self.total, "unit": self.unit, "n": self.n, "postfixes": self.postfixes}))
'''


def readme_example(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    marker = f"<!-- readme-example: {name} -->\n```python\n"
    start = text.index(marker) + len(marker)
    return text[start : text.index("```", start)]


def run_script(tmp_path: Path, code: str, provider_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "batch_job.py"
    script.write_text(code)
    environment = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{tmp_path}:{TESTS}",
        "ANTHROPIC_BASE_URL": provider_url,
        "ANTHROPIC_API_KEY": "sk-ant-test",
        "METRION_CACHE_URL": f"sqlite:///{tmp_path / 'cache.sqlite3'}",
        **env,
    }
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_the_readme_progress_bar_moves_once_per_call_and_the_script_ends_with_one_summary_line(tmp_path, provider):
    (tmp_path / "tqdm.py").write_text(FAKE_TQDM)
    done = run_script(tmp_path, readme_example("progress-bar"), provider.url)
    assert done.returncode == 0, done.stderr
    bar = json.loads(done.stdout.strip().splitlines()[-1])
    # Three calls, the same question twice: the second is served from the cache (or waits for the first).
    assert (bar["total"], bar["unit"], bar["n"]) == (3, "call", 3)
    # What each call read from session.stats; threads finish in any order, so only the shape is fixed.
    assert len(bar["postfixes"]) == 3
    assert all(
        re.fullmatch(r"[01] from cache, (\$0\.00|\$0\.\d{4}|<\$0\.0001) saved", text) for text in bar["postfixes"]
    )
    assert any(text.startswith("1 from cache, $0.0") for text in bar["postfixes"]), bar["postfixes"]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    found = SUMMARY.match(lines[0])
    assert found is not None, lines[0]
    assert found["counts"] == "3 calls, 1 from cache, 2 from the provider"
    assert found["dollars"].startswith("$0.") and int(found["tokens"].replace(",", "")) > 0


REPORTED_SCRIPT = """
import metrion_fixture
from sdk_calls import call

metrion_fixture.enable({arguments})
call("anthropic", {url!r}, model="claude-haiku-4-5")
call("anthropic", {url!r}, model="claude-haiku-4-5")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arguments", "env", "line"),
    [
        ("", {}, True),
        ("report=False", {}, False),
        ("", {"METRION_CACHE_REPORT": "0"}, False),
        ("", {"METRION_CACHE_REPORT": "off"}, False),
        ("report=True", {"METRION_CACHE_REPORT": "0"}, True),
    ],
    ids=["default", "report=False", "env-0", "env-off", "argument-wins"],
)
def test_the_line_at_exit_is_on_unless_turned_off(tmp_path, provider, arguments, env, line):
    done = run_script(tmp_path, REPORTED_SCRIPT.format(arguments=arguments, url=provider.url), provider.url, **env)
    assert done.returncode == 0, done.stderr
    if not line:
        assert done.stderr == ""
        return
    found = SUMMARY.match(done.stderr.strip())
    assert found is not None, done.stderr
    assert found["counts"] == "2 calls, 1 from cache, 1 from the provider"


@pytest.mark.slow
def test_a_bad_report_variable_is_refused_at_once(tmp_path, provider):
    done = run_script(
        tmp_path, REPORTED_SCRIPT.format(arguments="", url=provider.url), provider.url, METRION_CACHE_REPORT="later"
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "metrion_fixture.errors.MetrionCacheError: $METRION_CACHE_REPORT: invalid value 'later'; "
        "use 0 (no summary line at exit) or 1 (the default)"
    )


@pytest.mark.slow
def test_no_calls_says_so(tmp_path, provider):
    done = run_script(tmp_path, "import metrion_fixture\nmetrion_fixture.enable()\n", provider.url)
    assert re.fullmatch(r"metrion cache: no LLM calls reached the cache \(wall time \d+\.\d s\)\n", done.stderr)


# -- the line's text --------------------------------------------------------------------------------------------


def test_the_line_names_calls_hits_tokens_dollars_and_both_times():
    stats = Stats(hits=32, misses=6, refreshes=1, bypassed=1, saved_seconds=88.62, saved_input_tokens=40_000)
    stats.saved_output_tokens, stats.saved_usd = 11_200, 0.18432
    assert summary_line(stats, 10.31) == (
        "metrion cache: 40 calls, 32 from cache, 8 from the provider; saved 51,200 tokens ($0.1843); "
        "provider time saved 1.5 min (summed over calls, which overlap when concurrent), wall time 10.3 s"
    )


def test_the_line_for_one_call_refusals_and_a_model_without_a_price():
    stats = Stats(errors=1, saved_seconds=0.0)
    assert summary_line(stats, 0.42) == (
        "metrion cache: 1 call, 0 from cache, 0 from the provider, 1 refused by the cache; "
        "provider time saved 0.0 s (summed over calls, which overlap when concurrent), wall time 0.4 s"
    )
    unpriced = Stats(hits=1, misses=1, saved_seconds=1.5, saved_input_tokens=12, saved_output_tokens=30, unpriced=1)
    assert summary_line(unpriced, 3.0) == (
        "metrion cache: 2 calls, 1 from cache, 1 from the provider; saved 42 tokens (no price for their model); "
        "provider time saved 1.5 s (summed over calls, which overlap when concurrent), wall time 3.0 s"
    )


def test_a_tiny_saving_is_never_printed_as_zero_dollars():
    stats = Stats(hits=1, saved_input_tokens=3, saved_usd=0.0000021)
    assert "saved 3 tokens (<$0.0001)" in summary_line(stats, 1.0)


# -- on_call ------------------------------------------------------------------------------------------------------


def test_on_call_gets_each_calls_record_once_streams_and_hits_included(provider):
    seen = []
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", on_call=seen.append) as session:
        call("anthropic", provider.url, model="claude-haiku-4-5")
        call("anthropic", provider.url, model="claude-haiku-4-5")
        call("openai", provider.url, model="gpt-4o-mini", stream=True)
        call("openai", provider.url, model="gpt-4o-mini", stream=True)
    assert [(r.model, r.status, r.stream) for r in seen] == [
        ("claude-haiku-4-5", "MISS", False),
        ("claude-haiku-4-5", "HIT", False),
        ("gpt-4o-mini", "MISS", True),
        ("gpt-4o-mini", "HIT", True),
    ]
    assert seen[1].saved_usd and seen[1].saved_usd > 0 and seen[1].cost_usd == 0.0
    assert seen[1] is session.calls[1]


def test_on_call_gets_a_streamed_miss_once_with_its_tokens_not_before_it_ran(provider):
    seen = []
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", on_call=seen.append) as session:
        call("anthropic", provider.url, model="claude-haiku-4-5", stream=True)
    assert [(r.status, r.stream) for r in seen] == [("MISS", True)]
    assert seen[0].output_tokens and seen[0].output_tokens > 0
    assert seen[0].cost_usd and seen[0].cost_usd > 0
    assert seen[0] is session.calls[0]


def test_on_call_gets_an_abandoned_stream_once(provider):
    seen = []
    client = openai.OpenAI(base_url=provider.url + "/v1", api_key="sk-openai-test", max_retries=0)
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", on_call=seen.append) as session:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Left unread?"}], stream=True
        )
        next(iter(stream))
        stream.close()
        del stream
    assert [(r.status, r.stream) for r in seen] == [("MISS", True)]
    assert seen[0] is session.calls[0]


def test_an_on_call_that_raises_is_warned_about_once_and_the_calls_go_on(provider):
    def broken(record):
        raise KeyError("bar closed")

    with pytest.warns(RuntimeWarning, match=r"^metrion cache: on_call raised KeyError: 'bar closed'; the call went on"):
        with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", on_call=broken) as session:
            first = call("openai", provider.url)
            second = call("openai", provider.url)
    assert (first.cache, second.cache, session.stats.hits) == ("MISS", "HIT", 1)


def test_on_call_must_be_a_function():
    with pytest.raises(metrion_fixture.MetrionCacheError, match=r"^invalid on_call 'print'; use a function"):
        metrion_fixture.cache("memory://", on_call="print").__enter__()
    with pytest.raises(metrion_fixture.MetrionCacheError, match=r"^invalid report 'no'; use True"):
        metrion_fixture.enable("memory://", report="no")  # type: ignore[arg-type]
    assert enabled_session() is None


# -- saved_seconds is a sum: with threads it exceeds the wall time --------------------------------------------


@pytest.mark.slow
def test_with_8_threads_provider_time_saved_overstates_the_wall_clock_gain(provider):
    """The reading the line asks for: 8 concurrent 1 s answers, once cached, save 8 s of provider time, not of wall time."""
    provider.latency = 1.0
    questions = [[{"role": "user", "content": f"Question {n}?"}] for n in range(8)]
    client = openai.OpenAI(base_url=provider.url + "/v1", api_key="sk-openai-test", max_retries=0)
    lock = threading.Lock()
    moved = []

    def tick(record):
        with lock:
            moved.append(record.status)

    def ask(messages):
        return call("openai", provider.url, messages=messages, client=client)

    session = metrion_fixture.enable(f"memory://{uuid.uuid4().hex}", on_call=tick, report=False)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(ask, questions))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(ask, questions))
    finally:
        metrion_fixture.disable()
        provider.latency = 0.0
    saved, wall = session.stats.saved_seconds, session.wall_seconds
    assert moved == ["MISS"] * 8 + ["HIT"] * 8
    assert saved >= 8 * 1.0, "the sum of the 8 answers' provider time, though they overlapped"
    # Not compared with a measured wall time (a loaded machine stretches it): the line names both.
    line = summary_line(session.stats, wall)
    assert line.endswith(
        f"provider time saved {duration(saved)} (summed over calls, which overlap when concurrent), "
        f"wall time {duration(wall)}"
    )


# -- the pytest summary prints the run's wall time beside the provider time saved ---------------------------


def test_the_pytest_summary_shows_the_wall_time_beside_the_provider_time_saved(pytester, provider, monkeypatch):
    monkeypatch.setenv("PROVIDER_URL", provider.url)
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        """
        import os

        import openai


        def test_twice(metrion_cache):
            client = openai.OpenAI(base_url=os.environ["PROVIDER_URL"] + "/v1", api_key="sk-test", max_retries=0)
            for _ in range(2):
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--metrion-cache-url=memory://{uuid.uuid4().hex}")
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines(
        [
            r"^1 test used the cache: 2 requests: 1 hit, 1 miss, 0 refreshes, 0 errors; provider time saved "
            r"\d+\.\d\d s \(summed over calls\), wall time \d+\.\d s$"
        ]
    )
