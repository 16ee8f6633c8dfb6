"""Streams through the cache: passed on as they arrive, stored only when complete,
replayed with the same chunk boundaries, and never stored half."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator

import anthropic
import httpx
import httpx2
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sdk_calls import QUESTION, SDKS, call

import metrion_fixture
from metrion_fixture.core.entry import Entry
from metrion_fixture.formats import ANTHROPIC_MESSAGES, OPENAI_CHAT, StreamWatcher
from metrion_fixture.testing.provider import SimulatedProvider

LIBS = {"httpx": httpx, "httpx2": httpx2}
# A short answer: few events, so slow streams stay quick.
SHORT = [{"role": "user", "content": "Hi"}]
ROUTES = {  # sdk -> (path, model, wire format name)
    "anthropic": ("/v1/messages", "claude-test", "anthropic_messages"),
    "openai": ("/v1/chat/completions", "gpt-test", "openai_chat"),
}


def body_for(sdk: str, *, stream: bool = True, messages: list | None = None) -> dict:
    _, model, _ = ROUTES[sdk]
    body = {"model": model, "messages": messages or QUESTION, "stream": stream}
    if sdk == "anthropic":
        body["max_tokens"] = 100
    return body


def storage_key(namespace: str, sdk: str, *, stream: bool = True, messages: list | None = None) -> str:
    _, model, wire = ROUTES[sdk]
    key = metrion_fixture.cache_key(model, messages or QUESTION)
    return f"{namespace}:{wire}:{'stream' if stream else 'json'}:{key}"


def raw_chunks(lib, url: str, sdk: str, *, use_async: bool, headers: dict | None = None) -> tuple[dict, list[bytes]]:
    """POST a streaming request with a bare httpx / httpx2 client; the headers and the iter_raw chunks."""
    path = ROUTES[sdk][0]

    def sync() -> tuple[dict, list[bytes]]:
        with (
            lib.Client() as client,
            client.stream("POST", url + path, json=body_for(sdk), headers=headers) as r,
        ):
            assert r.status_code == 200
            return dict(r.headers), list(r.iter_raw())

    async def run_async() -> tuple[dict, list[bytes]]:
        async with (
            lib.AsyncClient() as client,
            client.stream("POST", url + path, json=body_for(sdk), headers=headers) as r,
        ):
            assert r.status_code == 200
            return dict(r.headers), [chunk async for chunk in r.aiter_raw()]

    return asyncio.run(run_async()) if use_async else sync()


sync_async = pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])


# -- 1. hits replay the same chunk boundaries ---------------------------------------------------


@sync_async
@pytest.mark.parametrize("lib", sorted(LIBS))
@pytest.mark.parametrize("sdk", SDKS)
def test_hit_replays_the_same_chunks_in_the_same_order(provider, memory_session, namespace, sdk, lib, use_async):
    """A hit gives the caller exactly the chunks the miss gave, same boundaries, same order."""
    miss_headers, miss = raw_chunks(LIBS[lib], provider.url, sdk, use_async=use_async)
    hit_headers, hit = raw_chunks(LIBS[lib], provider.url, sdk, use_async=use_async)

    assert (miss_headers["x-metrion-cache"], hit_headers["x-metrion-cache"]) == (
        "MISS",
        "HIT",
    )
    assert provider.call_count == 1
    assert len(miss) > 3  # one chunk per event: a joined replay would show
    assert hit == miss
    stored = Entry.decode(memory_session.store.get(storage_key(namespace, sdk)))
    assert stored.stream is True and stored.chunks == miss


@sync_async
def test_sdk_sees_the_same_events_on_a_hit(provider, memory_session, use_async):
    """The Anthropic SDK's event sequence on a hit is the miss's, event for event."""

    async def events_async() -> list[str]:
        client = anthropic.AsyncAnthropic(base_url=provider.url, api_key="k", max_retries=0)
        async with client.messages.stream(model="claude-test", max_tokens=100, messages=QUESTION) as events:
            return [event.type async for event in events]

    def events() -> list[str]:
        client = anthropic.Anthropic(base_url=provider.url, api_key="k", max_retries=0)
        with client.messages.stream(model="claude-test", max_tokens=100, messages=QUESTION) as stream:
            return [event.type for event in stream]

    run = (lambda: asyncio.run(events_async())) if use_async else events
    first, second = run(), run()
    assert provider.call_count == 1
    assert first == second and first[-1] == "message_stop"
    assert [record.status for record in memory_session.calls] == ["MISS", "HIT"]


# -- 2. no buffering on a miss ------------------------------------------------------------------


@pytest.fixture(scope="module")
def _slow_server() -> Iterator[SimulatedProvider]:
    with SimulatedProvider(chunk_delay=0.2) as slow:
        yield slow


@pytest.fixture
def slow_provider(_slow_server: SimulatedProvider) -> SimulatedProvider:
    _slow_server.reset()
    return _slow_server


@sync_async
def test_miss_passes_chunks_on_before_the_stream_ends(slow_provider, memory_session, namespace, use_async):
    """On a miss the first chunk reaches the caller before the stream is over; the entry appears only after its end."""
    key = storage_key(namespace, "anthropic", messages=SHORT)
    url = slow_provider.url + "/v1/messages"
    body = body_for("anthropic", messages=SHORT)
    seen_before_end: list[bytes | None] = []

    def sync() -> list[bytes]:
        with (
            httpx2.Client() as client,
            client.stream("POST", url, json=body) as response,
        ):
            chunks = []
            for chunk in response.iter_raw():
                seen_before_end.append(memory_session.store.get(key))
                chunks.append(chunk)
            return chunks

    async def run_async() -> list[bytes]:
        async with (
            httpx2.AsyncClient() as client,
            client.stream("POST", url, json=body) as response,
        ):
            chunks = []
            async for chunk in response.aiter_raw():
                seen_before_end.append(memory_session.store.get(key))
                chunks.append(chunk)
            return chunks

    chunks = asyncio.run(run_async()) if use_async else sync()

    assert len(chunks) > 5 and chunks[0].startswith(b"event: message_start")
    # While the caller was still reading (the first chunk included), nothing was stored.
    assert seen_before_end == [None] * len(chunks)
    assert Entry.decode(memory_session.store.get(key)).chunks == chunks
    assert slow_provider.call_count == 1


@sync_async
@pytest.mark.parametrize("sdk", SDKS)
def test_sdk_gets_the_first_event_before_the_entry_exists(slow_provider, memory_session, namespace, sdk, use_async):
    """Through the SDKs: the first event arrives while nothing is stored yet, the rest still arrives, then it is stored."""
    key = storage_key(namespace, sdk, messages=SHORT)
    store = memory_session.store

    def sync() -> tuple[bytes | None, str]:
        if sdk == "anthropic":
            client = anthropic.Anthropic(base_url=slow_provider.url, api_key="k", max_retries=0)
            with client.messages.stream(model="claude-test", max_tokens=100, messages=SHORT) as stream:
                pieces = iter(stream.text_stream)
                first = next(pieces)
                at_first = store.get(key)
                return at_first, first + "".join(pieces)
        client = openai.OpenAI(base_url=slow_provider.url + "/v1", api_key="k", max_retries=0)
        stream = client.chat.completions.create(model="gpt-test", messages=SHORT, stream=True)
        chunks = iter(stream)
        next(chunks)
        at_first = store.get(key)
        return at_first, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    async def run_async() -> tuple[bytes | None, str]:
        if sdk == "anthropic":
            client = anthropic.AsyncAnthropic(base_url=slow_provider.url, api_key="k", max_retries=0)
            async with client.messages.stream(model="claude-test", max_tokens=100, messages=SHORT) as stream:
                pieces = stream.text_stream.__aiter__()
                first = await pieces.__anext__()
                at_first = store.get(key)
                return at_first, first + "".join([piece async for piece in pieces])
        client = openai.AsyncOpenAI(base_url=slow_provider.url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="gpt-test", messages=SHORT, stream=True)
        chunks = stream.__aiter__()
        await chunks.__anext__()
        at_first = store.get(key)
        return at_first, "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    at_first, text = asyncio.run(run_async()) if use_async else sync()
    assert at_first is None
    assert "simulated answer to: Hi" in text
    assert store.get(key) is not None
    assert memory_session.stats.stored == 1


@sync_async
@pytest.mark.parametrize("label", ["text/event-stream", "application/json"])  # gateways label streams JSON
@pytest.mark.parametrize("lib", sorted(LIBS))
def test_upstream_is_pulled_one_chunk_at_a_time(memory_session, namespace, lib, use_async, label):
    """With an upstream we control: when the caller holds chunk n, the cache has pulled exactly n chunks from it."""
    hx = LIBS[lib]
    events = [
        b'event: message_start\ndata: {"type":"message_start"}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    pulled: list[int] = []
    key = storage_key(namespace, "anthropic")
    url, body = "http://llm.test/v1/messages", body_for("anthropic")

    class Upstream(hx.SyncByteStream, hx.AsyncByteStream):
        def __iter__(self):
            for index, event in enumerate(events):
                pulled.append(index)
                yield event

        async def __aiter__(self):
            for chunk in self:
                yield chunk

    def handler(request):
        return hx.Response(200, headers={"content-type": label}, stream=Upstream())

    def check(index: int, chunk: bytes, status: str) -> None:
        assert status == "MISS" and chunk == events[index]
        assert pulled == list(range(index + 1))
        assert memory_session.store.get(key) is None

    def sync() -> None:
        with (
            hx.Client(transport=hx.MockTransport(handler)) as client,
            client.stream("POST", url, json=body) as r,
        ):
            for index, chunk in enumerate(r.iter_raw()):
                check(index, chunk, r.headers["x-metrion-cache"])

    async def run_async() -> None:
        async with (
            hx.AsyncClient(transport=hx.MockTransport(handler)) as client,
            client.stream("POST", url, json=body) as r,
        ):
            index = 0
            async for chunk in r.aiter_raw():
                check(index, chunk, r.headers["x-metrion-cache"])
                index += 1

    asyncio.run(run_async()) if use_async else sync()
    assert pulled == [0, 1, 2, 3]
    assert Entry.decode(memory_session.store.get(key)).chunks == events


# -- 3. the OpenAI SDK stops reading at [DONE] --------------------------------------------------


@sync_async
def test_openai_sdk_stopping_at_done_still_stores(provider, memory_session, namespace, use_async):
    """The OpenAI SDK closes the response at [DONE] (async: after draining response.stream); the entry is stored."""
    first = call("openai", provider.url, stream=True, use_async=use_async)
    second = call("openai", provider.url, stream=True, use_async=use_async)

    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert second.text == first.text and second.usage == first.usage
    assert provider.call_count == 1
    stored = Entry.decode(memory_session.store.get(storage_key(namespace, "openai")))
    assert b"".join(stored.chunks).endswith(b"data: [DONE]\n\n")


@sync_async
@pytest.mark.parametrize("lib", sorted(LIBS))
@pytest.mark.parametrize("sdk", SDKS)
def test_iterating_the_stream_again_resumes_it(provider, memory_session, sdk, lib, use_async):
    """A second iteration of response.stream (how the async OpenAI SDK drains) resumes, on a miss and on a hit."""
    url = provider.url + ROUTES[sdk][0]

    def sync() -> tuple[str, list[bytes], list[bytes]]:
        with (
            LIBS[lib].Client() as client,
            client.stream("POST", url, json=body_for(sdk)) as response,
        ):
            reader = response.iter_raw()  # kept alive, as the SDK's decoder keeps it
            head = [next(reader)]
            return response.headers["x-metrion-cache"], head, list(response.stream)

    async def run_async() -> tuple[str, list[bytes], list[bytes]]:
        async with (
            LIBS[lib].AsyncClient() as client,
            client.stream("POST", url, json=body_for(sdk)) as response,
        ):
            reader = response.aiter_raw()  # kept alive, as the SDK's decoder keeps it
            head = [await reader.__anext__()]
            rest = [chunk async for chunk in response.stream]
            await reader.aclose()
            return response.headers["x-metrion-cache"], head, rest

    run = (lambda: asyncio.run(run_async())) if use_async else sync
    miss_status, miss_head, miss_rest = run()
    hit_status, hit_head, hit_rest = run()

    assert (miss_status, hit_status) == ("MISS", "HIT")
    assert provider.call_count == 1
    assert len(miss_head) == 1 and len(miss_rest) > 3
    # Resumed, not restarted: the rest follows the head, with no second copy of the start.
    assert hit_head + hit_rest == miss_head + miss_rest
    assert miss_head[0] not in miss_rest and hit_head[0] not in hit_rest
    assert memory_session.stats.stored == 1


# -- 4. never stored, never half-stored ---------------------------------------------------------

FAILURES = {
    "cut-stream": {
        "anthropic": (httpx2.RemoteProtocolError, anthropic.APIConnectionError),
        "openai": (openai.APIConnectionError,),
    },
    "error-event": {
        "anthropic": (anthropic.APIStatusError,),
        "openai": (openai.APIError,),
    },
}


@sync_async
@pytest.mark.parametrize("sdk", SDKS)
@pytest.mark.parametrize("mode", sorted(FAILURES))
def test_incomplete_streams_are_never_stored(provider, session, namespace, mode, sdk, use_async):
    """A cut, failed or unterminated stream is not stored, on any store: the next identical call reaches the provider."""
    with pytest.raises(FAILURES[mode][sdk]):
        call(sdk, provider.url, stream=True, use_async=use_async, extra_headers={"x-simulate": mode})

    assert session.store.keys(namespace + ":") == []
    assert session.stats.stored == 0

    again = call(sdk, provider.url, stream=True, use_async=use_async)
    assert again.cache == "MISS" and "delivery" in again.text
    assert provider.call_count == 2
    assert session.store.keys(namespace + ":") == [storage_key(namespace, sdk)]


@sync_async
@pytest.mark.parametrize("sdk", SDKS)
def test_a_stream_without_its_trailer_is_complete_at_its_final_state(provider, session, namespace, sdk, use_async):
    """Anthropic's message_stop and OpenAI's [DONE] only follow the final state: a stream ending without them is whole."""
    first = call(sdk, provider.url, stream=True, use_async=use_async, extra_headers={"x-simulate": "no-terminator"})
    assert first.cache == "MISS"
    assert session.store.keys(namespace + ":") == [storage_key(namespace, sdk)]
    again = call(sdk, provider.url, stream=True, use_async=use_async)
    assert again.cache == "HIT" and again.text == first.text and again.usage == first.usage
    assert provider.call_count == 1


def leave_at_the_final_state(sdk: str, url: str) -> list[str]:
    """Read events through the SDK until the final state, then close, as litellm does: the events' types."""
    if sdk == "anthropic":
        client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
        events = client.messages.create(model="claude-test", max_tokens=100, messages=QUESTION, stream=True)
        seen = []
        for event in events:
            seen.append(event.type)
            if event.type == "message_delta":
                break
        events.close()
        return seen
    gpt = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    chunks = gpt.chat.completions.create(
        model="gpt-test", messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    seen = []
    for chunk in chunks:
        seen.append("usage" if chunk.usage else "chunk")
        if chunk.usage:
            break
    chunks.close()
    return seen


@pytest.mark.parametrize("sdk", SDKS)
def test_a_caller_leaving_at_the_final_state_stores_a_whole_stream(provider, session, namespace, sdk):
    """litellm closes an Anthropic stream after message_delta: the answer is complete, stored, and replayed whole."""
    seen = leave_at_the_final_state(sdk, provider.url)
    assert seen[-1] in ("message_delta", "usage") and "message_stop" not in seen
    assert session.store.keys(namespace + ":") == [storage_key(namespace, sdk)]
    stored = Entry.decode(session.store.get(storage_key(namespace, sdk)))
    ending = b"event: message_stop" if sdk == "anthropic" else b"data: [DONE]"
    assert b"".join(stored.chunks).rstrip().split(b"\n\n")[-1].startswith(ending)  # the trailer, for the replay
    again = call(sdk, provider.url, stream=True)
    assert again.cache == "HIT" and "delivery" in again.text and again.usage is not None
    assert provider.call_count == 1


def close_after_first_event(sdk: str, url: str, use_async: bool) -> str:
    """Read one event through the SDK, then leave: the response is closed early."""

    def sync() -> str:
        if sdk == "anthropic":
            client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
            with client.messages.stream(model="claude-test", max_tokens=100, messages=QUESTION) as stream:
                for text in stream.text_stream:
                    return text
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = client.chat.completions.create(model="gpt-test", messages=QUESTION, stream=True)
        first = next(iter(stream))
        stream.close()
        return first.choices[0].delta.role or ""

    async def run_async() -> str:
        if sdk == "anthropic":
            client = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0)
            async with client.messages.stream(model="claude-test", max_tokens=100, messages=QUESTION) as stream:
                async for text in stream.text_stream:
                    return text
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        stream = await client.chat.completions.create(model="gpt-test", messages=QUESTION, stream=True)
        first = await stream.__aiter__().__anext__()
        await stream.close()
        return first.choices[0].delta.role or ""

    return asyncio.run(run_async()) if use_async else sync()


