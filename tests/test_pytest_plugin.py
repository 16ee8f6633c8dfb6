"""The pytest plugin, driven as users drive it: small example suites run by pytester.

The example suites call the real anthropic and openai SDKs against the loopback
simulated provider (its URL reaches them through an environment variable), and
each test here counts what reached the provider.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any
from xml.etree import ElementTree

# anthropic, openai, httpcore, httpcore2 and the metrion transports and stores are imported here,
# before any test runs, on purpose: pytester drops every module first imported while a Pytester
# is alive (in its in-process runs) when that test ends; re-importing them in every run is slow,
# and the fresh copies (new exception and transport classes) confuse this process's other tests.
import anthropic  # noqa: F401
import httpcore  # noqa: F401
import httpcore2  # noqa: F401
import openai  # noqa: F401
import pytest
import redis

import metrion_fixture.api  # not imported by the package itself any more: loaded on first use
import metrion_fixture.stores.redis
import metrion_fixture.stores.sqlite
import metrion_fixture.transports.httpx
import metrion_fixture.transports.httpx2  # noqa: F401
from metrion_fixture import cache_key
from metrion_fixture.reporting.reports import money
from metrion_fixture.stores import open_store

pytest_plugins = ["pytester"]

PROVIDER_ENV = "METRION_TEST_PROVIDER_URL"
# Plugins the example runs do not need; hypothesis' would re-import hypothesis on every in-process run.
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

LLM_HELPERS = """
import os

import anthropic
import openai

URL = os.environ["METRION_TEST_PROVIDER_URL"]


def ask_anthropic(question, stream=False):
    client = anthropic.Anthropic(base_url=URL, api_key="sk-ant-test", max_retries=0)
    messages = [{"role": "user", "content": question}]
    if stream:
        with client.messages.stream(model="claude-test", max_tokens=100, messages=messages) as events:
            return "".join(events.text_stream)
    return client.messages.create(model="claude-test", max_tokens=100, messages=messages).content[0].text


