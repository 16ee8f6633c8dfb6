"""lm15 (dspy's default engine, and a package of its own): requests sent by its own HTTP client through the cache.

lm15 sends with a standard-library HTTP/1.1 client of its own; every request goes through
``StdlibTransport.stream`` (sync) or ``StdlibAsyncTransport._do_stream`` (async), which the cache
patches while a session is active (metrion_fixture.integrations.lm15). These tests drive the real
transports (and lm15's provider classes on top) against the simulated provider. The same adapter
serves the copy dspy vendors (``dspy._vendor.lm15``): tests/test_conformance.py runs dspy on it.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import lm15
import pytest
from lm15.transports import StdlibAsyncTransport, StdlibTransport, TransportRequest

import metrion_fixture
from metrion_fixture.core.entry import Entry
from metrion_fixture.integrations import lm15 as mf_lm15
from metrion_fixture.integrations import patching
from metrion_fixture.testing.provider import SimulatedProvider

ANTHROPIC = ("/v1/messages", "anthropic_messages", "claude-test")
OPENAI = ("/v1/chat/completions", "openai_chat", "gpt-test")


def request_for(
    provider: SimulatedProvider,
    route: tuple[str, str, str] = OPENAI,
    question: str = "What is the capital of France?",
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> TransportRequest:
    body: dict[str, Any] = {"model": route[2], "messages": [{"role": "user", "content": question}]}
    if route is ANTHROPIC:
        body["max_tokens"] = 100
    if stream:
        body["stream"] = True
    sent = [("Content-Type", "application/json"), ("Authorization", "Bearer sk-test"), *(headers or {}).items()]
    return TransportRequest(method="POST", url=provider.url + route[0], headers=sent, body=json.dumps(body).encode())


def send(request: TransportRequest, times: int = 1) -> list[tuple[Any, list[bytes]]]:
    """Send ``times`` times through one sync transport; each response and the chunks its iteration gave."""
    answers = []
    with StdlibTransport() as transport:
        for _ in range(times):
            with transport.stream(request) as response:
                answers.append((response, list(response)))
    return answers


def asend(request: TransportRequest, times: int = 1) -> list[tuple[Any, list[bytes]]]:
    async def run() -> list[tuple[Any, list[bytes]]]:
        answers = []
        async with StdlibAsyncTransport() as transport:
            for _ in range(times):
                async with transport.stream(request) as response:
                    answers.append((response, [chunk async for chunk in response]))
        return answers

    return asyncio.run(run())


SENDERS = {"sync": send, "async": asend}


def storage_key(session: metrion_fixture.CacheSession, wire_format: str, stream: bool = False) -> str:
    record = next(call for call in session.calls if call.wire_format == wire_format)
    return f"{session.settings.namespace}:{wire_format}:{'stream' if stream else 'json'}:{record.key}"


# -- miss, then hit -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(SENDERS))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_second_request_is_a_hit_on_every_store(provider, session, how, stream):
    (miss, miss_chunks), (hit, hit_chunks) = SENDERS[how](request_for(provider, stream=stream), times=2)
    assert (miss.header("x-metrion-cache"), hit.header("x-metrion-cache")) == ("MISS", "HIT")
    assert miss.status == hit.status == 200
    assert b"".join(hit_chunks) == b"".join(miss_chunks)
    if stream:
        assert b"data: [DONE]" in b"".join(hit_chunks)
    else:
        assert json.loads(b"".join(hit_chunks))["choices"][0]["message"]["content"]
        assert hit.header("content-length") == str(len(b"".join(hit_chunks)))
    assert provider.call_count == 1 and session.stats.stored == 1


def test_lm15s_own_providers_read_the_hits_as_they_read_the_provider(provider, memory_session):
    """lm15's provider classes (as dspy uses them), sync and async, JSON and streamed: MISS then HIT, same answer."""
    chat = lm15.OpenAIChatLM(api_key="sk-test", base_url=provider.url + "/v1")
    claude = lm15.AnthropicLM(api_key="sk-ant-test", base_url=provider.url + "/v1")

    def ask(question: str, model: str = "gpt-test") -> Any:
        return lm15.Request(model=model, messages=(lm15.Message.user(question),))

    def streamed(events: list[Any]) -> str:
        return "".join(getattr(event.delta, "text", "") for event in events if event.type == "delta")

    answers = [chat.complete(ask("json?")).text for _ in range(2)]
    answers += [claude.complete(ask("claude?", "claude-test")).text for _ in range(2)]
    answers += [streamed(list(chat.stream(ask("stream?")))) for _ in range(2)]

    async def run() -> list[str]:
        achat = lm15.AsyncOpenAIChatLM(api_key="sk-test", base_url=provider.url + "/v1")
        texts = [(await achat.complete(ask("async json?"))).text for _ in range(2)]
        for _ in range(2):
            texts.append(streamed([event async for event in achat.stream(ask("async stream?"))]))
        return texts

    answers += asyncio.run(run())
    assert all(answers) and answers[0::2] == answers[1::2]
    assert [call.status for call in memory_session.calls] == ["MISS", "HIT"] * 5
    assert provider.call_count == 5