@sync_async
@pytest.mark.parametrize("sdk", SDKS)
def test_caller_closing_early_through_the_sdk_stores_nothing(provider, session, namespace, sdk, use_async):
    """A caller that stops after the first event and closes leaves no entry; the next call is a MISS."""
    assert close_after_first_event(sdk, provider.url, use_async)
    assert session.store.keys(namespace + ":") == []
    assert session.stats.stored == 0

    again = call(sdk, provider.url, stream=True, use_async=use_async)
    assert again.cache == "MISS"
    assert provider.call_count == 2


@sync_async
@pytest.mark.parametrize("lib", sorted(LIBS))
@pytest.mark.parametrize("sdk", SDKS)
def test_caller_closing_early_on_a_raw_client_stores_nothing(provider, memory_session, namespace, sdk, lib, use_async):
    """One iter_raw chunk, then close: nothing stored, and the next identical request is a MISS."""
    url = provider.url + ROUTES[sdk][0]

    def sync() -> bytes:
        with (
            LIBS[lib].Client() as client,
            client.stream("POST", url, json=body_for(sdk)) as response,
        ):
            return next(response.iter_raw())

    async def run_async() -> bytes:
        async with (
            LIBS[lib].AsyncClient() as client,
            client.stream("POST", url, json=body_for(sdk)) as response,
        ):
            return await response.aiter_raw().__anext__()

    first = asyncio.run(run_async()) if use_async else sync()
    assert first.startswith(b"event: message_start" if sdk == "anthropic" else b"data: {")
    assert memory_session.store.keys(namespace + ":") == []

    headers, _ = raw_chunks(LIBS[lib], provider.url, sdk, use_async=use_async)
    assert headers["x-metrion-cache"] == "MISS"
    assert provider.call_count == 2
    assert memory_session.stats.stored == 1


