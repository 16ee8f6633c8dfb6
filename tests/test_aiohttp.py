"""aiohttp through the cache: raw ``ClientSession`` requests and google-genai's ``client.aio``, against the
simulated provider, on the same keys, entries, modes, single flight and stats as httpx."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import httpx
import httpx2
import pytest
from google import genai
from google.genai import types as genai_types
from multidict import CIMultiDictProxy
from yarl import URL

import metrion_fixture
from metrion_fixture import integrations
from metrion_fixture.core.entry import Entry
from metrion_fixture.integrations import aiohttp as mf_aiohttp
from metrion_fixture.integrations import patching
from metrion_fixture.testing.provider import SimulatedProvider

QUESTION = "What are your delivery times?"
GEMINI_KEY = "AIza-goog-secret-test-key"
ROUTES = {  # sdk -> (path, stream path, wire format name, model)
    "anthropic": ("/v1/messages", "/v1/messages", "anthropic_messages", "claude-test"),
    "openai": ("/v1/chat/completions", "/v1/chat/completions", "openai_chat", "gpt-test"),
    "gemini": (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        "gemini",
        "gemini-2.5-flash",
    ),
}
SDKS = sorted(ROUTES)
READS = ("lines", "iter_chunked", "read")


def body_for(sdk: str, question: str = QUESTION, stream: bool = False) -> dict[str, Any]:
    if sdk == "gemini":  # the model is in the path; the stream is the :streamGenerateContent endpoint
        return {"contents": [{"role": "user", "parts": [{"text": question}]}]}
    body: dict[str, Any] = {"model": ROUTES[sdk][3], "messages": [{"role": "user", "content": question}]}
    if sdk == "anthropic":
        body["max_tokens"] = 100
    return {**body, "stream": True} if stream else body


def url_for(provider: SimulatedProvider, sdk: str, stream: bool = False) -> str:
    return provider.url + ROUTES[sdk][1 if stream else 0]


def storage_key(session: metrion_fixture.CacheSession, sdk: str, stream: bool = False) -> str:
    record = next(call for call in session.calls if call.wire_format == ROUTES[sdk][2])
    return f"{session.settings.namespace}:{ROUTES[sdk][2]}:{'stream' if stream else 'json'}:{record.key}"


async def read_body(response: aiohttp.ClientResponse, how: str) -> bytes:
    if how == "lines":
        return b"".join([line async for line in response.content])
    if how == "iter_chunked":
        return b"".join([chunk async for chunk in response.content.iter_chunked(7)])
    return await response.read()


def post(
    url: str,
    body: dict[str, Any],
    *,
    how: str = "read",
    headers: dict[str, str] | None = None,
    times: int = 1,
    **session_options: Any,
) -> list[tuple[aiohttp.ClientResponse, bytes]]:
    """POST ``times`` times through one aiohttp session (in a fresh event loop); each response and its body."""

    async def run() -> list[tuple[aiohttp.ClientResponse, bytes]]:
        answers = []
        async with aiohttp.ClientSession(**session_options) as client:
            for _ in range(times):
                async with client.post(url, json=body, headers=headers) as response:
                    answers.append((response, await read_body(response, how)))
        return answers

    return asyncio.run(run())


# -- miss, then hit -------------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", SDKS)
def test_second_request_is_a_hit_on_every_store(provider, session, sdk):
    """Two identical non-streamed POSTs: MISS then HIT with the same body; the provider is called once."""
    (miss, miss_body), (hit, hit_body) = post(url_for(provider, sdk), body_for(sdk), times=2)
    assert (miss.headers["x-metrion-cache"], hit.headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert hit_body == miss_body and b"delivery" in hit_body.lower()
    assert (miss.status, hit.status) == (200, 200)
    assert provider.call_count == 1
    assert [call.status for call in session.calls] == ["MISS", "HIT"]
    assert session.stats.hits == 1 and session.stats.misses == 1
    assert hit.headers["x-metrion-cache-key"] == session.calls[0].key


@pytest.mark.parametrize("how", READS)
@pytest.mark.parametrize("sdk", SDKS)
def test_streams_miss_then_hit_read_every_way(provider, memory_session, sdk, how):
    """A streamed POST read by line, by iter_chunked or whole: MISS then HIT with the same bytes, one provider call."""
    (miss, miss_body), (hit, hit_body) = post(
        url_for(provider, sdk, True), body_for(sdk, stream=True), how=how, times=2
    )
    assert (miss.headers["x-metrion-cache"], hit.headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert hit_body == miss_body and miss_body.startswith((b"event: message_start", b"data: {"))
    assert hit.headers["content-type"].startswith("text/event-stream")
    assert provider.call_count == 1
    stored = Entry.decode(memory_session.store.get(storage_key(memory_session, sdk, stream=True)))
    assert b"".join(stored.chunks) == miss_body


def test_a_hit_is_a_real_client_response(provider, memory_session):
    """A hit answers with aiohttp's own ClientResponse and StreamReader, used as the provider's response would be."""

    async def run() -> None:
        url = url_for(provider, "anthropic")
        async with aiohttp.ClientSession() as client:
            async with client.post(url, json=body_for("anthropic")) as miss:
                expected = await miss.json()
            async with client.post(url, json=body_for("anthropic")) as hit:
                assert type(hit) is aiohttp.ClientResponse
                assert isinstance(hit.content, aiohttp.StreamReader)
                assert isinstance(hit.headers, CIMultiDictProxy)
                assert (hit.status, hit.ok, hit.reason, hit.url) == (200, True, "OK", URL(url))
                assert hit.method == "POST" and hit.request_info.url == URL(url)
                assert hit.headers["x-metrion-cache"] == "HIT" and "age" in hit.headers
                assert int(hit.headers["content-length"]) == len(await hit.read())
                assert await hit.json() == expected
                assert json.loads(await hit.text()) == expected
                assert hit.closed  # its body is read, as a connection's response would be
                hit.raise_for_status()
                assert (b"content-type", b"application/json") in [(k.lower(), v) for k, v in hit.raw_headers]

    asyncio.run(run())
    assert provider.call_count == 1


def test_a_hit_replays_the_stored_chunks_one_by_one(provider, memory_session):
    """A streamed hit is a stream: iter_chunks() yields the stored chunks with their boundaries, in order."""

    async def run() -> tuple[list[tuple[bytes, bool]], list[bytes]]:
        url, body = url_for(provider, "openai", True), body_for("openai", stream=True)
        async with aiohttp.ClientSession() as client:
            async with client.post(url, json=body) as miss:
                miss_chunks = [chunk async for chunk, _ in miss.content.iter_chunks()]
            async with client.post(url, json=body) as hit:
                assert hit.headers["x-metrion-cache"] == "HIT"
                return [pair async for pair in hit.content.iter_chunks()], miss_chunks

    hit_chunks, miss_chunks = asyncio.run(run())
    stored = Entry.decode(memory_session.store.get(storage_key(memory_session, "openai", stream=True))).chunks
    assert len(stored) > 5
    assert hit_chunks == [(chunk, True) for chunk in stored]
    assert b"".join(miss_chunks) == b"".join(stored)


@pytest.fixture(scope="module")
def slow_provider() -> Iterator[SimulatedProvider]:
    with SimulatedProvider(chunk_delay=0.1) as slow:
        yield slow


def test_a_miss_passes_each_chunk_on_as_it_arrives(slow_provider, memory_session):
    """On a streamed miss the caller reads each event while the provider is still sending; the entry comes at the end."""
    slow_provider.reset()
    arrivals: list[float] = []
    stored_while_reading: list[bool] = []

    async def run() -> None:
        url = url_for(slow_provider, "anthropic")
        async with (
            aiohttp.ClientSession() as client,
            client.post(url, json=body_for("anthropic", "Hi there?", stream=True)) as r,
        ):
            assert r.headers["x-metrion-cache"] == "MISS"
            async for line in r.content:
                if line.startswith(b"event:"):
                    arrivals.append(time.monotonic())
                    stored_while_reading.append(bool(memory_session.store.keys(memory_session.settings.namespace)))

    asyncio.run(run())
    assert len(arrivals) > 5
    assert arrivals[-1] - arrivals[0] > 0.1 * (len(arrivals) - 2)  # spread out as sent, not all at the end
    assert not any(stored_while_reading)
    assert memory_session.stats.stored == 1 and slow_provider.call_count == 1


# -- streams that do not end well ----------------------------------------------------------------


@pytest.mark.parametrize("leave", ["release", "close", "context exit"])
def test_a_caller_that_stops_a_stream_early_stores_nothing(provider, memory_session, leave):
    """One line, then the caller leaves: nothing is stored, the lock is given back, the next request is a MISS."""

    async def run() -> bytes:
        url = url_for(provider, "anthropic")
        async with aiohttp.ClientSession() as client:
            response = await client.post(url, json=body_for("anthropic", stream=True))
            first = await response.content.readline()
            if leave == "release":
                await response.release()
            elif leave == "close":
                response.close()
                await response.wait_for_close()
            else:
                async with response:
                    pass
            return first

    assert asyncio.run(run()).startswith(b"event: message_start")
    namespace = memory_session.settings.namespace
    assert memory_session.store.keys(namespace) == []
    started = time.monotonic()
    ((again, _),) = post(url_for(provider, "anthropic"), body_for("anthropic", stream=True), how="lines")
    assert again.headers["x-metrion-cache"] == "MISS"
    assert time.monotonic() - started < 5, "the abandoned stream's single-flight lock was not given back"
    assert provider.call_count == 2 and memory_session.stats.stored == 1


def test_a_stream_dropped_unread_gives_its_lock_back(provider, memory_session):
    """A streamed response neither read, released nor closed, then dropped: ended once garbage-collected, so
    an identical request (another thread: a thread never waits for itself) does not wait for the lock."""
    url, body = url_for(provider, "anthropic"), body_for("anthropic", stream=True)

    async def drop() -> None:
        async with aiohttp.ClientSession() as client:
            response = await client.post(url, json=body)
            assert response.headers["x-metrion-cache"] == "MISS"
            del response
            gc.collect()

    asyncio.run(drop())
    gc.collect()
    started = time.monotonic()
    in_the_block = contextvars.copy_context()  # a cache() block covers its thread only
    answers: list[Any] = []
    other = threading.Thread(target=lambda: answers.append(in_the_block.run(post, url, body, how="lines")))
    other.start()
    other.join(timeout=60)
    ((again, _),) = answers[0]
    assert time.monotonic() - started < 5, "the dropped stream's single-flight lock was not given back"
    assert again.headers["x-metrion-cache"] == "MISS" and provider.call_count == 2


def test_a_stream_the_provider_cuts_raises_and_stores_nothing(provider, memory_session):
    """The provider hangs up mid-stream: the caller gets aiohttp's payload error; no entry; the lock is given back."""
    url, body = url_for(provider, "openai", True), body_for("openai", stream=True)
    with pytest.raises(aiohttp.ClientPayloadError):
        post(url, body, how="lines", headers={"x-simulate": "cut-stream"})
    assert memory_session.store.keys(memory_session.settings.namespace) == []
    started = time.monotonic()
    ((again, _),) = post(url, body, how="lines")
    assert again.headers["x-metrion-cache"] == "MISS" and time.monotonic() - started < 5


