"""Moving from vcrpy: cassettes recorded by vcrpy itself are imported and then replayed with no provider call.

vcrpy (>= 8.2) patches both httpx and httpx2 transports, so the cassettes here hold
what the real SDKs (anthropic 2.x and openai 3.x, on httpx2) sent and received,
plus a raw httpx request, a provider error and a request that is not an LLM call.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

# httpcore, httpcore2, vcrpy's httpx stubs and the metrion transports and stores are imported here,
# before any test runs, on purpose: pytester drops every module first imported while a Pytester is
# alive (here: recording through httpx and httpx2, then an in-process run) when that test ends, and
# the fresh copies imported later (new exception and transport classes) confuse the other tests.
import anthropic
import httpcore  # noqa: F401
import httpcore2  # noqa: F401
import httpx
import openai
import pytest
import vcr
import vcr.stubs.httpx_stubs

import metrion_fixture.stores.sqlite
import metrion_fixture.transports.httpx
import metrion_fixture.transports.httpx2  # noqa: F401
from metrion_fixture import cache_key
from metrion_fixture.cli import main as cli_main
from metrion_fixture.integrations.cassettes import import_cassettes
from metrion_fixture.stores import open_store

pytest_plugins = ["pytester"]

QUESTIONS = {
    "anthropic": "What are your delivery times?",
    "anthropic_stream": "Can I return an item?",
    "openai_gzip": "Do you ship abroad?",
    "openai_async_stream": "Which payment methods do you take?",
    "raw_httpx": "Asked with a hand-written httpx request",
}

REPLAY_SUITE = (
    """
import asyncio
import os

import anthropic
import httpx2
import openai

