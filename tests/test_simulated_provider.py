"""The simulated provider, driven by the real SDKs and by raw HTTP clients."""

from __future__ import annotations

import dataclasses
import gzip
import json
import socket
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from metrion_fixture.testing.provider import DELIVERY_ANSWER, ReceivedCall, SimulatedProvider

ANTHROPIC_EVENTS = [
    "message_start",
    "content_block_start",
    "ping",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
]
HELLO_ANSWER = "Here is a simulated answer to: hello there"
HELLO: Any = [{"role": "user", "content": "hello there"}]
CLAUDE_STREAM = {"model": "m", "max_tokens": 5, "stream": True, "messages": HELLO}
GPT_STREAM = {"model": "m", "stream": True, "messages": HELLO}


@pytest.fixture
def provider() -> Iterator[SimulatedProvider]:
    with SimulatedProvider() as p:
        yield p


@pytest.fixture
def claude(provider: SimulatedProvider) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=provider.url, api_key="test", max_retries=0) as client:
        yield client


@pytest.fixture
def gpt(provider: SimulatedProvider) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=provider.url + "/v1", api_key="test", max_retries=0) as client:
        yield client


def ask_claude(client: anthropic.Anthropic, text: str = "hello there", **kwargs: Any) -> Any:
    messages = [{"role": "user", "content": text}]
    return client.messages.create(model="claude-sim", max_tokens=64, messages=messages, **kwargs)


def ask_gpt(client: openai.OpenAI, text: str = "hello there", **kwargs: Any) -> Any:
    return client.chat.completions.create(model="gpt-sim", messages=[{"role": "user", "content": text}], **kwargs)


def simulate(mode: str) -> dict[str, Any]:
    return {"extra_headers": {"x-simulate": mode}}


def sse_events(body: bytes) -> list[tuple[str | None, str]]:
    events = []
    for block in body.decode().split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((fields.get("event"), fields["data"]))
    return events