def test_a_provider_error_passes_through_and_is_not_stored(provider, memory_session):
    """A 429 from the provider is the provider's own response, tagged, and is never stored."""
    url, body = url_for(provider, "anthropic"), body_for("anthropic")
    ((first, error_body),) = post(url, body, headers={"x-simulate": "status-429"})
    assert first.status == 429 and first.headers["x-metrion-cache"] == "MISS"
    assert json.loads(error_body)["error"]["type"] == "rate_limit_error"
    assert first.headers.getall("x-metrion-cache") == ["MISS"]
    ((second, _),) = post(url, body)
    assert second.status == 200 and second.headers["x-metrion-cache"] == "MISS"
    assert provider.call_count == 2


def test_a_gzipped_answer_is_stored_decoded_and_replayed(provider, memory_session):
    """The provider gzips its answer: aiohttp decodes it, the cache stores the decoded body, the hit serves it plain."""
    url, body = url_for(provider, "openai"), body_for("openai")
    (miss, miss_body), (hit, hit_body) = post(url, body, headers={"x-simulate": "gzip"}, times=2)
    assert (miss.headers["x-metrion-cache"], hit.headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert json.loads(hit_body) == json.loads(miss_body)
    assert "content-encoding" not in hit.headers and "content-encoding" not in miss.headers
    assert provider.call_count == 1


def test_a_session_that_keeps_bodies_compressed_is_passed_through(provider, memory_session, caplog, monkeypatch):
    """auto_decompress=False: the cache would see compressed bytes, so such requests are not cached, and it says so."""
    monkeypatch.setattr(integrations, "_warned", set())  # the warning is given once per process
    url, body = url_for(provider, "openai"), body_for("openai")
    answers = post(url, body, headers={"x-simulate": "gzip"}, times=2, auto_decompress=False)
    for response, raw in answers:
        assert "x-metrion-cache" not in response.headers and response.headers["content-encoding"] == "gzip"
        assert raw.startswith(b"\x1f\x8b")
    assert provider.call_count == 2 and memory_session.calls == []
    assert "auto_decompress=False are not cached" in caplog.text


# -- other traffic, modes, single flight ---------------------------------------------------------


def test_other_traffic_is_untouched_and_its_body_never_read(provider, memory_session, monkeypatch):
    """A request no wire format matches goes out as it came (body streamed, not read) and comes back untagged."""

    def read_request(self: Any) -> Any:
        raise AssertionError("the body of a request that is not an LLM call was read")

    monkeypatch.setattr(mf_aiohttp._Upstream, "read_request", read_request)

    async def upload() -> Any:
        yield b"part one, "
        yield b"part two"

    async def run() -> tuple[aiohttp.ClientResponse, bytes]:
        async with aiohttp.ClientSession() as client:
            async with client.post(provider.url + "/v1/files", data=upload()) as response:
                return response, await response.read()

    response, _ = asyncio.run(run())
    assert response.status == 404  # the simulated provider has no such route
    assert "x-metrion-cache" not in response.headers
    assert provider.calls[-1].body == b"part one, part two"
    assert memory_session.calls == [] and memory_session.stats.bypassed == 0


def test_a_request_outside_any_session_gets_no_middleware(provider, memory_session):
    """With the patch installed but no session active for this task, aiohttp runs as if there were no cache."""

    async def run() -> aiohttp.ClientResponse:
        async with aiohttp.ClientSession() as client:
            async with client.post(url_for(provider, "anthropic"), json=body_for("anthropic")) as response:
                await response.read()
                return response

    async def outside() -> aiohttp.ClientResponse:
        # A task started from an empty context sees no cache() block.
        return await contextvars.Context().run(asyncio.get_running_loop().create_task, run())

    response = asyncio.run(outside())
    assert response.status == 200 and "x-metrion-cache" not in response.headers
    assert memory_session.calls == []


def test_the_request_header_chooses_the_mode_and_is_never_sent(provider, memory_session):
    """x-metrion-cache: refresh on an aiohttp request calls the provider again, and the header never reaches it."""
    url, body = url_for(provider, "openai"), body_for("openai")
    post(url, body)
    ((refreshed, _),) = post(url, body, headers={"x-metrion-cache": "refresh", "cache-control": "max-age=60"})
    assert refreshed.headers["x-metrion-cache"] == "REFRESH"
    assert provider.call_count == 2
    assert "x-metrion-cache" not in provider.calls[-1].headers and "cache-control" not in provider.calls[-1].headers


def test_a_replay_miss_is_the_providers_error_shape(provider, namespace):
    """In replay mode a request that is not cached gets the 400 in the provider's error shape, and no call is made."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace, mode="replay") as session:
        for sdk in ("anthropic", "gemini"):
            ((response, body),) = post(url_for(provider, sdk), body_for(sdk))
            assert response.status == 400 and not response.ok
            assert response.headers["x-should-retry"] == "false"
            assert response.headers["x-metrion-cache"] == "ERROR"
            error = json.loads(body)
            if sdk == "anthropic":
                assert error["type"] == "error" and error["error"]["message"].startswith("metrion cache:")
            else:
                assert error["error"]["code"] == 400 and error["error"]["message"].startswith("metrion cache:")
            with pytest.raises(aiohttp.ClientResponseError) as raised:
                response.raise_for_status()
            assert raised.value.status == 400
    assert provider.call_count == 0 and session.stats.errors == 2


def test_identical_concurrent_requests_make_one_provider_call(provider, memory_session):
    """Three identical aiohttp requests at once: one reaches the provider, the others wait for its entry."""
    provider.latency = 0.3
    try:

        async def one(client: aiohttp.ClientSession) -> str:
            async with client.post(url_for(provider, "anthropic"), json=body_for("anthropic")) as response:
                await response.read()
                return response.headers["x-metrion-cache"]

        async def run() -> list[str]:
            async with aiohttp.ClientSession() as client:
                return list(await asyncio.gather(one(client), one(client), one(client)))

        statuses = asyncio.run(run())
    finally:
        provider.latency = 0.0
    assert sorted(statuses) == ["HIT", "HIT", "MISS"]
    assert provider.call_count == 1


# -- one cache for every library -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("first", ["httpx2", "aiohttp"])
def test_an_entry_stored_by_one_library_is_a_hit_in_the_other(provider, memory_session, first, stream):
    """Stored through httpx2, a hit through aiohttp, and the other way round: one key, one entry."""
    url, body = url_for(provider, "anthropic"), body_for("anthropic", stream=stream)

    def through_httpx2() -> tuple[str, bytes]:
        with httpx2.Client() as client:
            response = client.post(url, json=body)
            return response.headers["x-metrion-cache"], response.content

    def through_aiohttp() -> tuple[str, bytes]:
        ((response, answer),) = post(url, body, how="lines")
        return response.headers["x-metrion-cache"], answer

    calls = [through_httpx2, through_aiohttp] if first == "httpx2" else [through_aiohttp, through_httpx2]
    (miss, miss_body), (hit, hit_body) = [one() for one in calls]
    assert (miss, hit) == ("MISS", "HIT")
    assert hit_body == miss_body
    assert provider.call_count == 1
    assert len(memory_session.store.keys(memory_session.settings.namespace)) == 1


def test_an_httpx_entry_for_gemini_is_a_hit_for_aiohttp_with_the_key_in_the_query(provider, memory_session):
    """Gemini's ?key= credential is read from aiohttp's query as from httpx's: same storage key (scope=credential)."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", scope="credential") as session:
        url = url_for(provider, "gemini") + "?key=AIza-query-secret-key"
        with httpx.Client() as client:
            assert client.post(url, json=body_for("gemini")).headers["x-metrion-cache"] == "MISS"
        ((hit, _),) = post(url, body_for("gemini"))
        assert hit.headers["x-metrion-cache"] == "HIT"
        ((other_key, _),) = post(url_for(provider, "gemini") + "?key=another-key", body_for("gemini"))
        assert other_key.headers["x-metrion-cache"] == "MISS"
    assert provider.call_count == 2 and session.stats.hits == 1


# -- google-genai's client.aio -------------------------------------------------------------------


@pytest.fixture
def genai_on_aiohttp_only(monkeypatch) -> list[str]:
    """Fails any httpx / httpx2 async request, and lists the URLs aiohttp's ``_request`` was given."""
    seen: list[str] = []
    patched = aiohttp.ClientSession._request

    async def _request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        seen.append(str(str_or_url))
        return await patched(self, method, str_or_url, **kwargs)

    async def no_httpx(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("google-genai's async client went through httpx, not aiohttp")

    monkeypatch.setattr(aiohttp.ClientSession, "_request", _request)
    for hx in (httpx, httpx2):
        monkeypatch.setattr(hx.AsyncClient, "send", no_httpx)
    return seen


def gemini_client(base_url: str) -> genai.Client:
    # No transport argument: with aiohttp installed, client.aio uses aiohttp.
    return genai.Client(api_key=GEMINI_KEY, http_options=genai_types.HttpOptions(base_url=base_url))


async def _twice(make: Callable[[], Awaitable[str]]) -> list[str]:
    return [await make(), await make()]


def test_google_genai_aio_generate_content_miss_then_hit(provider, memory_session, genai_on_aiohttp_only):
    """client.aio.models.generate_content twice, with no transport given: MISS then HIT, through aiohttp."""
    client = gemini_client(provider.url)

    async def generate() -> str:
        response = await client.aio.models.generate_content(model="gemini-2.5-flash", contents=QUESTION)
        assert response.sdk_http_response is not None
        return f"{response.sdk_http_response.headers['x-metrion-cache']}:{response.text}"

    miss, hit = asyncio.run(_twice(generate))
    assert miss.startswith("MISS:") and hit.startswith("HIT:") and "delivery" in hit
    assert miss.partition(":")[2] == hit.partition(":")[2]
    assert provider.call_count == 1 and [c.status for c in memory_session.calls] == ["MISS", "HIT"]
    assert len(genai_on_aiohttp_only) == 2 and all(":generateContent" in url for url in genai_on_aiohttp_only)


def test_google_genai_aio_generate_content_stream_miss_then_hit(provider, memory_session, genai_on_aiohttp_only):
    """client.aio.models.generate_content_stream twice: MISS then HIT with the same chunks, one provider call."""
    client = gemini_client(provider.url)

    async def stream() -> str:
        chunks = [
            chunk
            async for chunk in await client.aio.models.generate_content_stream(
                model="gemini-2.5-flash", contents="How do I return a parcel?"
            )
        ]
        assert len(chunks) > 3 and chunks[0].sdk_http_response is not None
        status = chunks[0].sdk_http_response.headers["x-metrion-cache"]
        return f"{status}:{''.join(chunk.text or '' for chunk in chunks)}"

    miss, hit = asyncio.run(_twice(stream))
    assert miss.startswith("MISS:") and hit.startswith("HIT:")
    assert miss.partition(":")[2] == hit.partition(":")[2] and "return a parcel" in hit
    assert provider.call_count == 1
    assert [(c.status, c.stream) for c in memory_session.calls] == [("MISS", True), ("HIT", True)]
    assert memory_session.stats.stored == 1
    assert len(genai_on_aiohttp_only) == 2 and all("streamGenerateContent" in url for url in genai_on_aiohttp_only)


def test_google_genai_aio_stream_left_early_gives_the_lock_back_on_every_store(provider, session):
    """Stop reading a client.aio stream and return from asyncio.run: the next identical call does not wait for a lock.

    google-genai releases the stream without awaiting, and asyncio.run then cancels pending tasks:
    the stream's end must not depend on a task running later.
    """
    client = gemini_client(provider.url)
    question = "Can I change my delivery address?"

    async def first_chunk() -> None:
        async for _ in await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents=question):
            break

    async def whole() -> str:
        stream = await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents=question)
        return "".join([chunk.text or "" async for chunk in stream])

    asyncio.run(first_chunk())
    started = time.monotonic()
    assert "Standard delivery" in asyncio.run(whole())
    assert time.monotonic() - started < 5, "the abandoned stream's single-flight lock was not given back"
    assert [c.status for c in session.calls] == ["MISS", "MISS"] and session.stats.stored == 1