# -- 5. streamed and non-streamed variants -------------------------------------------------------


@sync_async
@pytest.mark.parametrize("sdk", SDKS)
def test_stream_and_json_share_the_key_and_the_entry(provider, memory_session, namespace, sdk, use_async):
    """The same prompt streamed and not has one cache key and one entry: the other mode is a converted hit."""
    json_miss = call(sdk, provider.url, stream=False, use_async=use_async)
    stream_miss = call(sdk, provider.url, stream=True, use_async=use_async)
    json_hit = call(sdk, provider.url, stream=False, use_async=use_async)
    stream_hit = call(sdk, provider.url, stream=True, use_async=use_async)

    assert [a.cache for a in (json_miss, stream_miss, json_hit, stream_hit)] == [
        "MISS",
        "HIT",
        "HIT",
        "HIT",
    ]
    keys = {a.headers["x-metrion-cache-key"] for a in (json_miss, stream_miss, json_hit, stream_hit)}
    assert keys == {metrion_fixture.cache_key(ROUTES[sdk][1], QUESTION)}
    assert provider.call_count == 1
    assert json_hit.text == stream_hit.text == json_miss.text == stream_miss.text
    assert memory_session.store.keys(namespace + ":") == [storage_key(namespace, sdk, stream=False)]
    assert [r.stream for r in memory_session.calls] == [False, True, False, True]


