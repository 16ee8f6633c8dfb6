"""Which clients the cache reaches and how: raw httpx / httpx2 clients, mock, custom and
mounted transports, explicit cache transports, the patch's life cycle, and a failing store."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from sdk_calls import QUESTION, SDKS, acall, call

import metrion_fixture
import metrion_fixture.transports.httpx as mf_httpx
import metrion_fixture.transports.httpx2 as mf_httpx2
from metrion_fixture.core.entry import Entry
from metrion_fixture.integrations import patching

LIBS = {"httpx": httpx, "httpx2": httpx2}
CACHE_TRANSPORTS = {"httpx": mf_httpx, "httpx2": mf_httpx2}
CLIENT_CLASSES = [(hx, name) for hx in (httpx, httpx2) for name in ("Client", "AsyncClient")]
ROUTES = {  # sdk -> (path, model, wire format name)
    "anthropic": ("/v1/messages", "claude-test", "anthropic_messages"),
    "openai": ("/v1/chat/completions", "gpt-test", "openai_chat"),
}
DEAD_REDIS = "redis://127.0.0.1:1"  # nothing listens on port 1

sync_async = pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
both_libs = pytest.mark.parametrize("lib", sorted(LIBS))


def body_for(sdk: str, stream: bool = False) -> dict:
    _, model, _ = ROUTES[sdk]
    body: dict[str, Any] = {
        "model": model,
        "messages": QUESTION,
        **({"stream": True} if stream else {}),
    }
    if sdk == "anthropic":
        body["max_tokens"] = 100
    return body


def storage_key(namespace: str, sdk: str, stream: bool = False) -> str:
    _, model, wire = ROUTES[sdk]
    return f"{namespace}:{wire}:{'stream' if stream else 'json'}:{metrion_fixture.cache_key(model, QUESTION)}"


def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


def post_twice(
    lib: str,
    use_async: bool,
    url: str,
    *,
    sdk: str = "anthropic",
    stream: bool = False,
    **client_options: Callable[[], Any] | Any,
) -> list[tuple[str | None, bytes]]:
    """Two identical POSTs with one raw client; each answer's x-metrion-cache header and body.

    Callable options are called first, so transports are built inside the event loop that uses them.
    """
    hx = LIBS[lib]
    path = ROUTES[sdk][0]

    def options() -> dict[str, Any]:
        return {name: value() if callable(value) else value for name, value in client_options.items()}

    def sync() -> list[tuple[str | None, bytes]]:
        with hx.Client(**options()) as client:
            answers = [client.post(url + path, json=body_for(sdk, stream)) for _ in range(2)]
        return [(r.headers.get("x-metrion-cache"), r.content) for r in answers]

    async def run_async() -> list[tuple[str | None, bytes]]:
        async with hx.AsyncClient(**options()) as client:
            answers = [await client.post(url + path, json=body_for(sdk, stream)) for _ in range(2)]
        return [(r.headers.get("x-metrion-cache"), r.content) for r in answers]

    return asyncio.run(run_async()) if use_async else sync()


def assert_miss_then_hit(answers: list[tuple[str | None, bytes]]) -> None:
    (first, first_body), (second, second_body) = answers
    assert (first, second) == ("MISS", "HIT")
    assert second_body == first_body


@pytest.fixture
def unpatched() -> Iterator[None]:
    """No cache session and no patch, before and after: the explicit-transport and life-cycle tests need a clean slate."""
    assert not patching.installed(), "a cache patch leaked from an earlier test"
    originals = {(hx, name): getattr(hx, name).__dict__["_transport_for_url"] for hx, name in CLIENT_CLASSES}
    try:
        yield
    finally:
        metrion_fixture.disable()
        for (hx, name), original in originals.items():
            getattr(hx, name)._transport_for_url = original
        assert not patching.installed()


# -- 7. raw clients ---------------------------------------------------------------------------


@sync_async
@both_libs
@pytest.mark.parametrize("sdk", SDKS)
def test_raw_clients_hit_after_miss(provider, memory_session, sdk, lib, use_async):
    """A bare httpx / httpx2 client, sync or async, is cached like the SDKs are."""
    assert_miss_then_hit(post_twice(lib, use_async, provider.url, sdk=sdk))
    assert provider.call_count == 1
    assert [r.status for r in memory_session.calls] == ["MISS", "HIT"]
    assert all(r.wire_format == ROUTES[sdk][2] for r in memory_session.calls)


# -- 8. mock, custom and mounted transports -----------------------------------------------------

# The shortest stream the cache calls complete: message_delta says why the message stopped.
SSE = (
    b'event: message_start\ndata: {"type":"message_start"}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)
MOCK_ANSWERS = {  # how the mock builds its response
    "json": lambda hx: hx.Response(200, json={"id": "msg_mock", "content": [{"type": "text", "text": "hi"}]}),
    "content": lambda hx: hx.Response(
        200,
        content=b'{"id":"msg_mock","content":[]}',
        headers={"content-type": "application/json"},
    ),
    "sse": lambda hx: hx.Response(200, content=SSE, headers={"content-type": "text/event-stream"}),
}


@sync_async
@both_libs
@pytest.mark.parametrize("answer", sorted(MOCK_ANSWERS))
def test_mock_transport_answers_are_stored_and_hit(memory_session, namespace, answer, lib, use_async):
    """A MockTransport answer (json=, content=, or an event stream) is stored; the hit does not call the handler."""
    hx = LIBS[lib]
    handled: list[Any] = []

    def handler(request):
        handled.append(request)
        return MOCK_ANSWERS[answer](hx)

    stream = answer == "sse"
    transport = lambda: hx.MockTransport(handler)
    answers = post_twice(lib, use_async, "http://llm.test", stream=stream, transport=transport)

    assert_miss_then_hit(answers)
    assert len(handled) == 1
    assert answers[0][1] == MOCK_ANSWERS[answer](hx).content
    entry = Entry.decode(memory_session.store.get(storage_key(namespace, "anthropic", stream=stream)))
    assert entry.stream is stream
    assert b"".join(entry.chunks) == answers[0][1]


def counting(base: type) -> tuple[type, list[Any]]:
    """A subclass of the transport ``base`` that notes every request it sends."""
    sent: list[Any] = []

    class Counting(base):  # type: ignore[misc,valid-type]
        def handle_request(self, request):
            sent.append(request)
            return super().handle_request(request)

        async def handle_async_request(self, request):
            sent.append(request)
            return await super().handle_async_request(request)

    return Counting, sent


@sync_async
@both_libs
def test_a_user_given_transport_is_cached_and_still_used(provider, memory_session, lib, use_async):
    """Client(transport=HTTPTransport(retries=1)): the user's transport sends the miss, the hit skips it."""
    hx = LIBS[lib]
    Counting, sent = counting(hx.AsyncHTTPTransport if use_async else hx.HTTPTransport)

    assert_miss_then_hit(post_twice(lib, use_async, provider.url, transport=lambda: Counting(retries=1)))
    assert len(sent) == 1 and provider.call_count == 1