# -- the patch and the explicit middleware -------------------------------------------------------


def test_enable_patches_request_and_disable_puts_the_original_back(namespace):
    """enable() wraps ClientSession._request (its signature unchanged, for google-genai); disable() restores it."""
    assert not patching.installed()
    original = aiohttp.ClientSession.__dict__["_request"]
    metrion_fixture.enable(f"memory://{uuid.uuid4().hex}", namespace=namespace)
    try:
        patched = aiohttp.ClientSession.__dict__["_request"]
        assert patched is not original and patched.__wrapped__ is original
        assert inspect.signature(aiohttp.ClientSession._request) == inspect.signature(original)
    finally:
        metrion_fixture.disable()
    assert aiohttp.ClientSession.__dict__["_request"] is original


def test_a_session_made_before_the_cache_is_on_is_cached(provider, namespace):
    """A ClientSession created before cache() (as google-genai keeps one per loop) is cached inside the block."""

    async def run() -> list[str]:
        statuses = []
        async with aiohttp.ClientSession() as client:
            with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace):
                for _ in range(2):
                    async with client.post(url_for(provider, "openai"), json=body_for("openai")) as response:
                        await response.read()
                        statuses.append(response.headers["x-metrion-cache"])
        return statuses

    assert asyncio.run(run()) == ["MISS", "HIT"]
    assert provider.call_count == 1


