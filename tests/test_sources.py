"""Where calls come from (the script, the pytest test, a given name) and prompt previews, end to end.

Real SDK calls against the simulated provider; the records are read back from the ledger in the
store, the way `metrion-cache stats --by source` reads them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sdk_calls import QUESTION, call

import metrion_fixture
from metrion_fixture.cli import main
from metrion_fixture.runtime import sources
from metrion_fixture.runtime.ledger import read_records
from metrion_fixture.stores import open_store

pytest_plugins = ["pytester"]
TESTS = Path(__file__).parent
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

BATCH_SCRIPT = """
import sys

sys.path.insert(0, {tests!r})
from sdk_calls import call

import metrion_fixture

metrion_fixture.enable({url!r}, namespace="batch")
call("openai", {provider!r}, model="gpt-4o-mini")
call("openai", {provider!r}, model="gpt-4o-mini")
with metrion_fixture.cache({url!r}, namespace="batch", source="eval-run-7"):
    call("openai", {provider!r}, model="gpt-4o-mini", messages=[{{"role": "user", "content": "Do you ship to Norway?"}}])
"""


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_a_script_names_its_calls_and_stats_by_source_groups_them(tmp_path, provider, capsys):
    """A batch script's calls carry its file name; a block given source= carries that name instead."""
    url = f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    script = tmp_path / "nightly_batch.py"
    script.write_text(BATCH_SCRIPT.format(tests=str(TESTS), url=url, provider=provider.url))
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=120)

    records = read_records(open_store(url), "batch")
    assert [(r["source"], r["status"]) for r in records] == [
        ("nightly_batch.py", "MISS"),
        ("nightly_batch.py", "HIT"),
        ("eval-run-7", "MISS"),
    ]
    report = json.loads(run_cli(capsys, "stats", "--url", url, "--by", "source", "--json"))
    assert [(g["group"], g["requests"], g["hits"]) for g in report["groups"]] == [
        ("eval-run-7", 1, 0),
        ("nightly_batch.py", 2, 1),
    ]
    table = run_cli(capsys, "stats", "--url", url, "--by", "source").splitlines()
    assert table[1].split()[:4] == ["source", "requests", "hits", "hit"]
    assert table[3].split()[:4] == ["eval-run-7", "1", "0", "0%"]
    assert table[4].split()[:4] == ["nightly_batch.py", "2", "1", "50%"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["batch.py"], "batch.py"), (["/srv/jobs/eval.py", "--fast"], "eval.py"), (["-c"], "python -c"), ([""], "python")],
)
def test_a_scripts_name_is_its_file_name(argv, expected):
    assert sources.script_name(argv) == expected


def test_a_given_source_wins_and_the_option_is_checked(memory_url, provider):
    with metrion_fixture.cache(memory_url, source="support-bot") as session:
        call("anthropic", provider.url)
    assert session.source == "support-bot" and [r.source for r in session.calls] == ["support-bot"]
    with pytest.raises(metrion_fixture.MetrionCacheError, match="invalid source 'two\\\\nlines'; use a name of 1"):
        metrion_fixture.CacheSession(memory_url, source="two\nlines")


def test_the_source_variable_names_a_run(memory_url, monkeypatch, provider):
    monkeypatch.setenv("METRION_CACHE_SOURCE", "ci-nightly")
    with metrion_fixture.cache(memory_url) as session:
        call("openai", provider.url)
    assert [r.source for r in session.calls] == ["ci-nightly"]


def test_without_a_source_a_session_in_a_test_names_the_test(memory_url, provider, request):
    with metrion_fixture.cache(memory_url) as session:
        call("openai", provider.url)
    assert [r.source for r in session.calls] == [request.node.nodeid]


def test_a_long_or_multi_line_test_name_is_cut_to_a_source_the_option_accepts(memory_url, provider):
    name = "test_long.py::test_answer[line one\nline two-" + "x" * 300 + "-end]"
    with metrion_fixture.cache(memory_url) as session:
        sources.enter(name)
        try:
            call("openai", provider.url)
        finally:
            sources.leave(name)
    (record,) = session.calls
    assert len(record.source) == 200 and "\n" not in record.source
    assert record.source.startswith("test_long.py::test_answer[line one line two-xxx")
    assert record.source.endswith("xxx-end]") and "\u2026" in record.source
    assert metrion_fixture.CacheSession(memory_url, source=record.source).source == record.source


@pytest.fixture
def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


# -- previews --------------------------------------------------------------------------------------------------


def test_previews_are_kept_only_when_asked(tmp_path, provider, monkeypatch):
    url = f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    with metrion_fixture.cache(url, namespace="private"):
        call("openai", provider.url)
    with metrion_fixture.cache(url, namespace="previewed", store_previews=True):
        call("openai", provider.url)
    monkeypatch.setenv("METRION_CACHE_STORE_PREVIEWS", "1")
    with metrion_fixture.cache(url, namespace="from-env"):
        call("anthropic", provider.url, messages=[{"role": "user", "content": "x" * 100}])
    store = open_store(url)
    assert [r["preview"] for r in read_records(store, "private")] == [""]
    assert [r["preview"] for r in read_records(store, "previewed")] == [QUESTION[-1]["content"]]
    assert [r["preview"] for r in read_records(store, "from-env")] == ["x" * 60]


# -- pytest: each test names its calls -----------------------------------------------------------------------

PYTEST_FILE = """
import os

import openai
import pytest

import metrion_fixture

URL = os.environ["PROVIDER_URL"]
STORE = os.environ["STORE_URL"]
# A session made outside any test, as code under test may: each test renames it while it runs.
SHARED = metrion_fixture.enable(STORE, namespace="shared")


def ask(text):
    client = openai.OpenAI(base_url=URL + "/v1", api_key="sk-test", max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}])


def test_one():
    ask("one")


def test_two():
    ask("two")


def test_fixture(metrion_cache):
    ask("three")
    assert [call.source for call in metrion_cache.calls] == ["test_named.py::test_fixture"]


@pytest.mark.metrion_cache(source="smoke")
def test_marked(metrion_cache):
    ask("four")
    assert [call.source for call in metrion_cache.calls] == ["smoke"]


def test_zzz_last():
    metrion_fixture.disable()
    assert [call.source for call in SHARED.calls] == ["test_named.py::test_one", "test_named.py::test_two"]
"""


def test_each_pytest_test_names_its_calls_even_in_a_session_made_outside_it(pytester, provider, monkeypatch, tmp_path):
    monkeypatch.setenv("PROVIDER_URL", provider.url)
    monkeypatch.setenv("STORE_URL", f"memory://{uuid.uuid4().hex}")
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_named=PYTEST_FILE)
    result = pytester.runpytest_subprocess(*QUIET, f"--metrion-cache-url=sqlite:///{tmp_path / 'c.sqlite3'}")
    result.assert_outcomes(passed=5)