@sync_async
@both_libs
def test_a_mounted_transport_is_cached_and_still_used(provider, memory_session, lib, use_async):
    """Client(mounts={"http://127.0.0.1": ...}): the mount sends the miss, the hit skips it."""
    hx = LIBS[lib]
    Counting, sent = counting(hx.AsyncHTTPTransport if use_async else hx.HTTPTransport)
    assert provider.url.startswith("http://127.0.0.1:")

    answers = post_twice(lib, use_async, provider.url, mounts=lambda: {"http://127.0.0.1": Counting()})
    assert_miss_then_hit(answers)
    assert len(sent) == 1 and provider.call_count == 1


# -- 9. explicit cache transports ---------------------------------------------------------------


def explicit(lib: str, use_async: bool, **options: Any) -> Any:
    """An explicit cache transport around the library's default network transport."""
    hx, module = LIBS[lib], CACHE_TRANSPORTS[lib]
    if use_async:
        return module.AsyncCacheTransport(hx.AsyncHTTPTransport(), **options)
    return module.CacheTransport(hx.HTTPTransport(), **options)


@sync_async
@both_libs
def test_explicit_transport_caches_without_the_patch(provider, unpatched, namespace, lib, use_async):
    """Client(transport=CacheTransport(...)) caches on its own, with nothing patched."""
    holder: list[Any] = []

    def transport() -> Any:
        holder.append(explicit(lib, use_async, url=memory_url(), namespace=namespace))
        return holder[-1]

    assert_miss_then_hit(post_twice(lib, use_async, provider.url, transport=transport))
    assert not patching.installed()
    assert provider.call_count == 1
    session = holder[0].session
    assert (session.stats.misses, session.stats.hits, session.stats.stored) == (1, 1, 1)
    assert session.store.keys(namespace + ":") == [storage_key(namespace, "anthropic")]
    assert "x-metrion-cache" not in provider.calls[0].headers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@sync_async