URL = os.environ["METRION_TEST_PROVIDER_URL"]
ANTHROPIC = anthropic.Anthropic(base_url=URL, api_key="sk-ant-test", max_retries=0)
OPENAI = openai.OpenAI(base_url=URL + "/v1", api_key="sk-openai-test", max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def test_anthropic(metrion_cache):
    message = ANTHROPIC.messages.create(model="claude-test", max_tokens=100, messages=user("%(anthropic)s"))
    assert "delivery" in message.content[0].text


def test_anthropic_stream(metrion_cache):
    with ANTHROPIC.messages.stream(model="claude-test", max_tokens=100, messages=user("%(anthropic_stream)s")) as events:
        assert "return" in "".join(events.text_stream)


def test_openai_gzip(metrion_cache):
    completion = OPENAI.chat.completions.create(model="gpt-test", messages=user("%(openai_gzip)s"))
    assert "abroad" in completion.choices[0].message.content


async def test_openai_async_stream(metrion_cache):
    async with openai.AsyncOpenAI(base_url=URL + "/v1", api_key="sk-openai-test", max_retries=0) as client:
        chunks = await client.chat.completions.create(
            model="gpt-test", messages=user("%(openai_async_stream)s"), stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert "payment" in text


def test_raw_httpx_recording(metrion_cache):
    completion = OPENAI.chat.completions.create(model="gpt-test", messages=user("%(raw_httpx)s"))
    assert "hand-written" in completion.choices[0].message.content
"""
    % QUESTIONS
)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def record_cassette(path: Path, provider_url: str, serializer: str) -> None:
    """What a vcrpy user's suite records: SDK calls (httpx2), a raw httpx call, an error, a non-LLM request."""
    # JSON cannot hold a gzip body: JSON users record with decode_compressed_response, as vcrpy's docs say.
    recorder = vcr.VCR(serializer=serializer, decode_compressed_response=serializer == "json")
    with recorder.use_cassette(str(path)):
        claude = anthropic.Anthropic(base_url=provider_url, api_key="sk-ant-test", max_retries=0)
        claude.messages.create(model="claude-test", max_tokens=100, messages=user(QUESTIONS["anthropic"]))
        with claude.messages.stream(
            model="claude-test", max_tokens=100, messages=user(QUESTIONS["anthropic_stream"])
        ) as events:
            "".join(events.text_stream)
        gpt = openai.OpenAI(base_url=provider_url + "/v1", api_key="sk-openai-test", max_retries=0)
        gpt.chat.completions.create(
            model="gpt-test", messages=user(QUESTIONS["openai_gzip"]), extra_headers={"x-simulate": "gzip"}
        )

        async def async_stream() -> None:
            async with openai.AsyncOpenAI(base_url=provider_url + "/v1", api_key="k", max_retries=0) as client:
                chunks = await client.chat.completions.create(
                    model="gpt-test", messages=user(QUESTIONS["openai_async_stream"]), stream=True
                )
                async for _ in chunks:
                    pass

        asyncio.run(async_stream())
        response = httpx.post(
            provider_url + "/v1/chat/completions", json={"model": "gpt-test", "messages": user(QUESTIONS["raw_httpx"])}
        )
        assert response.status_code == 200
        with pytest.raises(openai.InternalServerError):
            gpt.chat.completions.create(
                model="gpt-test", messages=user("This one failed"), extra_headers={"x-simulate": "status-500"}
            )
        assert httpx.get(provider_url + "/v1/models").status_code == 404


@pytest.mark.parametrize("serializer", ["yaml", "json"])
def test_imported_cassette_replays_with_no_provider_call(serializer, pytester, provider, monkeypatch, capsys):
    """`metrion-cache import-cassettes` stores the LLM successes, says what it skipped, and replay then needs no provider."""
    cassette = pytester.path / "cassettes" / "test_llm" / f"test_calls.{serializer}"
    record_cassette(cassette, provider.url, serializer)
    assert cassette.exists() and provider.call_count == 6  # LLM calls; the GET is not one
    store = f"sqlite:///{pytester.path / 'cache.sqlite3'}"

    code = cli_main(["import-cassettes", str(pytester.path / "cassettes"), "--url", store, "--namespace", "imported"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "imported 5 answers from 1 cassettes" in out and "skipped 2" in out
    assert "POST " in out and "the provider answered HTTP 500 (only successes are cached)" in out
    assert f"skipped GET {provider.url}/v1/models" in out and "not an LLM request" in out

    # Keyed like live traffic: the store holds exactly the live storage keys.
    keys = open_store(store).keys("imported:")
    assert f"imported:anthropic_messages:json:{cache_key('claude-test', user(QUESTIONS['anthropic']))}" in keys
    assert f"imported:anthropic_messages:stream:{cache_key('claude-test', user(QUESTIONS['anthropic_stream']))}" in keys
    assert f"imported:openai_chat:stream:{cache_key('gpt-test', user(QUESTIONS['openai_async_stream']))}" in keys
    assert len(keys) == 5

    monkeypatch.setenv("METRION_TEST_PROVIDER_URL", provider.url)
    monkeypatch.delenv("METRION_CACHE_URL", raising=False)
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_llm=REPLAY_SUITE)
    provider.reset()
    result = pytester.runpytest_inprocess(
        "-p",
        "no:hypothesispytest",
        "--metrion-cache=replay",
        f"--metrion-cache-url={store}",
        "--metrion-cache-namespace=imported",
    )
    result.assert_outcomes(passed=5)
    assert provider.call_count == 0
    assert "5 hits, 0 misses" in result.stdout.str()


def test_import_command_entry_point_ttl_and_unreadable_cassettes(tmp_path, provider):
    """The installed `metrion-cache` command: --ttl sets the entries' lifetime; a broken cassette is reported, exit 1."""
    cassette = tmp_path / "calls.yaml"
    record_cassette(cassette, provider.url, "yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("interactions: [ {request: \n")
    store = f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    command = Path(sys.executable).parent / "metrion-cache"

    result = subprocess.run(
        [str(command), "import-cassettes", str(cassette), str(broken), "--url", store, "--ttl", "30d"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "imported 5 answers from 1 cassettes" in result.stdout
    assert f"could not read {broken}" in result.stderr
    key = f"metrion:anthropic_messages:json:{cache_key('claude-test', user(QUESTIONS['anthropic']))}"
    assert 29 * 86400 < open_store(store).ttl(key) <= 30 * 86400


def test_import_replaces_existing_entries_and_reports_store_failure(tmp_path, provider):
    """Importing again replaces entries (refresh mode), and a store that is down is reported, not a silent success."""
    cassette = tmp_path / "calls.yaml"
    record_cassette(cassette, provider.url, "yaml")
    url = f"memory://{uuid.uuid4().hex}"
    first = import_cassettes([cassette], url=url)
    again = import_cassettes([cassette], url=url)
    assert (first.imported, again.imported) == (5, 5)

    down = import_cassettes([cassette], url="redis://127.0.0.1:1")
    assert down.imported == 0 and down.store_failures == 5
