"""Moving from vcrpy: cassettes recorded by vcrpy itself are imported and then replayed with no provider call.

vcrpy (>= 8.2) patches both httpx and httpx2 transports, so the cassettes here hold
what the real SDKs (anthropic 2.x and openai 3.x, on httpx2) sent and received,
plus a raw httpx request, a provider error and a request that is not an LLM call.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

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
from recorded_calls import send

import metrion_fixture
import metrion_fixture.api  # not imported by the package itself: loaded here, before pytester runs
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
    assert "imported 5 answers from 1 cassette into" in out and "skipped 2" in out
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
    assert "imported 5 answers from 1 cassette into" in result.stdout
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


# -- the layouts of vcrpy, pytest-recording, pydantic-ai and langchain -------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures" / "cassettes"


def _fixture_generator():
    spec = importlib.util.spec_from_file_location("cassette_fixtures", FIXTURES / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


GENERATOR = _fixture_generator()


def test_fixture_cassettes_are_what_the_generator_writes(tmp_path):
    """The committed cassettes are generate.py's output: its CASES are what the replay test asks for."""
    written = GENERATOR.write_all(tmp_path)
    assert len(written) == len(GENERATOR.cassettes())
    for path in written:
        relative = path.relative_to(tmp_path)
        assert (FIXTURES / relative).read_bytes() == path.read_bytes(), f"run {FIXTURES / 'generate.py'}: {relative}"


def _llm_cases() -> list[tuple[str, Any]]:
    return [(name, case) for name, (_, cases) in GENERATOR.cassettes().items() for case in cases if case.llm]


def replay_through_sdk(case: Any, base_url: str, *, stream: bool) -> str:
    """Send the recorded request again through its real SDK; what the parsed answer says."""
    model = case.uri.rpartition("/models/")[2].partition(":")[0] if case.api == "gemini" else None
    return send(case.api, case.request, base_url, stream=stream, model=model)


@pytest.fixture(scope="module")
def imported_fixtures(tmp_path_factory) -> tuple[Any, str, str]:
    """The fixture folder imported once into a SQLite store: (report, store URL, namespace)."""
    store = f"sqlite:///{tmp_path_factory.mktemp('imported') / 'cache.sqlite3'}"
    namespace = f"fixtures-{uuid.uuid4().hex[:8]}"
    return import_cassettes([FIXTURES], url=store, namespace=namespace), store, namespace


def test_every_layout_is_read_collisions_reported_entries_counted(imported_fixtures):
    """vcrpy (YAML, JSON), pytest-recording, pydantic-ai and langchain cassettes: every file read; one key
    recorded twice with different options (thinking on and off) is reported and counted once."""
    report, store, namespace = imported_fixtures
    assert report.unreadable == []
    assert sorted(Path(c).relative_to(FIXTURES).as_posix() for c in report.cassettes) == sorted(GENERATOR.cassettes())
    assert report.store_failures == 0
    assert [(s.method, s.uri) for s in report.skipped] == [("GET", "https://api.openai.com/v1/models")]
    assert "not an LLM request" in report.skipped[0].reason

    assert len(report.collisions) == 1
    collision = report.collisions[0]
    assert collision.storage_key.startswith(f"{namespace}:anthropic_messages:json:")
    assert "vcrpy/test_trip_planner.yaml: POST https://api.anthropic.com/v1/messages" in collision.kept
    assert "pydantic_ai/test_anthropic/test_thinking_and_citations.yaml" in collision.replaced
    stored = open_store(store).keys(f"{namespace}:")
    assert collision.storage_key in stored
    assert report.imported == len(_llm_cases()) - 1 == len(stored)


def _replay_all(cases: list[tuple[str, Any]], store: str, namespace: str, provider: Any, *, other_mode: bool):
    """Each case's request through its SDK in replay mode: the cases not answered from the cache, and why."""
    missed = []
    with metrion_fixture.cache(store, mode="replay", namespace=namespace) as session:
        for name, case in cases:
            try:
                said = replay_through_sdk(case, provider.url, stream=case.stream != other_mode)
            except (anthropic.APIError, openai.APIError, ValueError) as error:
                missed.append((name, case.request, f"{type(error).__name__}: {error}"))
                continue
            if session.ledger.calls[-1].status != "HIT" or case.needle not in said:
                missed.append((name, case.request, said))
    assert provider.call_count == 0
    return missed