@pytest.mark.parametrize("sdk", SDKS)
def test_sdk_with_an_explicit_transport_client(provider, unpatched, namespace, sdk, use_async, stream):
    """An SDK given http_client=httpx2.Client(transport=CacheTransport(...)) is cached, unpatched."""
    session = metrion_fixture.CacheSession(memory_url(), namespace=namespace)
    kwargs: dict[str, Any] = {"api_key": "k", "max_retries": 0}
    base_url = provider.url if sdk == "anthropic" else provider.url + "/v1"

    def sync() -> list[Any]:
        http = httpx2.Client(transport=mf_httpx2.CacheTransport(httpx2.HTTPTransport(), session=session))
        client = (anthropic.Anthropic if sdk == "anthropic" else openai.OpenAI)(
            base_url=base_url, http_client=http, **kwargs
        )
        return [call(sdk, provider.url, stream=stream, client=client) for _ in range(2)]

    async def run_async() -> list[Any]:
        http = httpx2.AsyncClient(transport=mf_httpx2.AsyncCacheTransport(httpx2.AsyncHTTPTransport(), session=session))
        client = (anthropic.AsyncAnthropic if sdk == "anthropic" else openai.AsyncOpenAI)(
            base_url=base_url, http_client=http, **kwargs
        )
        return [await acall(sdk, provider.url, stream=stream, client=client) for _ in range(2)]

    first, second = asyncio.run(run_async()) if use_async else sync()
    assert not patching.installed()
    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert second.text == first.text and "delivery" in first.text
    assert provider.call_count == 1
    assert [r.status for r in session.calls] == ["MISS", "HIT"]


@sync_async
@both_libs
def test_explicit_transport_inside_cache_block_caches_once(provider, memory_session, namespace, lib, use_async):
    """With cache() active, a client with its own CacheTransport is served by that transport only, not twice."""
    holder: list[Any] = []

    def transport() -> Any:
        holder.append(explicit(lib, use_async, url=memory_url(), namespace=namespace))
        return holder[-1]

    assert_miss_then_hit(post_twice(lib, use_async, provider.url, transport=transport))
    assert provider.call_count == 1
    assert memory_session.calls == [] and memory_session.stats.stored == 0
    assert memory_session.store.keys(namespace + ":") == []
    assert [r.status for r in holder[0].session.calls] == ["MISS", "HIT"]


# -- 10. enable / disable / cache() and the patch -----------------------------------------------


def current_patches() -> dict[tuple[Any, str], Any]:
    return {(hx, name): getattr(hx, name).__dict__["_transport_for_url"] for hx, name in CLIENT_CLASSES}


def test_enable_then_disable_restores_the_original_functions(unpatched, namespace):
    """enable() patches all four client classes; disable() puts back the very same function objects."""
    originals = current_patches()
    metrion_fixture.enable(memory_url(), namespace=namespace)
    assert patching.installed()
    patched = current_patches()
    assert all(patched[cls] is not originals[cls] for cls in originals)
    metrion_fixture.disable()
    assert not patching.installed()
    restored = current_patches()
    assert all(restored[cls] is originals[cls] for cls in originals)