# -- streams --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(SENDERS))
def test_a_hit_replays_the_stored_chunks_one_by_one(provider, memory_session, how):
    (_, miss_chunks), (hit, hit_chunks) = SENDERS[how](request_for(provider, stream=True), times=2)
    assert hit.header("x-metrion-cache") == "HIT"
    stored = Entry.decode(memory_session.store.get(storage_key(memory_session, "openai_chat", stream=True))).chunks
    assert len(stored) > 5
    assert hit_chunks == [chunk for chunk in stored if chunk]
    assert b"".join(miss_chunks) == b"".join(stored)


@pytest.fixture(scope="module")
def slow_provider() -> Iterator[SimulatedProvider]:
    with SimulatedProvider(chunk_delay=0.05) as slow:
        yield slow


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_miss_passes_each_chunk_on_as_it_arrives(slow_provider, memory_session, how):
    """On a streamed miss the caller gets each chunk while the provider is still sending: the entry is
    written after the last one (a stream read whole first would be stored before the caller saw any)."""
    slow_provider.reset()
    namespace = memory_session.settings.namespace
    stored_while_reading: list[bool] = []
    request = request_for(slow_provider, ANTHROPIC, "Hi there?", stream=True)

    def seen(chunk: bytes) -> None:
        if b"event:" in chunk:
            stored_while_reading.append(bool(memory_session.store.keys(namespace)))

    if how == "sync":
        with StdlibTransport() as transport, transport.stream(request) as response:
            assert response.header("x-metrion-cache") == "MISS"
            for chunk in response:
                seen(chunk)
    else:

        async def run() -> None:
            async with StdlibAsyncTransport() as transport, transport.stream(request) as response:
                assert response.header("x-metrion-cache") == "MISS"
                async for chunk in response:
                    seen(chunk)

        asyncio.run(run())
    assert len(stored_while_reading) > 5
    assert not any(stored_while_reading)
    assert memory_session.store.keys(namespace) and memory_session.stats.stored == 1
    assert slow_provider.call_count == 1


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_caller_that_stops_a_stream_early_stores_nothing(provider, memory_session, how):
    """One chunk, then the caller leaves the ``with`` block: nothing stored, the lock given back, the next call a MISS."""
    request = request_for(provider, ANTHROPIC, stream=True)
    if how == "sync":
        with StdlibTransport() as transport, transport.stream(request) as response:
            first = next(iter(response))
    else:

        async def run() -> bytes:
            async with StdlibAsyncTransport() as transport, transport.stream(request) as response:
                return await response.__aiter__().__anext__()

        first = asyncio.run(run())
    assert first.startswith(b"event: message_start")
    assert memory_session.store.keys(memory_session.settings.namespace) == []
    started = time.monotonic()
    ((again, _),) = send(request)
    assert again.header("x-metrion-cache") == "MISS"
    assert time.monotonic() - started < 5, "the abandoned stream's single-flight lock was not given back"
    assert provider.call_count == 2 and memory_session.stats.stored == 1