# -- 6. the stream watcher does not care where chunks split --------------------------------------


def _anthropic_event(name: str, **data) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()


def _openai_event(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


FORMATS = {
    "anthropic": {
        "format": ANTHROPIC_MESSAGES,
        "start": lambda: _anthropic_event("message_start", message={"id": "msg_1"}),
        "delta": lambda text: _anthropic_event("content_block_delta", delta={"type": "text_delta", "text": text}),
        "ping": lambda: _anthropic_event("ping"),
        # The final state (message_delta with its stop_reason), then the trailer.
        "end": lambda: (
            _anthropic_event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 3})
            + _anthropic_event("message_stop")
        ),
        "error": lambda: _anthropic_event("error", error={"type": "overloaded_error", "message": "Overloaded"}),
    },
    "openai": {
        "format": OPENAI_CHAT,
        "start": lambda: _openai_event({"choices": [{"delta": {"role": "assistant"}}]}),
        "delta": lambda text: _openai_event({"choices": [{"delta": {"content": text}}]}),
        "ping": lambda: b": keep-alive\n\n",
        "end": lambda: (
            _openai_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + _openai_event("[DONE]")
        ),
        "error": lambda: _openai_event({"error": {"message": "server had an error", "type": "server_error"}}),
    },
}


@st.composite
def sse_streams(draw):
    """An SSE stream of either format, its expected verdict, and points to cut it at."""
    name = draw(st.sampled_from(sorted(FORMATS)))
    parts = FORMATS[name]
    events = [parts["start"]()]
    for text in draw(st.lists(st.text(max_size=12), max_size=6)):
        events.append(parts["delta"](text))
        if draw(st.booleans()):
            events.append(parts["ping"]())
    error, end, trailing = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    if error:
        events.append(parts["error"]())
    if end:
        events.append(parts["end"]())
        if trailing:
            events.append(parts["delta"]("late"))
    data = b"".join(events)
    if draw(st.booleans()):
        data = data.replace(b"\n", b"\r\n")
    if error:
        expected = (False, True)  # (ended, failed): an error wins, whatever follows
    elif end:
        expected = (
            True,
            trailing,
        )  # anything after the terminator means we misread the stream
    else:
        expected = (False, False)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=20)))
    return name, parts["format"], data, expected, cuts


def _verdict(wire_format, chunks: list[bytes]) -> tuple[bool, bool]:
    watcher = StreamWatcher(wire_format)
    for chunk in chunks:
        watcher.feed(chunk)
    return watcher.ended, watcher.failed


@settings(max_examples=300, deadline=None, database=None)
@given(sse_streams())
def test_watcher_verdict_does_not_depend_on_chunk_boundaries(case):
    """Fed the same SSE bytes whole, split anywhere, or byte by byte, the watcher gives the same verdict."""
    _, wire_format, data, expected, cuts = case
    bounds = [0, *cuts, len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]

    assert _verdict(wire_format, [data]) == expected
    assert _verdict(wire_format, pieces) == expected
    assert _verdict(wire_format, [data[i : i + 1] for i in range(len(data))]) == expected