def ask_openai(question, stream=False):
    client = openai.OpenAI(base_url=URL + "/v1", api_key="sk-openai-test", max_retries=0)
    messages = [{"role": "user", "content": question}]
    if stream:
        chunks = client.chat.completions.create(model="gpt-test", messages=messages, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(model="gpt-test", messages=messages).choices[0].message.content


async def aask_anthropic(question, stream=False):
    async with anthropic.AsyncAnthropic(base_url=URL, api_key="sk-ant-test", max_retries=0) as client:
        messages = [{"role": "user", "content": question}]
        if stream:
            async with client.messages.stream(model="claude-test", max_tokens=100, messages=messages) as events:
                return "".join([piece async for piece in events.text_stream])
        message = await client.messages.create(model="claude-test", max_tokens=100, messages=messages)
        return message.content[0].text


async def aask_openai(question, stream=False):
    async with openai.AsyncOpenAI(base_url=URL + "/v1", api_key="sk-openai-test", max_retries=0) as client:
        messages = [{"role": "user", "content": question}]
        if stream:
            chunks = await client.chat.completions.create(model="gpt-test", messages=messages, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        completion = await client.chat.completions.create(model="gpt-test", messages=messages)
        return completion.choices[0].message.content
"""

# Four tests, both SDKs, streamed and not, through the fixture and through the marker.
SUITE = """
import pytest

from llm import ask_anthropic, ask_openai


def test_anthropic(metrion_cache):
    assert "delivery" in ask_anthropic("What are your delivery times?")
    assert len(metrion_cache.calls) == 1  # the fixture returns this test's own session


def test_anthropic_stream(metrion_cache):
    assert "return" in ask_anthropic("Can I return an item?", stream=True)


@pytest.mark.metrion_cache
def test_openai():
    assert "abroad" in ask_openai("Do you ship abroad?")


@pytest.mark.metrion_cache
def test_openai_stream():
    assert "payment" in ask_openai("Which payment methods do you take?", stream=True)
"""

NEW_TEST = """

def test_new_question(metrion_cache):
    assert ask_openai("A question nobody recorded")
"""

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, provider, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A project whose tests call the SDKs against the loopback provider; no cache settings in the environment."""
    monkeypatch.setenv(PROVIDER_ENV, provider.url)
    for name in ("METRION_CACHE_URL", "METRION_CACHE_MODE"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeini(INI)
    pytester.makepyfile(llm=LLM_HELPERS)
    return pytester


@pytest.fixture
def redis_namespace(redis_url: str) -> Iterator[str]:
    namespace = f"plugin-{uuid.uuid4().hex[:12]}"
    yield namespace
    open_store(redis_url).delete_prefix(f"{namespace}:")


def run(pytester: pytest.Pytester, provider, *args: str) -> tuple[pytest.RunResult, int]:
    """One in-process pytest run of the example project; returns it and how many LLM calls reached the provider."""
    provider.reset()
    result = pytester.runpytest_inprocess(*QUIET, *args)
    return result, provider.call_count


def summary(result: pytest.RunResult) -> str:
    lines = [line for line in result.outlines if " used the cache: " in line]
    assert len(lines) == 1, result.stdout.str()
    return lines[0]


def test_second_run_calls_the_provider_zero_times(suite, provider):
    """Run 1 fills the embedded store under the rootdir; run 2 is answered by it and passes."""
    suite.makepyfile(test_llm=SUITE)

    first, calls = run(suite, provider)
    first.assert_outcomes(passed=4)
    assert calls == 4
    assert "4 requests: 0 hits, 4 misses" in summary(first)
    assert (suite.path / ".metrion_cache" / "cache.sqlite3").exists()

    second, calls = run(suite, provider, "-v")
    second.assert_outcomes(passed=4)
    assert calls == 0
    line = summary(second)
    assert "4 tests used the cache: 4 requests: 4 hits, 0 misses, 0 refreshes, 0 errors" in line
    assert re.search(r"provider time saved \d+\.\d\d s", line)
    # claude-test and gpt-test have no price: their dollars are unknown, never $0.
    assert re.search(
        r"^tokens spent 0 in / 0 out \(\$0\.00\), tokens saved [1-9][\d,]* in / [1-9][\d,]* out \(unknown\) at list prices$",
        second.stdout.str(),
        re.M,
    )
    assert "called the provider" not in second.stdout.str()  # -v lists misses, and there were none


def test_replay_passes_when_cached_and_fails_exactly_the_uncached_test(suite, provider):
    """--metrion-cache=replay: no provider call; the one uncached test fails, naming the test, model, key and the fix."""
    url = f"memory://{uuid.uuid4().hex}"
    suite.makepyfile(test_llm=SUITE)
    run(suite, provider, f"--metrion-cache-url={url}")

    cached, calls = run(suite, provider, f"--metrion-cache-url={url}", "--metrion-cache=replay")
    cached.assert_outcomes(passed=4)
    assert calls == 0

    suite.makepyfile(test_llm=SUITE + NEW_TEST)
    replay, calls = run(suite, provider, f"--metrion-cache-url={url}", "--metrion-cache=replay")
    replay.assert_outcomes(passed=4, failed=1)
    key = cache_key("gpt-test", [{"role": "user", "content": "A question nobody recorded"}])
    assert calls == 0
    assert [line.split()[1] for line in replay.outlines if line.startswith("FAILED ")] == [
        "test_llm.py::test_new_question"
    ]
    output = replay.stdout.str()
    # The cache's message is the failure, and the short summary says replay miss, not the SDK's exception.
    failed = [line for line in replay.outlines if line.startswith("FAILED")]
    assert failed[0].startswith("FAILED test_llm.py::test_new_question - metrion cache replay miss"), failed
    assert "BadRequestError" not in failed[0]
    verbose, _ = run(suite, provider, f"--metrion-cache-url={url}", "--metrion-cache=replay", "-vv")  # untruncated
    assert (
        "FAILED test_llm.py::test_new_question - "
        f"metrion cache replay miss: model 'gpt-test' (key {key[:12]}) is not in the cache"
    ) in verbose.outlines
    assert "_base_client.py" not in output, "no SDK traceback"
    assert re.search(
        r"\(the test stopped at test_llm\.py:\d+ on BadRequestError: the SDK's form of this refusal", output
    )
    assert "test_llm.py::test_new_question asked for 1 answer that is not in the cache" in output
    assert "holds no answers at all" not in output, "the store has answers: no restore hint"
    assert f"model 'gpt-test'  key {key}" in output
    assert f"pytest --metrion-cache=true --metrion-cache-url={url} test_llm.py::test_new_question" in output
    assert "4 hits, 0 misses, 0 refreshes, 1 error" in summary(replay)
    assert "replay: 1 request could not be answered (1 not cached" in output


def test_refresh_calls_the_provider_again(suite, provider):
    """--metrion-cache=refresh sends every request and replaces the entries."""
    url = f"memory://{uuid.uuid4().hex}"
    suite.makepyfile(test_llm=SUITE)
    run(suite, provider, f"--metrion-cache-url={url}")

    refresh, calls = run(suite, provider, f"--metrion-cache-url={url}", "--metrion-cache=refresh")
    refresh.assert_outcomes(passed=4)
    assert calls == 4
    assert "0 hits, 0 misses, 4 refreshes" in summary(refresh)


MARKED = """
import pytest

from llm import ask_anthropic, ask_openai

pytestmark = pytest.mark.metrion_cache(namespace="from-module")


def test_module_marker_and_command_line(metrion_cache, request):
    assert metrion_cache.mode == request.config.getoption("metrion_cache_mode")
    assert metrion_cache.settings.namespace == "from-module"
    assert metrion_cache.settings.ttl == 7200
    assert ask_anthropic("What are your delivery times?")


@pytest.mark.metrion_cache(mode="refresh", ttl="1h")
class TestMarkedClass:
    def test_class_marker(self, metrion_cache):
        assert (metrion_cache.mode, metrion_cache.settings.ttl) == ("refresh", 3600)
        assert ask_openai("Refreshed by the class marker")

    @pytest.mark.metrion_cache(mode="true", namespace="from-function")
    def test_closest_marker_wins(self, metrion_cache):
        assert (metrion_cache.mode, metrion_cache.settings.namespace) == ("true", "from-function")
        assert metrion_cache.settings.ttl == 3600
        assert ask_openai("Cached by the function marker")
"""


def test_marker_settings_override_the_command_line(suite, provider):
    """Marker > command line, closest marker first (function, class, module); works under --strict-markers."""
    url = f"memory://{uuid.uuid4().hex}"
    suite.makepyfile(test_marked=MARKED)
    options = ("--strict-markers", f"--metrion-cache-url={url}", "--metrion-cache-ttl=7200")

    fill, _ = run(suite, provider, *options, "--metrion-cache=true")
    fill.assert_outcomes(passed=3)

    locked, calls = run(suite, provider, *options, "--metrion-cache=replay")
    locked.assert_outcomes(passed=3)
    assert calls == 1  # only the class marker's refresh reached the provider
    assert "2 hits, 0 misses, 1 refresh" in summary(locked)


MARKED_REPLAY = """
import pytest

from llm import ask_anthropic


@pytest.mark.metrion_cache(mode="replay")
def test_locked_by_its_marker():
    ask_anthropic("Never recorded, and locked by the marker")
"""


def test_replay_miss_under_a_replay_marker_says_to_change_the_marker(suite, provider):
    """When the marker set replay, the command line cannot record it: the message says to change the marker."""
    suite.makepyfile(test_locked=MARKED_REPLAY)
    result, calls = run(suite, provider, f"--metrion-cache-url=memory://{uuid.uuid4().hex}")
    result.assert_outcomes(failed=1)
    assert calls == 0
    output = result.stdout.str()
    assert "test_locked.py::test_locked_by_its_marker asked for 1 answer that is not in the cache" in output
    assert "Its metrion_cache marker sets mode='replay': set it to 'true'" in output


BAD_MARKERS = """
import pytest


@pytest.mark.metrion_cache(mode="sometimes")
def test_bad_mode(metrion_cache):
    pass


@pytest.mark.metrion_cache(ttl_seconds=60)
def test_unknown_argument():
    pass
"""


def test_bad_marker_settings_error_the_test_clearly(suite, provider):
    """A marker with a bad value or an unknown argument errors its own test, naming the marker, not the run."""
    suite.makepyfile(test_bad=BAD_MARKERS)
    result, _ = run(suite, provider, f"--metrion-cache-url=memory://{uuid.uuid4().hex}")
    result.assert_outcomes(errors=2)
    output = result.stdout.str()
    assert "metrion cache: @pytest.mark.metrion_cache(mode=...): unknown cache mode 'sometimes'" in output
    assert (
        "metrion cache: unknown metrion_cache marker argument(s) ttl_seconds; use mode, ttl, namespace, url" in output
    )


SETTINGS = """
import os


def test_settings(metrion_cache):
    expected = os.environ["EXPECTED"].split()
    assert [metrion_cache.url, metrion_cache.mode, metrion_cache.settings.namespace] == expected
"""


def test_ini_beats_environment_and_command_line_beats_ini(suite, provider, monkeypatch):
    """The documented order: command line > ini > environment > defaults."""
    suite.makepyfile(test_settings=SETTINGS)
    monkeypatch.setenv("METRION_CACHE_URL", "memory://from-env")
    monkeypatch.setenv("METRION_CACHE_MODE", "replay")

    monkeypatch.setenv("EXPECTED", "memory://from-env replay metrion")
    run(suite, provider)[0].assert_outcomes(passed=1)

    suite.makeini(
        INI + "metrion_cache_url = memory://from-ini\nmetrion_cache_mode = refresh\n"
        "metrion_cache_namespace = from-ini\n"
    )
    monkeypatch.setenv("EXPECTED", "memory://from-ini refresh from-ini")
    run(suite, provider)[0].assert_outcomes(passed=1)

    monkeypatch.setenv("EXPECTED", "memory://from-cli off from-cli")
    cli = ("--metrion-cache-url=memory://from-cli", "--metrion-cache=off", "--metrion-cache-namespace=from-cli")
    result, _ = run(suite, provider, *cli)
    result.assert_outcomes(passed=1)
    assert "metrion cache: mode=off (command line), url=memory://from-cli (command line)" in result.stdout.str()

    bad, _ = run(suite, provider, "--metrion-cache=yes")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "metrion cache: --metrion-cache: unknown cache mode 'yes'" in bad.stderr.str()


PLAIN = """
import os

from metrion_fixture.integrations import patching

from llm import ask_openai


def test_plain():
    assert patching.installed() == (os.environ["EXPECT_CACHE"] == "on")
    assert ask_openai("A test that never asked for the cache")
"""


def test_nothing_is_patched_unless_asked_and_cache_all_turns_it_on(suite, provider, monkeypatch):
    """A test without the fixture or marker is untouched; --metrion-cache-all caches it."""
    url = f"memory://{uuid.uuid4().hex}"
    suite.makepyfile(test_plain=PLAIN)
    monkeypatch.setenv("EXPECT_CACHE", "off")
    plain, calls = run(suite, provider, f"--metrion-cache-url={url}")
    plain.assert_outcomes(passed=1)
    assert calls == 1 and "used the cache" not in plain.stdout.str()

    monkeypatch.setenv("EXPECT_CACHE", "on")
    for expected_calls in (1, 0):
        result, calls = run(suite, provider, f"--metrion-cache-url={url}", "--metrion-cache-all")
        result.assert_outcomes(passed=1)
        assert calls == expected_calls


ASYNC_SUITE = """
import asyncio

import pytest

from llm import aask_anthropic, aask_openai

LOOPS = []


async def test_asyncio_anthropic_stream(metrion_cache):
    LOOPS.append(asyncio.get_running_loop())
    assert "delivery" in await aask_anthropic("What are your delivery times?", stream=True)


async def test_asyncio_openai(metrion_cache):
    LOOPS.append(asyncio.get_running_loop())
    assert await aask_openai("Asked from asyncio")


@pytest.mark.anyio
async def test_anyio_openai_stream(metrion_cache):
    assert await aask_openai("Asked from anyio", stream=True)


@pytest.mark.anyio
@pytest.mark.metrion_cache
async def test_anyio_anthropic():
    assert await aask_anthropic("Asked from anyio too")


def test_asyncio_tests_ran_on_their_own_loops():
    assert len(LOOPS) == 2 and LOOPS[0] is not LOOPS[1]
"""


def test_async_tests_on_their_own_loops(suite, provider, redis_url, redis_namespace):
    """pytest-asyncio and anyio tests, each on its own loop, share one Redis store: run 2 makes no call."""
    suite.makepyfile(test_async=ASYNC_SUITE)
    options = (f"--metrion-cache-url={redis_url}", f"--metrion-cache-namespace={redis_namespace}")

    first, calls = run(suite, provider, *options)
    first.assert_outcomes(passed=5)
    assert calls == 4

    second, calls = run(suite, provider, *options)
    second.assert_outcomes(passed=5)
    assert calls == 0
    assert "4 hits, 0 misses" in summary(second)


def test_xdist_totals_add_up_across_workers(suite, provider, redis_url, redis_namespace):
    """Under pytest-xdist -n 2 the summary is the sum of both workers' sessions."""
    suite.makepyfile(test_llm=SUITE)
    options = (f"--metrion-cache-url={redis_url}", f"--metrion-cache-namespace={redis_namespace}")
    run(suite, provider, *options, "-k", "test_anthropic")  # caches the two Anthropic tests

    provider.reset()
    result = suite.runpytest_subprocess(*QUIET, "-n", "2", "-v", *options)
    result.assert_outcomes(passed=4)
    assert provider.call_count == 2
    assert "4 tests used the cache: 4 requests: 2 hits, 2 misses, 0 refreshes, 0 errors" in summary(result)
    listed = [line.split()[0] for line in result.outlines if line.startswith("  test_llm.py::")]
    assert sorted(listed) == ["test_llm.py::test_openai", "test_llm.py::test_openai_stream"]


@pytest.mark.slow
def test_replay_misses_under_xdist_keep_the_cache_message_and_headline(suite, provider, redis_url, redis_namespace):
    """Under pytest-xdist -n 2 the workers' replay-miss failures reach the controller whole: text and headline."""
    suite.makepyfile(test_llm=SUITE)
    options = (f"--metrion-cache-url={redis_url}", f"--metrion-cache-namespace={redis_namespace}")
    provider.reset()
    result = suite.runpytest_subprocess(*QUIET, "-n", "2", "-vv", "--metrion-cache=replay", *options)
    result.assert_outcomes(failed=4)
    assert provider.call_count == 0
    failed = [line for line in result.outlines if line.startswith("FAILED ")]
    headline = re.compile(
        r" - metrion cache replay miss: model '(gpt|claude)-test' \(key [0-9a-f]{12}\) is not in the cache$"
    )
    assert len(failed) == 4 and all(headline.search(line) for line in failed), failed
    assert "asked for 1 answer that is not in the cache" in result.stdout.str()
    assert "replay: the store holds no answers at all" in result.stdout.str()


def test_redis_down_true_mode_passes_and_says_so(suite, provider):
    """An unreachable Redis is no cache: the tests pass on the provider, and the summary says why."""
    suite.makepyfile(test_llm=SUITE)
    result, calls = run(suite, provider, "--metrion-cache-url=redis://127.0.0.1:1")
    result.assert_outcomes(passed=4)
    assert calls == 4
    assert "the cache store was unreachable (redis://127.0.0.1:1" in result.stdout.str()
    assert "4 requests went to the provider without it" in result.stdout.str()


def test_redis_down_replay_fails_the_tests_clearly(suite, provider):
    """In replay mode an unreachable store fails the tests that needed it, saying the store could not be read."""
    suite.makepyfile(test_llm=SUITE)
    result, calls = run(suite, provider, "--metrion-cache-url=redis://127.0.0.1:1", "--metrion-cache=replay")
    result.assert_outcomes(failed=4)
    assert calls == 0
    output = result.stdout.str()
    assert "test_llm.py::test_openai: the cache store redis://127.0.0.1:1 could not be read" in output
    failed = [line for line in result.outlines if line.startswith("FAILED test_llm.py::test_openai ")]
    assert failed[0].startswith("FAILED test_llm.py::test_openai - metrion cache replay: the store "), failed
    assert "replay: 4 requests could not be answered (0 not cached, 4 with the store unreachable)" in output


STARTUP_PROBE = """
import sys


def pytest_sessionfinish(session):
    loaded = sorted(name for name in ("httpx", "httpx2", "redis", "anthropic", "openai") if name in sys.modules)
    print("LOADED:", ",".join(loaded) or "none")
"""


def test_pytest_start_up_imports_no_http_or_redis_client(pytester, monkeypatch):
    """The plugin is loaded in every pytest run: with no test using it, it imports neither httpx nor redis."""
    monkeypatch.setenv("METRION_CACHE_URL", "redis://127.0.0.1:6379/0")
    pytester.makeconftest(STARTUP_PROBE)
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess(*QUIET, "-s")
    result.assert_outcomes(passed=1)
    assert "metrion-fixture" in result.stdout.str()  # the entry point did load the plugin
    assert "LOADED: none" in result.stdout.str()


LONG_ID = """
import pytest

from llm import ask_openai


@pytest.mark.parametrize("question", ["Do you ship abroad?"], ids=["abroad-" + "x" * 293])
def test_long_id(metrion_cache, request, question):
    assert ask_openai(question)
    nodeid = request.node.nodeid
    assert len(nodeid) > 300
    # Cut in the middle to 200 characters: the file and test at the start, the parameter's end at the end.
    expected = nodeid[:99] + "\u2026" + nodeid[-100:]
    assert [call.source for call in metrion_cache.calls] == [expected]
"""


def test_a_test_with_a_long_node_id_runs_and_its_records_name_it_cut(suite, provider):
    """The node id is the records' source, and a source holds 200 characters: a long id is cut, never an error."""
    suite.makepyfile(test_long=LONG_ID)
    result, calls = run(suite, provider, f"--metrion-cache-url=memory://{uuid.uuid4().hex}")
    result.assert_outcomes(passed=1)
    assert calls == 1


PRICED = """
import os

import openai


def test_priced():
    client = openai.OpenAI(base_url=os.environ["METRION_TEST_PROVIDER_URL"] + "/v1", api_key="sk-test", max_retries=0)
    messages = [{"role": "user", "content": "What are your delivery times?"}]
    assert client.chat.completions.create(model="gpt-4o", messages=messages).choices[0].message.content
"""

TOKENS = re.compile(
    r"^tokens spent ([\d,]+) in / ([\d,]+) out \(([^)]+)\), tokens saved ([\d,]+) in / ([\d,]+) out \(([^)]+)\)"
)


def test_the_summary_shows_tokens_and_dollars_spent_then_saved(suite, provider):
    """A priced model: run 1 spends tokens and dollars, run 2 saves the same, both in the shared money format."""
    from metrion_fixture.reporting import prices

    url = f"memory://{uuid.uuid4().hex}"
    suite.makepyfile(test_priced=PRICED)
    first, _ = run(suite, provider, f"--metrion-cache-url={url}", "--metrion-cache-all")
    second, calls = run(suite, provider, f"--metrion-cache-url={url}", "--metrion-cache-all")
    assert calls == 0
    spent = next(match for line in first.outlines if (match := TOKENS.match(line)))
    saved = next(match for line in second.outlines if (match := TOKENS.match(line)))
    price = prices.price_for("gpt-4o")
    tokens_in, tokens_out = int(spent[1].replace(",", "")), int(spent[2].replace(",", ""))
    expected = money((tokens_in * price.input + tokens_out * price.output) / 1e6)
    assert expected.startswith("$0.0") and tokens_in > 0 and tokens_out > 0
    assert (spent[3], spent[4], spent[5], spent[6]) == (expected, "0", "0", "$0.00")
    assert (saved[1], saved[2], saved[3], saved[4], saved[5], saved[6]) == (
        "0",
        "0",
        "$0.00",
        spent[1],
        spent[2],
        expected,
    )


def test_replay_against_an_empty_store_says_the_restore_step_did_not_run(suite, provider):
    """An empty store in replay: each failure and the summary say so and point at the CI cache restore step."""
    suite.makepyfile(test_llm=SUITE)
    result, calls = run(suite, provider, f"--metrion-cache-url=memory://{uuid.uuid4().hex}", "--metrion-cache=replay")
    result.assert_outcomes(failed=4)
    assert calls == 0
    hint = (
        "the store holds no answers at all: if this runs in CI, the step that restores the cache before pytest "
        "did not run or found nothing (e.g. actions/cache with path .metrion_cache)."
    )
    assert result.outlines.count(hint) == 4, "in each test's failure"
    assert f"replay: {hint}" in result.outlines


def test_require_store_stops_the_run_when_the_store_is_unreachable(suite, provider):
    """--metrion-cache-require-store: an unreachable store fails the run before any test calls the provider."""
    suite.makepyfile(test_llm=SUITE)
    result, calls = run(suite, provider, "--metrion-cache-url=redis://127.0.0.1:1", "--metrion-cache-require-store")
    assert result.ret == pytest.ExitCode.TESTS_FAILED and calls == 0
    assert not any(line.startswith("test_llm.py") for line in result.outlines), "no test ran"
    assert re.search(
        r"metrion cache: the store redis://127\.0\.0\.1:1 is unreachable \(\w+: .+\) and "
        r"--metrion-cache-require-store is set",
        result.stderr.str(),
    ), result.stderr.str()


MARKED_DOWN = """
import pytest

from llm import ask_openai


@pytest.mark.metrion_cache(url="redis://127.0.0.1:1")
def test_store_down_midway():
    assert ask_openai("Asked while the marker's store is down")
"""


def test_require_store_fails_a_run_whose_tests_lost_the_store(suite, provider):
    """The run's store answers, a test's store does not: the tests pass on the provider, the run fails, and says why."""
    suite.makepyfile(test_down=MARKED_DOWN)
    options = (f"--metrion-cache-url=memory://{uuid.uuid4().hex}",)
    plain, _ = run(suite, provider, *options)
    assert plain.ret == pytest.ExitCode.OK, "without the option an unreachable store is no cache, not a failure"
    result, calls = run(suite, provider, *options, "--metrion-cache-require-store")
    result.assert_outcomes(passed=1)
    assert calls == 1 and result.ret == pytest.ExitCode.TESTS_FAILED
    assert "the run fails: the cache store was unreachable and --metrion-cache-require-store is set" in result.outlines


def test_the_run_figures_go_into_junit_xml_properties(suite, provider):
    """--junitxml: the summary's figures are testsuite properties named metrion_cache_*."""
    url = f"memory://{uuid.uuid4().hex}"
    suite.makepyfile(test_llm=SUITE, test_priced=PRICED)
    run(suite, provider, f"--metrion-cache-url={url}", "-k", "anthropic or priced", "--metrion-cache-all")
    result, _ = run(suite, provider, f"--metrion-cache-url={url}", "--metrion-cache-all", "--junitxml=report.xml")
    result.assert_outcomes(passed=5)
    root = ElementTree.parse(suite.path / "report.xml").getroot()
    properties = {
        p.get("name"): p.get("value") for p in root.iter("property") if p.get("name", "").startswith("metrion")
    }
    assert {name: properties[f"metrion_cache_{name}"] for name in ("tests", "requests", "hits", "misses")} == {
        "tests": "5",
        "requests": "5",
        "hits": "3",
        "misses": "2",
    }
    line = next(line for line in result.outlines if line.startswith("tokens spent"))
    saved = TOKENS.match(line)
    assert properties["metrion_cache_saved_input_tokens"] == saved[4].replace(",", "")
    assert saved[6] == money(float(properties["metrion_cache_saved_usd"])) + " + unknown"
    assert properties["metrion_cache_unpriced_saved"] == "2", "the two claude-test hits have no price"


# --- --metrion-cache-warmup: the previous run's entries in one round trip --------------------------

WARM_SUITE = """
import pytest

from llm import ask_anthropic


@pytest.mark.metrion_cache
@pytest.mark.parametrize("number", range(4))
def test_question(number):
    assert "Warm-up question" in ask_anthropic(f"Warm-up question {number}?")
"""


@pytest.fixture
def entry_reads(monkeypatch: pytest.MonkeyPatch, redis_namespace: str) -> list[list[str]]:
    """Each round trip of this process's Redis stores that reads cache entries: the entries' keys."""
    sent: list[list[str]] = []
    store_class = metrion_fixture.stores.redis.RedisStore
    pipelined = store_class._pipelined

    def spy(self: Any, *commands: tuple[Any, ...], **options: Any) -> list[Any]:
        read = [str(command[1]) for command in commands if command[0] == "GET"]
        if any(key.startswith(f"{redis_namespace}:") for key in read):
            sent.append(read)
        return pipelined(self, *commands, **options)

    monkeypatch.setattr(store_class, "_pipelined", spy)
    return sent


@pytest.fixture
def warm_suite(suite, provider, redis_url, redis_namespace) -> Iterator[tuple[str, ...]]:
    """The four-test suite, its entries stored by a first run with the warm-up on; yields the run's options."""
    suite.makepyfile(test_warm=WARM_SUITE)
    options = (f"--metrion-cache-url={redis_url}", f"--metrion-cache-namespace={redis_namespace}")
    first, calls = run(suite, provider, *options, "--metrion-cache-warmup")
    first.assert_outcomes(passed=4)
    assert calls == 4
    assert not any(line.startswith("warm-up:") for line in first.outlines)  # nothing known yet
    yield options
    store = open_store(redis_url)
    store.delete_prefix(f"_ledger:{redis_namespace}:")
    store.delete(f"_warmup:{redis_namespace}")


def test_warmup_reads_the_previous_runs_entries_in_one_round_trip(suite, provider, warm_suite, entry_reads):
    without, calls = run(suite, provider, *warm_suite)
    assert calls == 0 and "4 hits" in summary(without)
    assert len(entry_reads) == 4, "without the warm-up, each test's first read is a round trip"
    assert not any(line.startswith("warm-up:") for line in without.outlines)

    entry_reads.clear()
    warmed, calls = run(suite, provider, *warm_suite, "--metrion-cache-warmup")
    warmed.assert_outcomes(passed=4)
    assert calls == 0 and "4 hits" in summary(warmed)
    assert [len(read) for read in entry_reads] == [4], "the four entries in one round trip, then none"
    assert "warm-up: 4 entries read ahead in one round trip" in warmed.outlines

    entry_reads.clear()
    subset, calls = run(suite, provider, *warm_suite, "--metrion-cache-warmup", "-k", "question[1] or question[2]")
    subset.assert_outcomes(passed=2, deselected=2)
    assert calls == 0 and [len(read) for read in entry_reads] == [2], "only the entries of the tests collected"


def test_warmup_never_serves_an_entry_changed_since(suite, provider, warm_suite, redis_url, redis_namespace):
    """Entries changed by another client after the previous run: one overwritten, one deleted. The
    warm-up reads what is there now; both tests ask the provider again, the other two are hits."""
    keys = json.loads(redis.Redis.from_url(redis_url).get(f"_warmup:{redis_namespace}"))
    other = redis.Redis.from_url(redis_url)
    assert other.set(keys["test_warm.py::test_question[1]"][0], b"changed by another client", ex=60, xx=True)
    assert other.delete(keys["test_warm.py::test_question[2]"][0]) == 1
    other.close()
    result, calls = run(suite, provider, *warm_suite, "--metrion-cache-warmup")
    result.assert_outcomes(passed=4)
    assert calls == 2
    assert "2 hits, 2 misses" in summary(result)
    assert "warm-up: 3 entries read ahead in one round trip" in result.outlines  # what was there: 3 values


@pytest.mark.parametrize("index", [None, b"not json"], ids=["missing", "damaged"])
def test_warmup_with_no_usable_index_reads_as_before(
    suite, provider, warm_suite, redis_url, redis_namespace, entry_reads, index
):
    """An index that is gone or damaged warms nothing: the tests read as they would have, and the run
    writes a good one for the next."""
    store = open_store(redis_url)
    store.delete(f"_warmup:{redis_namespace}")
    if index is not None:
        store.set(f"_warmup:{redis_namespace}", index, 60)
    result, calls = run(suite, provider, *warm_suite, "--metrion-cache-warmup")
    result.assert_outcomes(passed=4)
    assert calls == 0 and "4 hits" in summary(result)
    assert len(entry_reads) == 4 and not any(line.startswith("warm-up:") for line in result.outlines)
    again, _ = run(suite, provider, *warm_suite, "--metrion-cache-warmup")
    assert "warm-up: 4 entries read ahead in one round trip" in again.outlines


def test_warmup_with_redis_down_only_costs_its_attempt(suite, provider):
    suite.makepyfile(test_warm=WARM_SUITE)
    result, calls = run(suite, provider, "--metrion-cache-url=redis://127.0.0.1:1", "--metrion-cache-warmup")
    result.assert_outcomes(passed=4)
    assert calls == 4
    assert not any(line.startswith("warm-up:") for line in result.outlines)


@pytest.mark.slow
def test_warmup_under_xdist(suite, provider, redis_url, redis_namespace):
    """The controller writes the index with every worker's tests; each worker then warms up."""
    suite.makepyfile(test_warm=WARM_SUITE)
    options = (f"--metrion-cache-url={redis_url}", f"--metrion-cache-namespace={redis_namespace}")
    try:
        for expected_calls in (4, 0):
            provider.reset()
            result = suite.runpytest_subprocess(*QUIET, "-n", "2", "--metrion-cache-warmup", *options)
            result.assert_outcomes(passed=4)
            assert provider.call_count == expected_calls
        assert "warm-up: 4 entries read ahead in one round trip" in result.outlines
    finally:
        store = open_store(redis_url)
        store.delete_prefix(f"_ledger:{redis_namespace}:")
        store.delete(f"_warmup:{redis_namespace}")