def raw_chunks(url: str, path: str, payload: dict[str, Any], mode: str = "") -> tuple[bytes, list[bytes]]:
    """POST over a bare socket; return the response head and the body's chunks as framed on the wire."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    head += f"x-simulate: {mode}\r\n" if mode else ""
    head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + body)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    response_head, rest = data.split(b"\r\n\r\n", 1)
    chunks = []
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]
        if size == 0:
            return response_head.lower(), chunks


def words(text: str) -> int:
    return len(text.split())


# -- Anthropic Messages ------------------------------------------------------------------------------


def test_anthropic_message_shape_usage_and_headers(provider: SimulatedProvider, claude: anthropic.Anthropic) -> None:
    raw = claude.messages.with_raw_response.create(
        model="claude-sim",
        max_tokens=64,
        system="You are a shop assistant.",
        messages=[{"role": "user", "content": "When does my delivery arrive?"}],
    )
    message = raw.parse()
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-sim"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == DELIVERY_ANSWER
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 5 + 5  # system words + question words
    assert message.usage.output_tokens == words(DELIVERY_ANSWER)
    assert message.usage.cache_creation_input_tokens == 0 and message.usage.cache_read_input_tokens == 0
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["request-id"].startswith("req_")
    assert int(raw.headers["anthropic-ratelimit-requests-remaining"]) > 0
    assert "set-cookie" in raw.headers
    assert provider.call_count == 1


def test_anthropic_answer_is_deterministic_and_reads_content_blocks(claude: anthropic.Anthropic) -> None:
    messages: Any = [
        {"role": "user", "content": "an earlier question about delivery"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
    ]
    first, second = (claude.messages.create(model="m", max_tokens=64, messages=messages) for _ in range(2))
    assert first.content[0].text == second.content[0].text == HELLO_ANSWER  # type: ignore[union-attr]
    assert first.id != second.id  # fresh ids tell a replay from a new upstream call
    assert first.usage.input_tokens == 5 + 3 + 2


def test_anthropic_text_stream(provider: SimulatedProvider, claude: anthropic.Anthropic) -> None:
    messages: Any = [{"role": "user", "content": "delivery times?"}]
    with claude.messages.stream(model="claude-sim", max_tokens=64, messages=messages) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == DELIVERY_ANSWER and len(pieces) == words(DELIVERY_ANSWER)
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == words(DELIVERY_ANSWER) and final.usage.input_tokens == 2
    assert provider.call_count == 1 and provider.calls[0].json["stream"] is True


def test_anthropic_create_stream_events(claude: anthropic.Anthropic) -> None:
    events = list(ask_claude(claude, stream=True))
    types = [e.type for e in events]
    # The SDK swallows ping events; the rest must arrive in the real order.
    assert types[:2] == ANTHROPIC_EVENTS[:2] and types[-3:] == ANTHROPIC_EVENTS[-3:]
    assert set(types[2:-3]) == {"content_block_delta"}
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == HELLO_ANSWER
    assert events[-2].usage.output_tokens == words(HELLO_ANSWER)


def test_anthropic_stream_wire_format_one_event_per_chunk(provider: SimulatedProvider) -> None:
    head, chunks = raw_chunks(provider.url, "/v1/messages", CLAUDE_STREAM)
    assert b"transfer-encoding: chunked" in head and b"content-type: text/event-stream" in head
    assert chunks[-1] == b"" and all(chunk.endswith(b"\n\n") for chunk in chunks[:-1])
    events = [sse_events(chunk) for chunk in chunks[:-1]]
    assert all(len(e) == 1 for e in events)
    names = [e[0][0] for e in events]
    assert names == ANTHROPIC_EVENTS[:3] + ["content_block_delta"] * words(HELLO_ANSWER) + ANTHROPIC_EVENTS[4:]
    assert all(json.loads(data)["type"] == name for [(name, data)] in events)


# -- OpenAI Chat Completions -------------------------------------------------------------------------


def test_openai_completion_shape_usage_and_headers(provider: SimulatedProvider, gpt: openai.OpenAI) -> None:
    raw = gpt.chat.completions.with_raw_response.create(
        model="gpt-sim",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "delivery?"}],
    )
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == "gpt-sim" and completion.created > 0
    choice = completion.choices[0]
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
    assert choice.message.role == "assistant" and choice.message.refusal is None
    assert choice.message.content == DELIVERY_ANSWER
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, words(DELIVERY_ANSWER))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert raw.headers["x-request-id"] and int(raw.headers["x-ratelimit-remaining-requests"]) > 0
    assert "set-cookie" in raw.headers
    assert provider.call_count == 1 and provider.calls[0].path == "/v1/chat/completions"


def test_openai_stream_with_usage(provider: SimulatedProvider, gpt: openai.OpenAI) -> None:
    chunks = list(ask_gpt(gpt, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == HELLO_ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, words(HELLO_ANSWER))
    assert all(c.usage is None for c in chunks[:-1])
    assert provider.call_count == 1


def test_openai_stream_without_usage_wire_format(provider: SimulatedProvider) -> None:
    head, chunks = raw_chunks(provider.url, "/chat/completions", GPT_STREAM)  # base URL without /v1
    assert b"transfer-encoding: chunked" in head
    events = [sse_events(chunk) for chunk in chunks[:-1]]
    assert all(len(e) == 1 and e[0][0] is None for e in events)
    assert events[-1][0][1] == "[DONE]"
    bodies = [json.loads(e[0][1]) for e in events[:-1]]
    assert all("usage" not in b for b in bodies) and bodies[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(bodies) == 2 + words(HELLO_ANSWER)
    assert provider.call_count == 1


# -- failure simulation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "anthropic_error", "anthropic_type", "openai_error"),
    [
        ("status-500", anthropic.InternalServerError, "api_error", openai.InternalServerError),
        ("status-429", anthropic.RateLimitError, "rate_limit_error", openai.RateLimitError),
        ("status-400", anthropic.BadRequestError, "invalid_request_error", openai.BadRequestError),
    ],
)
def test_status_errors_are_not_retried(
    provider: SimulatedProvider, mode: str, anthropic_error: type, anthropic_type: str, openai_error: type
) -> None:
    # max_retries > 0 on purpose: x-should-retry: false must keep the SDKs from retrying.
    with anthropic.Anthropic(base_url=provider.url, api_key="test", max_retries=2) as claude:
        with pytest.raises(anthropic_error) as a_err:
            ask_claude(claude, **simulate(mode))
    assert a_err.value.body["type"] == "error" and a_err.value.body["error"]["type"] == anthropic_type
    assert a_err.value.response.headers["x-should-retry"] == "false"
    with openai.OpenAI(base_url=provider.url + "/v1", api_key="test", max_retries=2) as gpt:
        with pytest.raises(openai_error) as o_err:
            ask_gpt(gpt, **simulate(mode))
    assert set(o_err.value.body) == {"message", "type", "param", "code"}
    assert provider.call_count == 2


def test_error_event_raises_in_both_sdks(claude: anthropic.Anthropic, gpt: openai.OpenAI) -> None:
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as a_err:
        for event in ask_claude(claude, stream=True, **simulate("error-event")):
            received.append(event.type)
    assert a_err.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert received and "message_stop" not in received
    with pytest.raises(openai.APIError, match="server had an error") as o_err:
        list(ask_gpt(gpt, stream=True, **simulate("error-event")))
    assert o_err.value.body == {"message": "server had an error", "type": "server_error"}


def test_error_event_ends_the_body_cleanly(provider: SimulatedProvider) -> None:
    _, chunks = raw_chunks(provider.url, "/v1/messages", CLAUDE_STREAM, "error-event")
    assert chunks[-1] == b"" and sse_events(chunks[-2])[0][0] == "error"
    assert 2 <= len(chunks) - 2 <= 8  # a few events before the error


def test_cut_stream_drops_the_connection_mid_body(provider: SimulatedProvider) -> None:
    received = b""
    with httpx.Client() as client:
        headers = {"x-simulate": "cut-stream"}
        with client.stream("POST", provider.url + "/v1/messages", json=CLAUDE_STREAM, headers=headers) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                for data in response.iter_bytes():
                    received += data
    names = [name for name, _ in sse_events(received)]
    assert names[0] == "message_start" and "message_delta" not in names and "message_stop" not in names


def test_cut_stream_through_the_sdks(claude: anthropic.Anthropic, gpt: openai.OpenAI) -> None:
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        list(ask_claude(claude, stream=True, **simulate("cut-stream")))
    with pytest.raises((openai.APIConnectionError, httpx2.RemoteProtocolError)):
        list(ask_gpt(gpt, stream=True, **simulate("cut-stream")))


def test_cut_json_body(provider: SimulatedProvider) -> None:
    payload = {"model": "m", "messages": HELLO}
    with httpx.Client() as client, pytest.raises(httpx.RemoteProtocolError):
        client.post(provider.url + "/v1/chat/completions", json=payload, headers={"x-simulate": "cut-stream"})


def test_no_terminator(provider: SimulatedProvider) -> None:
    headers = {"x-simulate": "no-terminator"}
    with httpx.Client(base_url=provider.url, headers=headers) as client:
        a_body = client.post("/v1/messages", json=CLAUDE_STREAM).content
        o_body = client.post("/v1/chat/completions", json=GPT_STREAM).content
    a_names = [name for name, _ in sse_events(a_body)]
    assert a_names[-1] == "message_delta" and "message_stop" not in a_names
    o_data = [data for _, data in sse_events(o_body)]
    assert "[DONE]" not in o_data and json.loads(o_data[-1])["choices"][0]["finish_reason"] == "stop"


def test_gzip_decodes_transparently(
    provider: SimulatedProvider, claude: anthropic.Anthropic, gpt: openai.OpenAI
) -> None:
    gz = {"x-simulate": "gzip"}
    assert ask_claude(claude, extra_headers=gz).content[0].text == HELLO_ANSWER
    assert ask_gpt(gpt, extra_headers=gz).choices[0].message.content == HELLO_ANSWER
    with claude.messages.stream(model="m", max_tokens=5, messages=HELLO, extra_headers=gz) as stream:
        assert "".join(stream.text_stream) == HELLO_ANSWER
    chunks = list(ask_gpt(gpt, stream=True, extra_headers=gz))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == HELLO_ANSWER
    with httpx.Client() as client:
        payload = {"model": "m", "messages": HELLO}
        with client.stream("POST", provider.url + "/v1/chat/completions", json=payload, headers=gz) as response:
            assert response.headers["content-encoding"] == "gzip"
            raw = b"".join(response.iter_raw())
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw))["choices"][0]["message"]["content"] == HELLO_ANSWER


def test_gzip_stream_chunks_decode_one_by_one(provider: SimulatedProvider) -> None:
    head, chunks = raw_chunks(provider.url, "/v1/chat/completions", GPT_STREAM, "gzip")
    assert b"content-encoding: gzip" in head
    decoder = zlib.decompressobj(wbits=31)
    # Every chunk but the gzip trailer and the terminator holds exactly one complete event.
    assert all(len(sse_events(decoder.decompress(chunk))) == 1 for chunk in chunks[:-2])
    assert decoder.decompress(chunks[-2]) == b"" and decoder.eof


def test_big_answer(claude: anthropic.Anthropic, gpt: openai.OpenAI) -> None:
    text = ask_claude(claude, **simulate("big")).content[0].text
    assert 2 * 1024 * 1024 <= len(text) < 3 * 1024 * 1024 and text.startswith(HELLO_ANSWER)
    chunks = list(ask_gpt(gpt, stream=True, **simulate("big")))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert len(chunks) < 100  # deltas are batched rather than one per word


def test_modes_combine(claude: anthropic.Anthropic) -> None:
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        list(ask_claude(claude, stream=True, **simulate("gzip, cut-stream")))


# -- routing, recording, lifecycle ------------------------------------------------------------------


def test_unknown_routes_and_bad_json(provider: SimulatedProvider) -> None:
    with httpx2.Client(base_url=provider.url) as client:
        assert client.get("/v1/models").status_code == 404
        assert client.get("/v1/messages").json()["error"]["type"] == "not_found_error"
        missing = client.post("/v1/embeddings", json={})
        assert missing.status_code == 404 and "error" in missing.json()
        bad = client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        bad = client.post("/v1/chat/completions", content=b"[1, 2]")
        assert bad.status_code == 400 and bad.json()["error"]["param"] is None
    assert len(provider.calls) == 5 and provider.call_count == 2  # only the POSTs to LLM endpoints count
    assert provider.calls[2].json == {} and provider.calls[3].json is None
    assert provider.calls[3].body == b"{not json"


def test_httpx2_raw_post_keep_alive(provider: SimulatedProvider) -> None:
    payload = {"model": "m", "max_tokens": 5, "messages": HELLO}
    with httpx2.Client() as client:
        responses = [client.post(provider.url + "/v1/messages?beta=true", json=payload) for _ in range(3)]
    for response in responses:
        assert response.status_code == 200 and response.http_version == "HTTP/1.1"
        assert int(response.headers["content-length"]) == len(response.content)
        assert response.headers.get("connection", "").lower() != "close"
        assert response.json()["content"][0]["text"] == HELLO_ANSWER
    assert provider.call_count == 3 and provider.calls[0].query == "beta=true"


def test_request_headers_and_body_are_recorded(
    provider: SimulatedProvider, claude: anthropic.Anthropic, gpt: openai.OpenAI
) -> None:
    ask_claude(claude, extra_headers={"X-Metrion-Cache": "bypass", "Cache-Control": "no-store"})
    ask_gpt(gpt)
    a_call, o_call = provider.calls
    assert isinstance(a_call, ReceivedCall) and a_call.method == "POST" and a_call.path == "/v1/messages"
    assert a_call.headers["x-metrion-cache"] == "bypass" and a_call.headers["cache-control"] == "no-store"
    assert a_call.headers.get("x-api-key") == "test" or a_call.headers.get("authorization") == "Bearer test"
    assert o_call.headers["authorization"] == "Bearer test"
    assert all(name == name.lower() for name in a_call.headers)
    assert json.loads(a_call.body) == a_call.json and a_call.json["messages"] == HELLO
    with pytest.raises(dataclasses.FrozenInstanceError):
        a_call.path = "/elsewhere"  # type: ignore[misc]
    provider.reset()
    assert provider.calls == [] and provider.call_count == 0


def test_concurrent_calls_are_all_recorded(provider: SimulatedProvider, gpt: openai.OpenAI) -> None:
    threads = [threading.Thread(target=ask_gpt, args=(gpt, f"question {i}")) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert provider.call_count == 16
    questions = sorted(c.json["messages"][0]["content"] for c in provider.calls)
    assert questions == sorted(f"question {i}" for i in range(16))


def test_stop_closes_keep_alive_connections() -> None:
    provider = SimulatedProvider().start()
    assert provider.url == f"http://127.0.0.1:{provider.port}" and provider.port > 0
    client = httpx.Client()
    assert client.post(provider.url + "/v1/chat/completions", json={"messages": []}).status_code == 200
    provider.stop()
    with pytest.raises(httpx.TransportError):
        client.post(provider.url + "/v1/chat/completions", json={"messages": []})
    client.close()
    provider.stop()  # idempotent


async def test_async_sdk(provider: SimulatedProvider) -> None:
    async with anthropic.AsyncAnthropic(base_url=provider.url, api_key="test", max_retries=0) as client:
        delivery: Any = [{"role": "user", "content": "delivery?"}]
        message = await client.messages.create(model="m", max_tokens=5, messages=delivery)
        async with client.messages.stream(model="m", max_tokens=5, messages=HELLO) as stream:
            text = "".join([t async for t in stream.text_stream])
    assert message.content[0].text == DELIVERY_ANSWER and text == HELLO_ANSWER  # type: ignore[union-attr]
    assert provider.call_count == 2