def test_the_session_and_request_middlewares_still_run_around_the_cache(provider, memory_session):
    """The user's middlewares (the session's, or a request's own) run outside the cache and see its answers."""
    seen: list[tuple[str, str]] = []

    async def watcher(request: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
        response = await handler(request)
        seen.append(("session", response.headers["x-metrion-cache"]))
        return response

    async def own(request: aiohttp.ClientRequest, handler: Any) -> aiohttp.ClientResponse:
        response = await handler(request)
        seen.append(("request", response.headers["x-metrion-cache"]))
        return response

    async def run() -> None:
        url = url_for(provider, "anthropic")
        async with aiohttp.ClientSession(middlewares=(watcher,)) as client:
            async with client.post(url, json=body_for("anthropic")) as response:
                await response.read()
            async with client.post(url, json=body_for("anthropic"), middlewares=(own,)) as response:
                await response.read()

    asyncio.run(run())
    assert seen == [("session", "MISS"), ("request", "HIT")]


def test_the_explicit_middleware_caches_without_the_patch(provider, namespace):
    """CacheMiddleware(url=...) on a session of one's own: MISS then HIT, with no enable() and no patch."""
    assert not patching.installed()
    middleware = mf_aiohttp.CacheMiddleware(url=f"memory://{uuid.uuid4().hex}", namespace=namespace)
    answers = post(url_for(provider, "gemini"), body_for("gemini"), times=2, middlewares=(middleware,))
    assert [response.headers["x-metrion-cache"] for response, _ in answers] == ["MISS", "HIT"]
    assert provider.call_count == 1 and middleware.session is not None and middleware.session.stats.hits == 1


def test_an_explicit_middleware_inside_a_cache_block_caches_once(provider, memory_session, namespace):
    """With the patch on, a session that has its own CacheMiddleware is not given a second one."""
    middleware = mf_aiohttp.CacheMiddleware(url=f"memory://{uuid.uuid4().hex}", namespace=namespace)
    answers = post(url_for(provider, "anthropic"), body_for("anthropic"), times=2, middlewares=(middleware,))
    assert [response.headers.getall("x-metrion-cache") for response, _ in answers] == [["MISS"], ["HIT"]]
    assert memory_session.calls == [] and middleware.session is not None and len(middleware.session.calls) == 2


def test_a_custom_response_class_is_kept(provider, memory_session):
    """A session's own response class is the class of the cache's answers too (hit, stored miss, recorded stream)."""

    class Mine(aiohttp.ClientResponse):
        pass

    json_answers = post(url_for(provider, "openai"), body_for("openai"), times=2, response_class=Mine)
    stream_answers = post(
        url_for(provider, "anthropic"), body_for("anthropic", stream=True), times=2, response_class=Mine
    )
    assert all(isinstance(response, Mine) for response, _ in [*json_answers, *stream_answers])
    statuses = [response.headers["x-metrion-cache"] for response, _ in [*json_answers, *stream_answers]]
    assert statuses == ["MISS", "HIT", "MISS", "HIT"]


def test_aiohttp_is_imported_only_by_the_user_and_patched_when_it_is(tmp_path):
    """enable() does not import aiohttp; importing it afterwards patches ClientSession, disable() unpatches it."""
    script = """
import sys
import metrion_fixture
metrion_fixture.enable("memory://import-hook")
assert "aiohttp" not in sys.modules, "enable() imported aiohttp"
import aiohttp
assert hasattr(aiohttp.ClientSession._request, "__wrapped__"), "aiohttp imported later was not patched"
metrion_fixture.disable()
assert not hasattr(aiohttp.ClientSession._request, "__wrapped__")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