def test_imported_cassettes_replay_through_the_sdks_in_their_recorded_mode(imported_fixtures, provider):
    """Every recorded request, sent again through anthropic, openai or google-genai in replay mode, is a hit."""
    _, store, namespace = imported_fixtures
    cases = _llm_cases()
    assert _replay_all(cases, store, namespace, provider, other_mode=False) == []


def _without_usage(case: Any) -> bool:
    """An OpenAI stream recorded without stream_options.include_usage: no JSON answer has no usage."""
    return case.api == "openai" and case.stream and b'"usage":{' not in case.response_stream


def test_imported_cassettes_replay_through_the_sdks_in_the_other_mode(imported_fixtures, provider):
    """At least 95% of them are answered from the cache in the other mode (stream <-> JSON) too; the only
    misses are streams that cannot make a whole JSON answer (recorded without usage)."""
    _, store, namespace = imported_fixtures
    cases = _llm_cases()
    missed = _replay_all(cases, store, namespace, provider, other_mode=True)
    assert len(cases) - len(missed) >= 0.95 * len(cases), f"missed {len(missed)} of {len(cases)}: {missed}"
    expected = [case.request for _, case in cases if _without_usage(case)]
    assert [request for _, request, _ in missed] == expected, missed


def test_recorded_streams_are_split_into_their_events_whatever_the_line_ends(imported_fixtures):
    """CRLF (Gemini), lone CR and `: ping` comments: one stored chunk per event, read by the one SSE decoder."""
    from metrion_fixture.core.entry import Entry
    from metrion_fixture.formats.base import sse_events

    _, store, namespace = imported_fixtures
    opened = open_store(store)
    quirky = {
        "gemini CRLF": ("gemini", GENERATOR.gemini_stream()),
        "openai CRLF": (
            "openai_chat",
            GENERATOR.openai_stream_with_usage("Name two Portuguese wines, briefly.", newline="\r\n"),
        ),
        "deepseek CR": ("openai_chat", GENERATOR.deepseek_reasoning_stream("What is 19 * 23?", newline="\r")),
        "anthropic CRLF, comments": (
            "anthropic_messages",
            GENERATOR.anthropic_tool_use_stream("Faro", newline="\r\n", comments=True),
        ),
    }
    for label, (wire_format, case) in quirky.items():
        model = (
            case.uri.rpartition("/models/")[2].partition(":")[0] if wire_format == "gemini" else case.request["model"]
        )
        messages = case.request.get("messages") or case.request["contents"]
        value = opened.get(f"{namespace}:{wire_format}:stream:{cache_key(model, messages)}")
        assert value is not None, label
        chunks = list(Entry.decode(value).chunks)
        recorded = sse_events([case.response_stream])
        assert len(chunks) == len(recorded) > 2, label
        assert [sse_events([chunk]) for chunk in chunks] == [[event] for event in recorded], label