def test_a_stream_dropped_unread_gives_its_lock_back(provider, memory_session):
    """A streamed response neither read nor closed, then dropped: ended once garbage-collected, so an
    identical request (another thread: a thread never waits for itself) does not wait for the lock."""
    request = request_for(provider, ANTHROPIC, stream=True)
    transport = StdlibTransport()
    response = transport.stream(request)
    assert response.header("x-metrion-cache") == "MISS"
    del response
    gc.collect()
    started = time.monotonic()
    in_the_block = contextvars.copy_context()  # a cache() block covers its thread only
    answers: list[Any] = []
    other = threading.Thread(target=lambda: answers.append(in_the_block.run(send, request)))
    other.start()
    other.join(timeout=60)
    ((again, _),) = answers[0]
    assert time.monotonic() - started < 5, "the dropped stream's single-flight lock was not given back"
    assert again.header("x-metrion-cache") == "MISS" and provider.call_count == 2
    transport.close()


@pytest.mark.parametrize("how", sorted(SENDERS))
def test_a_stream_the_provider_cuts_raises_and_stores_nothing(provider, memory_session, how):
    """The provider hangs up mid-stream: the caller gets lm15's own error; no entry; the lock is given back."""
    cut = request_for(provider, stream=True, headers={"x-simulate": "cut-stream"})
    with pytest.raises(lm15.transports.TransportError):
        SENDERS[how](cut)
    assert memory_session.store.keys(memory_session.settings.namespace) == []
    started = time.monotonic()
    ((again, _),) = send(request_for(provider, stream=True))
    assert again.header("x-metrion-cache") == "MISS" and time.monotonic() - started < 5


# -- other answers --------------------------------------------------------------------------------


def test_a_provider_error_passes_through_and_is_not_stored(provider, memory_session):
    ((first, body),) = send(request_for(provider, ANTHROPIC, headers={"x-simulate": "status-429"}))
    assert first.status == 429 and first.headers_all("x-metrion-cache") == ["MISS"]
    assert json.loads(b"".join(body))["error"]["type"] == "rate_limit_error"
    ((second, _),) = send(request_for(provider, ANTHROPIC))
    assert second.status == 200 and second.header("x-metrion-cache") == "MISS"
    assert provider.call_count == 2


def test_a_gzipped_answer_is_stored_decoded_and_replayed(provider, memory_session):
    """The provider gzips its answer anyway: lm15 decodes it, the cache stores it decoded, the hit is plain."""
    (miss, miss_body), (hit, hit_body) = send(request_for(provider, headers={"x-simulate": "gzip"}), times=2)
    assert (miss.header("x-metrion-cache"), hit.header("x-metrion-cache")) == ("MISS", "HIT")
    assert hit.header("content-encoding") is None
    assert json.loads(b"".join(hit_body)) == json.loads(b"".join(miss_body))


