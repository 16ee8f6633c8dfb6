"""Bad input: whatever the caller or the provider sends, the cache passes it through or answers the clear 400.

It never raises from inside the transport and never stores a malformed answer.
Driven through a raw httpx2 client whose provider is a MockTransport, so
hypothesis can try many inputs quickly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from metrion_fixture import CacheSession
from metrion_fixture.core.entry import Entry
from metrion_fixture.formats.base import sse_events
from metrion_fixture.stores import open_store
from metrion_fixture.transports.httpx2 import CacheTransport

STORE = "memory://reliability-fuzz"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUTES = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "ok"}]}

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)


class Provider:
    """A MockTransport provider that records what it received and answers what the test tells it to."""

    def __init__(self, answer: Callable[[httpx2.Request], httpx2.Response] | None = None) -> None:
        self.received: list[httpx2.Request] = []
        self.answer = answer or (lambda request: httpx2.Response(200, json=ANTHROPIC_ANSWER))

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.received.append(request)
        return self.answer(request)


@pytest.fixture(scope="module", autouse=True)
def _clean_store() -> Iterator[None]:
    yield
    open_store(STORE).delete_prefix("")


def client_for(provider: Provider, **options: Any) -> tuple[httpx2.Client, CacheSession]:
    session = CacheSession(STORE, namespace=f"fuzz-{uuid.uuid4().hex[:12]}", **options)
    transport = CacheTransport(httpx2.MockTransport(provider), session=session)
    return httpx2.Client(transport=transport, base_url="https://provider.test"), session


def stored_values(session: CacheSession) -> list[bytes]:
    store = session.store
    return [store.get(key) or b"" for key in store.keys(f"{session.settings.namespace}:")]


def assert_clear_400(response: httpx2.Response) -> None:
    assert response.status_code == 400
    assert response.headers["x-metrion-cache"] == "ERROR" and response.headers["x-should-retry"] == "false"
    assert json.loads(response.content)["error"]["message"].startswith("metrion cache:")


@FUZZ
@given(mode=header_text, cache_control=header_text, route=st.sampled_from(sorted(ROUTES)))
@example(mode="TRUE ", cache_control="max-age=60", route="anthropic")
@example(mode="true", cache_control="max-age=" + "9" * 5000, route="anthropic")
@example(mode="refresh", cache_control='no-cache, max-age="10"', route="openai")
@example(mode="", cache_control="max-age=-1", route="openai")
def test_any_directive_headers_are_obeyed_or_refused_with_the_400(mode, cache_control, route):
    """Any x-metrion-cache / Cache-Control value: a provider answer, or the 400; never an exception; never sent upstream."""
    provider = Provider()
    client, session = client_for(provider)
    with client:
        response = client.post(
            ROUTES[route],
            json=GOOD,
            headers={"x-metrion-cache": mode.encode("latin-1"), "cache-control": cache_control.encode("latin-1")},
        )
    if response.status_code == 400:
        assert_clear_400(response)
        assert provider.received == [] and stored_values(session) == []
        return
    assert response.status_code == 200
    assert response.headers["x-metrion-cache"] in {"MISS", "REFRESH", "BYPASS"}
    assert len(provider.received) == 1
    sent = provider.received[0].headers
    assert "x-metrion-cache" not in sent and "cache-control" not in sent
    for key in session.store.keys(f"{session.settings.namespace}:"):
        assert 0 < session.store.ttl(key) <= 365 * 86400 + 1


@FUZZ
@given(
    max_age=st.one_of(
        st.integers(min_value=-(10**30), max_value=10**30), st.text(st.characters(exclude_characters=","), max_size=12)
    )
)
@example(max_age="0\n0")  # a newline inside the value: the 400, not "no max-age"
def test_any_max_age_value(max_age):
    """max-age=<anything>: a number of seconds is stored for at most 365 days (0: not stored); anything else is the 400."""
    provider = Provider()
    client, session = client_for(provider)
    with client:
        try:
            response = client.post(ROUTES["anthropic"], json=GOOD, headers={"cache-control": f"max-age={max_age}"})
        except (httpx2.LocalProtocolError, UnicodeEncodeError, ValueError):
            return  # a header value httpx2 itself refuses to send never reaches the cache
    values = stored_values(session)
    text = str(max_age).strip().strip('"')
    if not (text.isascii() and text.isdigit()):
        assert_clear_400(response)
        assert values == []
        return
    assert response.status_code == 200 and response.headers["x-metrion-cache"] == "MISS"
    assert len(values) == (0 if int(text) == 0 else 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
request_bodies = st.one_of(
    st.binary(max_size=300),  # not JSON, not UTF-8
    json_values.map(lambda value: json.dumps(value).encode()),  # JSON, usually not a chat request
    st.fixed_dictionaries(
        {"model": json_values, "messages": json_values},
        optional={"stream": json_values, "system": json_values, "extra": json_values},
    ).map(lambda value: json.dumps(value).encode()),  # the right keys, wrong types
    st.fixed_dictionaries(
        {"model": st.text(min_size=1, max_size=10), "messages": st.lists(json_values, max_size=3)},
        optional={"unknown_field": json_values, "temperature": json_values, "stream": st.booleans()},
    ).map(lambda value: json.dumps(value).encode()),  # a chat request with unknown fields
)


@FUZZ
@given(body=request_bodies, route=st.sampled_from(sorted(ROUTES)))
@example(body=b"[" * 100_000 + b"]" * 100_000, route="anthropic")  # deeper than json can parse
@example(body=b'{"model": "m", "messages": "not a list"}', route="openai")
@example(body=b'{"model": "m", "messages": [{"content": "\xff\xfe"}]}', route="anthropic")  # not UTF-8
@example(body=json.dumps({"model": "m", "messages": ["x" * 4_000_000]}).encode(), route="openai")  # huge
@example(body=b'{"model": "m", "messages": [], "stream": true}', route="anthropic")  # answered with JSON
def test_any_request_body_passes_through_untouched(body, route):
    """Any body: the provider receives exactly those bytes, the caller its answer; cached only if it is a chat request."""
    provider = Provider()
    client, session = client_for(provider)
    with client:
        response = client.post(ROUTES[route], content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json() == ANTHROPIC_ANSWER
    assert len(provider.received) == 1 and provider.received[0].content == body
    tag = response.headers["x-metrion-cache"]
    assert tag in {"MISS", "BYPASS"}
    # This provider answers JSON even when a stream was asked for: that answer is passed on but is
    # no complete stream, so it is never stored (the stream would not replay as one).
    stored = len(stored_values(session)) == 1
    assert stored == (tag == "MISS" and not asks_for_a_stream(body))


def asks_for_a_stream(body: bytes) -> bool:
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(request, dict) and request.get("stream") is True


@FUZZ
@given(
    status=st.sampled_from([200, 201, 204, 400, 404, 429, 500, 503]),
    body=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda value: json.dumps(value).encode()),
        st.just(json.dumps(ANTHROPIC_ANSWER).encode()),
    ),
    content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""]),
)
@example(status=200, body=b"not json", content_type="application/json")
@example(status=200, body=b'{"truncated": ', content_type="application/json")
def test_any_response_body_reaches_the_caller_and_only_good_answers_are_stored(status, body, content_type):
    """Any provider answer reaches the caller as sent; only a 2xx JSON answer is stored, and a hit replays it exactly."""
    headers = {"content-type": content_type} if content_type else {}
    provider = Provider(lambda request: httpx2.Response(status, content=body, headers=headers))
    client, session = client_for(provider)
    with client:
        first = client.post(ROUTES["anthropic"], json=GOOD)
        second = client.post(ROUTES["anthropic"], json=GOOD)
    assert (first.status_code, first.content) == (status, body)
    assert (second.status_code, second.content) == (status, body)
    values = stored_values(session)
    if values:
        assert 200 <= status < 300 and isinstance(json.loads(body), dict)
        assert second.headers["x-metrion-cache"] == "HIT" and len(provider.received) == 1
    else:
        assert second.headers["x-metrion-cache"] == "MISS" and len(provider.received) == 2
    if not (200 <= status < 300):
        assert values == []


# Anthropic's final state: the answer is complete once it arrived (message_stop is only its trailer).
FINAL_STATE = b'event: message_delta\ndata: {"delta": {"stop_reason": "end_turn"}}\n\n'
sse_lines = st.one_of(
    st.sampled_from(
        [
            b"event: message_start\ndata: {}\n\n",
            b'event: content_block_delta\ndata: {"delta": {"text": "x"}}\n\n',
            b"data: not json\n\n",
            b": a comment\n",
            b"event: ping\n\n",
            b"event\n\n",
            b"data\n",
            b"\r\n",
            b'event: error\ndata: {"type": "error"}\n\n',
            FINAL_STATE,
            b"event: message_stop\ndata: {}\n\n",
        ]
    ),
    st.binary(max_size=50),
)


def sse_answer(chunks: list[bytes]) -> Callable[[httpx2.Request], httpx2.Response]:
    return lambda request: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, content=iter(list(chunks))
    )


@FUZZ
@given(chunks=st.lists(sse_lines, max_size=12))
@example(chunks=[b"event: message_start\ndata: {}\n\n"])  # no final state
@example(chunks=[b"event: message_stop\ndata: {}\n\n"])  # a trailer without the final state
@example(chunks=[FINAL_STATE[:-1], b"\n"])
@example(chunks=[FINAL_STATE, b"event: message_stop\ndata: {}\n", b"\n"])
@example(chunks=[FINAL_STATE, b"event: content_block_delta\ndata: {}\n\n"])
@example(chunks=[b"data: " + b"x" * 2_000_000, b"\n\n" + FINAL_STATE])  # a giant event
@example(chunks=[b"event: error\ndata: {}\n\n", FINAL_STATE])
def test_any_event_stream_reaches_the_caller_and_only_complete_ones_are_stored(chunks):
    """Any SSE stream reaches the caller byte for byte; stored only with the final state, no error, replayed exactly."""
    provider = Provider(sse_answer(chunks))
    client, session = client_for(provider)
    request = {**GOOD, "stream": True}
    with client:
        with client.stream("POST", ROUTES["anthropic"], json=request) as first:
            received = b"".join(first.iter_raw())
        values = stored_values(session)
        second = client.post(ROUTES["anthropic"], json=request)
    sent = b"".join(chunks)
    assert received == sent and second.content == sent
    if values:
        events = [event for event, _ in sse_events([sent])]  # the whole body parsed at once, not chunk by chunk
        assert "message_delta" in events and "error" not in events
        stored = Entry.decode(values[0])
        assert [c for c in stored.chunks if c] == [c for c in chunks if c]
        assert second.headers["x-metrion-cache"] == "HIT" and len(provider.received) == 1
    else:
        assert second.headers["x-metrion-cache"] == "MISS" and len(provider.received) == 2


def test_a_giant_unterminated_stream_over_the_size_cap_is_passed_on_not_stored():
    """A stream bigger than max_entry_bytes, arriving in small chunks with no line breaks, is passed on and not stored."""
    chunks = [b"data: "] + [b"y" * 4096] * 256 + [b"\n\n" + FINAL_STATE]
    provider = Provider(sse_answer(chunks))
    client, session = client_for(provider, max_entry_bytes=64 * 1024)
    with client, client.stream("POST", ROUTES["anthropic"], json={**GOOD, "stream": True}) as response:
        assert b"".join(response.iter_raw()) == b"".join(chunks)
    assert stored_values(session) == [] and response.headers["x-metrion-cache"] == "MISS"


@pytest.mark.parametrize(
    "error",
    [
        {"error": {"message": "Provider returned error", "code": 502, "metadata": {"provider_name": "Groq"}}},
        {
            "object": "error",
            "message": "max_tokens is too large",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    ],
    ids=["openrouter", "vllm"],
)
def test_a_gateways_200_error_object_is_passed_on_and_never_stored(error):
    """OpenAI-compatible gateways answer some failures with a 200 and an error object: never an answer to replay."""
    provider = Provider(lambda request: httpx2.Response(200, json=error))
    client, session = client_for(provider)
    with client:
        first = client.post(ROUTES["openai"], json=GOOD)
        second = client.post(ROUTES["openai"], json=GOOD)
    assert first.json() == error and second.json() == error
    assert [first.headers["x-metrion-cache"], second.headers["x-metrion-cache"]] == ["MISS", "MISS"]
    assert stored_values(session) == [] and len(provider.received) == 2