def test_stream_chunks_keep_an_unfinished_event_unfinished():
    """A recording cut inside its last event stays incomplete: the stream's watcher refuses it."""
    from metrion_fixture.integrations.cassettes import stream_chunks

    chunks = stream_chunks(
        b'event: message_start\r\ndata: {"a":1}\r\n\r\n: ping\r\n\r\nevent: message_stop\r\ndata: {"type"'
    )
    assert chunks == [b'event: message_start\ndata: {"a":1}\n\n', b'event: message_stop\ndata: {"type"\n']


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("broken.yaml", b"interactions: [ {request: \n", "not valid YAML"),
        ("list.json", b"[1, 2]", "found a YAML/JSON list"),
        ("other.yaml", b"cassette_name: x\nrecords: []\n", "a mapping of `cassette_name`, `records`"),
        ("truncated.yaml.gz", gzip.compress(b"requests: []\nresponses: []\n", mtime=0)[:12], "a broken gzip file"),
        ("empty.yaml", b"   \n", "the file is empty"),
        ("binary.json", b"\xff\xfe\x00binary", "neither text nor gzip"),
        ("mismatched.yaml.gz", gzip.compress(b"requests: [1]\nresponses: []\n", mtime=0), "not lists of one length"),
        (
            "interaction.yaml",
            b"interactions:\n- request: {uri: x}\n  response: {}\nversion: 1\n",
            "not in vcrpy's shape",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_an_unreadable_file_gets_one_line_saying_what_was_expected(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    report = import_cassettes([path], url=f"memory://{uuid.uuid4().hex}")
    assert report.cassettes == []
    [(cassette, why)] = report.unreadable
    assert cassette == str(path) and expected in why and "\n" not in why
    assert "langchain" in why and "pydantic-ai" in why


def test_cli_reports_collisions_formats_and_counts_entries(tmp_path, capsys):
    """The command prints each collision (which cassettes, which key), and the skip reason names every format imported."""
    folder = tmp_path / "cassettes"
    shutil.copytree(FIXTURES / "vcrpy", folder / "vcrpy")
    shutil.copytree(FIXTURES / "pydantic_ai", folder / "pydantic_ai")
    store = f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    code = cli_main(["import-cassettes", str(folder), "--url", store, "--namespace", "ns"])
    out = capsys.readouterr().out
    assert code == 0, out
    stored = open_store(store).keys("ns:")
    assert f"imported {len(stored)} answers from 4 cassettes" in out and "1 key collision" in out
    [line] = [line for line in out.splitlines() if line.startswith("collision on ")]
    assert "ns:anthropic_messages:json:" in line
    assert "test_trip_planner.yaml" in line and "test_thinking_and_citations.yaml" in line
    assert "Anthropic Messages, OpenAI Chat Completions, OpenAI Responses, Gemini generateContent" in out


CASSETTER = """\
version: 1
interactions:
- request:
    method: POST
    uri: https://api.openai.com/v1/chat/completions
    headers:
      content-type:
      - application/json
    body:
      type: json
      content:
        messages:
        - content: What is the capital of France?
          role: user
        model: gpt-4o
        stream: false
  response:
    status: 200
    headers:
      content-type:
      - application/json
    body:
      type: json
      content:
        choices:
        - finish_reason: stop
          index: 0
          logprobs: null
          message:
            annotations: []
            content: The capital of France is Paris.
            refusal: null
            role: assistant
        created: 1744043456
        id: chatcmpl-BJjf61mLb9z5H45ClJzbx0UWKwjo1
        model: gpt-4o-2024-08-06
        object: chat.completion
        usage:
          completion_tokens: 8
          prompt_tokens: 24
          total_tokens: 32
  recorded_at: 2026-03-06T19:22:51.849479+00:00
"""


def test_cassetter_recordings_of_pydantic_ai_are_imported(tmp_path):
    """pydantic-ai now records with cassetter: a body is {type: json, content: ...} and the status a bare code."""
    path = tmp_path / "test_openai_instructions.yaml"
    path.write_text(CASSETTER)
    store = f"memory://{uuid.uuid4().hex}"
    report = import_cassettes([path], url=store, namespace="ns")
    assert (report.unreadable, report.skipped, report.imported) == ([], [], 1)
    key = cache_key("gpt-4o", [{"content": "What is the capital of France?", "role": "user"}])
    assert open_store(store).keys("ns:") == [f"ns:openai_chat:json:{key}"]

    path.write_text(
        CASSETTER.replace(
            "type: json\n      content:\n        choices", "type: binary\n      content:\n        choices"
        )
    )
    [(_, why)] = import_cassettes([path], url=store).unreadable
    assert "a response body of type 'binary'" in why


KEYED_GET = """\
version: 1
interactions:
- request:
    body: null
    headers: {}
    method: GET
    uri: https://generativelanguage.googleapis.com/v1beta/models?pageSize=50&key=AIzaSyNOT-A-REAL-KEY-0123456789
  response:
    status: {code: 200, message: OK}
    headers:
      Content-Type: [application/json]
    body: {string: '{"models": []}'}
"""


def test_an_api_key_in_a_recorded_uri_is_never_printed(tmp_path, capsys):
    """A cassette recorded without filtering Gemini's ?key=: the import's report and its CLI output mask it."""
    (tmp_path / "gemini.yaml").write_text(KEYED_GET)
    store = f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    report = import_cassettes([tmp_path], url=store, namespace="ns")
    [skipped] = report.skipped
    assert skipped.uri == "https://generativelanguage.googleapis.com/v1beta/models?pageSize=50&key=***"
    assert cli_main(["import-cassettes", str(tmp_path), "--url", store, "--namespace", "ns"]) == 0
    printed = capsys.readouterr()
    assert "key=***" in printed.out
    assert "AIzaSy" not in printed.out + printed.err