def test_enable_twice_disable_once_leaves_nothing_installed(provider, unpatched, namespace):
    """A second enable() replaces the session without stacking a second patch; one disable() removes it."""
    originals = current_patches()
    first = metrion_fixture.enable(memory_url(), namespace=namespace)
    second = metrion_fixture.enable(memory_url(), namespace=namespace)
    assert_miss_then_hit(post_twice("httpx2", False, provider.url))
    assert first.calls == [] and [r.status for r in second.calls] == ["MISS", "HIT"]

    metrion_fixture.disable()
    assert not patching.installed()
    assert current_patches() == originals
    assert post_twice("httpx2", False, provider.url)[1][0] is None  # not cached any more
    assert provider.call_count == 3


def test_nested_cache_blocks(provider, unpatched, namespace):
    """The inner cache() block gets the records; the outer one resumes after it; nothing stays installed."""
    originals = current_patches()
    with metrion_fixture.cache(memory_url(), namespace=namespace) as outer:
        assert_miss_then_hit(post_twice("httpx2", False, provider.url))
        with metrion_fixture.cache(memory_url(), namespace=namespace) as inner:
            assert_miss_then_hit(post_twice("httpx2", False, provider.url))  # a fresh store: a miss again
        assert [r.status for r in inner.calls] == ["MISS", "HIT"]
        assert [r.status for r in outer.calls] == ["MISS", "HIT"]
        assert patching.installed()
        answers = post_twice("httpx2", False, provider.url)
        assert [status for status, _ in answers] == ["HIT", "HIT"]
        assert [r.status for r in outer.calls] == ["MISS", "HIT", "HIT", "HIT"]
    assert not patching.installed()
    assert current_patches() == originals
    assert provider.call_count == 2


def test_uninstall_leaves_a_later_patch_in_place(provider, unpatched, namespace):
    """Someone patching Client._transport_for_url after us keeps their patch when our block ends."""
    originals = current_patches()
    with metrion_fixture.cache(memory_url(), namespace=namespace) as session:
        ours = httpx2.Client.__dict__["_transport_for_url"]
        assert ours is not originals[(httpx2, "Client")]
        seen: list[str] = []

        def theirs(self, url):
            seen.append(str(url))
            return ours(self, url)

        httpx2.Client._transport_for_url = theirs
        assert_miss_then_hit(post_twice("httpx2", False, provider.url))

    assert not patching.installed()
    assert httpx2.Client.__dict__["_transport_for_url"] is theirs
    others = {cls: fn for cls, fn in current_patches().items() if cls != (httpx2, "Client")}
    assert all(fn is originals[cls] for cls, fn in others.items())
    # Their patch still runs, ours no longer caches through it.
    answers = post_twice("httpx2", False, provider.url)
    assert [status for status, _ in answers] == [None, None]
    assert len(seen) == 4 and provider.call_count == 3
    assert len(session.calls) == 2

    # Entering again patches over theirs; leaving restores theirs.
    with metrion_fixture.cache(memory_url(), namespace=namespace):
        assert httpx2.Client.__dict__["_transport_for_url"] is not theirs
        assert_miss_then_hit(post_twice("httpx2", False, provider.url))
    assert httpx2.Client.__dict__["_transport_for_url"] is theirs