@pytest.mark.parametrize("how", sorted(SENDERS))
def test_a_replay_miss_is_refused_and_never_sent(provider, namespace, how):
    """Replay mode on an empty store: our 400 in the provider's error shape, the provider never called."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace, mode="replay") as session:
        ((response, body),) = SENDERS[how](request_for(provider))
        with pytest.raises(lm15.InvalidRequestError, match="replay"):
            lm15.OpenAIChatLM(api_key="sk-test", base_url=provider.url + "/v1").complete(
                lm15.Request(model="gpt-test", messages=(lm15.Message.user("never sent"),))
            )
    assert response.status == 400 and response.header("x-metrion-cache") == "ERROR"
    assert response.header("x-should-retry") == "false"
    assert "replay" in json.loads(b"".join(body))["error"]["message"]
    assert provider.call_count == 0 and session.stats.errors == 2


def test_the_request_header_chooses_the_mode_and_is_never_sent(provider, memory_session):
    request = request_for(provider, headers={"X-Metrion-Cache": "false"})
    (first, _), (second, _) = send(request, times=2)
    assert first.header("x-metrion-cache") == second.header("x-metrion-cache") == "BYPASS"
    assert provider.call_count == 2
    assert all("x-metrion-cache" not in call.headers for call in provider.calls)
    assert ("X-Metrion-Cache", "false") in request.headers  # the caller's request is left as it was


def test_other_traffic_is_untouched(provider, memory_session):
    """A request to no LLM endpoint goes to the provider as it is, unrecorded; the response is lm15's own."""
    request = TransportRequest(method="GET", url=provider.url + "/v1/models", headers=[("X-Metrion-Cache", "true")])
    with StdlibTransport() as transport, transport.stream(request) as response:
        assert response.header("x-metrion-cache") is None
        response.read()
    assert memory_session.calls == []
    assert provider.calls and "x-metrion-cache" not in provider.calls[-1].headers


def test_a_request_outside_any_session_is_not_cached(provider):
    (first, _), (second, _) = send(request_for(provider), times=2)
    assert first.header("x-metrion-cache") is None and second.header("x-metrion-cache") is None
    assert provider.call_count == 2


def test_an_entry_stored_through_httpx_is_a_hit_for_lm15(provider, memory_session):
    """One cache for every HTTP library: the OpenAI SDK (httpx2) stores, lm15 reads."""
    import openai

    client = openai.OpenAI(api_key="sk-test", base_url=provider.url + "/v1")
    client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "shared?"}])
    ((hit, _),) = send(request_for(provider, question="shared?"))
    assert hit.header("x-metrion-cache") == "HIT" and provider.call_count == 1


# -- the patch ------------------------------------------------------------------------------------


def test_enable_patches_the_transports_and_disable_puts_the_originals_back(namespace):
    sync_original, async_original = StdlibTransport.__dict__["stream"], StdlibAsyncTransport.__dict__["_do_stream"]
    metrion_fixture.enable(f"memory://{uuid.uuid4().hex}", namespace=namespace)
    try:
        assert patching.installed()
        assert StdlibTransport.__dict__["stream"].__wrapped__ is sync_original
        assert StdlibAsyncTransport.__dict__["_do_stream"].__wrapped__ is async_original
    finally:
        metrion_fixture.disable()
    assert StdlibTransport.__dict__["stream"] is sync_original
    assert StdlibAsyncTransport.__dict__["_do_stream"] is async_original


def test_an_lm15_that_makes_responses_otherwise_is_left_alone(caplog):
    class Other:
        def __init__(self, *, status: int, body: bytes) -> None: ...

    assert mf_lm15.unsupported(lm15.transports.TransportResponse) is None
    assert mf_lm15.unsupported(lm15.transports.AsyncTransportResponse) is None
    assert mf_lm15.wrap_send(StdlibTransport.stream, Other, aio=False) is None
    assert "not cached" in caplog.text


def test_lm15_is_imported_only_by_the_user_and_patched_when_it_is(tmp_path):
    """enable() imports neither lm15 nor dspy; lm15 imported afterwards is patched, disable() unpatches it."""
    script = """
import sys
import metrion_fixture
metrion_fixture.enable("memory://import-hook")
assert not {"lm15", "dspy"} & set(sys.modules), "enable() imported lm15 or dspy"
from lm15.transports import StdlibAsyncTransport, StdlibTransport
assert hasattr(StdlibTransport.stream, "__wrapped__"), "lm15 imported later was not patched"
assert hasattr(StdlibAsyncTransport._do_stream, "__wrapped__"), "lm15 imported later was not patched"
metrion_fixture.disable()
assert not hasattr(StdlibTransport.stream, "__wrapped__")
assert not hasattr(StdlibAsyncTransport._do_stream, "__wrapped__")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