@sync_async
@pytest.mark.parametrize("sdk", SDKS)
def test_clients_created_before_enable_are_cached(provider, unpatched, namespace, sdk, use_async):
    """An SDK client (and its connection pool) made before enable() is cached once enable() runs."""
    base_url = provider.url if sdk == "anthropic" else provider.url + "/v1"

    async def run_async() -> list[Any]:
        cls = anthropic.AsyncAnthropic if sdk == "anthropic" else openai.AsyncOpenAI
        client = cls(base_url=base_url, api_key="k", max_retries=0)
        before = await acall(sdk, provider.url, client=client)
        metrion_fixture.enable(memory_url(), namespace=namespace)
        return [
            before,
            *[await acall(sdk, provider.url, client=client) for _ in range(2)],
        ]

    def sync() -> list[Any]:
        cls = anthropic.Anthropic if sdk == "anthropic" else openai.OpenAI
        client = cls(base_url=base_url, api_key="k", max_retries=0)
        before = call(sdk, provider.url, client=client)
        metrion_fixture.enable(memory_url(), namespace=namespace)
        return [before, *[call(sdk, provider.url, client=client) for _ in range(2)]]

    answers = asyncio.run(run_async()) if use_async else sync()
    assert [a.cache for a in answers] == [None, "MISS", "HIT"]
    assert provider.call_count == 2


# -- 11. a store that is down or holds garbage ---------------------------------------------------


@sync_async
@pytest.mark.parametrize("sdk", SDKS)
def test_store_down_degrades_to_no_cache(provider, namespace, caplog, sdk, use_async):
    """With the store unreachable, requests still succeed through the provider; errors are counted, warned once."""
    caplog.set_level(logging.WARNING, logger="metrion_fixture")
    with metrion_fixture.cache(DEAD_REDIS, namespace=namespace) as session:
        answers = [call(sdk, provider.url, use_async=use_async) for _ in range(2)]
        streamed = call(sdk, provider.url, use_async=use_async, stream=True)

    assert [a.cache for a in answers] == ["MISS", "MISS"] and streamed.cache == "MISS"
    assert answers[1].text == answers[0].text == streamed.text and "delivery" in streamed.text
    assert provider.call_count == 3
    assert session.stats.store_errors == 6  # three failed reads, three failed writes
    assert session.stats.stored == 0 and session.stats.misses == 3
    warnings = [r for r in caplog.records if r.name == "metrion_fixture" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "127.0.0.1:1" in warnings[0].getMessage()


@sync_async
@pytest.mark.parametrize("sdk", SDKS)
def test_store_down_in_replay_mode_is_a_400_naming_the_store(provider, namespace, sdk, use_async):
    """In replay mode a store that cannot be read is an HTTP 400 saying so; the provider is not called."""
    error_type = anthropic.APIStatusError if sdk == "anthropic" else openai.APIStatusError
    with (
        metrion_fixture.cache(DEAD_REDIS, namespace=namespace, mode="replay") as session,
        pytest.raises(error_type) as raised,
    ):
        call(sdk, provider.url, use_async=use_async)

    error = raised.value
    assert error.status_code == 400
    assert error.response.headers["x-metrion-cache"] == "ERROR"
    assert error.response.headers["x-should-retry"] == "false"
    message = str(error)
    assert "metrion cache:" in message and "store could not be read" in message and "replay" in message
    assert "ConnectionError" in message
    assert provider.call_count == 0
    assert session.stats.errors == 1 and session.stats.store_errors == 1


CORRUPTIONS = {
    "garbage": lambda good: b"garbage",
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 2],
    "flipped-byte": lambda good: good[:40] + bytes([good[40] ^ 0xFF]) + good[41:],
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_entry_is_a_miss_then_replaced(provider, memory_session, namespace, corruption, stream):
    """A damaged stored value is a MISS (the provider answers), then overwritten by a good entry that hits."""
    key = storage_key(namespace, "anthropic", stream=stream)
    first = call("anthropic", provider.url, stream=stream)
    good = memory_session.store.get(key)
    memory_session.store.set(key, CORRUPTIONS[corruption](good), 3600)

    second = call("anthropic", provider.url, stream=stream)
    third = call("anthropic", provider.url, stream=stream)

    assert [a.cache for a in (first, second, third)] == ["MISS", "MISS", "HIT"]
    assert third.text == second.text == first.text
    assert provider.call_count == 2
    assert Entry.decode(memory_session.store.get(key)).key == metrion_fixture.cache_key("claude-test", QUESTION)
    assert memory_session.stats.stored == 2
