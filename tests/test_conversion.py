"""One key, two shapes, through the real SDKs: a stored answer serves the other mode with the same content."""

from __future__ import annotations

import json

import anthropic
import openai
import provider_sdk_calls
import pytest
import sdk_calls
from test_conversion_property import STREAMS

import metrion_fixture
from metrion_fixture.formats import FORMATS_BY_NAME
from metrion_fixture.integrations.cassettes import import_recorded

SDK_FORMATS = {
    "anthropic": "anthropic_messages",
    "openai": "openai_chat",
    "responses": "openai_responses",
    "gemini": "gemini",
}
QUESTION = sdk_calls.QUESTION[0]["content"]
assert QUESTION == provider_sdk_calls.QUESTION
SKIP_CACHE = {"x-metrion-cache": "false"}


def ask(sdk: str, url: str, *, stream: bool, use_async: bool = False, headers=None):
    if sdk in ("anthropic", "openai"):
        return sdk_calls.call(sdk, url, stream=stream, use_async=use_async, extra_headers=headers)
    return provider_sdk_calls.call(sdk, url, stream=stream, use_async=use_async, headers=headers)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("stored_stream", [False, True], ids=["json-answers-stream", "stream-answers-json"])
@pytest.mark.parametrize("sdk", list(SDK_FORMATS))
def test_a_stored_answer_serves_the_other_mode_as_the_provider_would(
    provider, memory_session, sdk, stored_stream, use_async
):
    """The converted hit gives the SDK the text and usage the provider itself gives in that mode."""
    direct = ask(sdk, provider.url, stream=not stored_stream, use_async=use_async, headers=SKIP_CACHE)
    ask(sdk, provider.url, stream=stored_stream, use_async=use_async)
    converted = ask(sdk, provider.url, stream=not stored_stream, use_async=use_async)
    assert [r.status for r in memory_session.calls] == ["BYPASS", "MISS", "HIT"]
    assert provider.call_count == 2
    assert converted.text == direct.text and "delivery" in converted.text
    assert converted.usage == direct.usage and converted.usage is not None
    hit = memory_session.calls[-1]
    assert hit.stream is (not stored_stream) and hit.saved_output_tokens > 0


def test_openai_usage_chunk_only_when_the_request_asks_for_it(provider, memory_session):
    """A stream made from a stored completion has the usage chunk only with stream_options.include_usage."""
    client = openai.OpenAI(base_url=provider.url + "/v1", api_key="sk-test", max_retries=0)
    stored = client.chat.completions.create(model="gpt-test", messages=sdk_calls.QUESTION)
    plain = list(client.chat.completions.create(model="gpt-test", messages=sdk_calls.QUESTION, stream=True))
    with_usage = list(
        client.chat.completions.create(
            model="gpt-test", messages=sdk_calls.QUESTION, stream=True, stream_options={"include_usage": True}
        )
    )
    assert [r.status for r in memory_session.calls] == ["MISS", "HIT", "HIT"]
    assert all(chunk.usage is None for chunk in plain)
    assert with_usage[-1].usage == stored.usage and with_usage[-1].choices == []
    assert "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == stored.choices[0].message.content


# -- tool calls ----------------------------------------------------------------------------------------------

TEXT = ["Let me check", " the weather."]
TOOLS = [("get_weather", {"city": "Paris", "unit": "celsius"})]
USAGE = (12, 34)
REQUESTS = {  # path and body of the request the SDK calls below make (same model and messages, same key)
    "anthropic": ("/v1/messages", {"model": "claude-test", "max_tokens": 100, "messages": sdk_calls.QUESTION}),
    "openai": ("/v1/chat/completions", {"model": "gpt-test", "messages": sdk_calls.QUESTION}),
    "responses": ("/v1/responses", {"model": "gpt-5-mini", "input": QUESTION}),
    "gemini": (
        "/v1beta/models/gemini-2.5-flash:generateContent",
        {"contents": [{"parts": [{"text": QUESTION}], "role": "user"}]},
    ),
}


def store_answer(session, sdk: str, *, stream: bool) -> None:
    """Store a text + tool-call answer for the default question, in one mode only."""
    wire_format = FORMATS_BY_NAME[SDK_FORMATS[sdk]]
    chunks = STREAMS[wire_format.name](TEXT, TOOLS, USAGE)
    path, body = REQUESTS[sdk]
    if stream:
        body = {**body, "stream": True}
        path = path.replace(":generateContent", ":streamGenerateContent")
        answer, content_type = b"".join(chunks), "text/event-stream"
    else:
        answer, content_type = wire_format.body_from_stream(chunks), "application/json"
    assert import_recorded(
        session, "POST", path, {}, json.dumps(body).encode(), 200, [("content-type", content_type)], answer
    )


def sdk_answer(sdk: str, url: str, *, stream: bool):
    """(text, [(tool name, arguments)], (input tokens, output tokens)) as the SDK's own helpers report them."""
    if sdk == "anthropic":
        client = anthropic.Anthropic(base_url=url, api_key="sk-ant-test", max_retries=0)
        args = {"model": "claude-test", "max_tokens": 100, "messages": sdk_calls.QUESTION}
        if stream:
            with client.messages.stream(**args) as events:
                text = "".join(events.text_stream)
                message = events.get_final_message()
            assert "".join(b.text for b in message.content if b.type == "text") == text
        else:
            message = client.messages.create(**args)
        blocks = message.content
        return (
            "".join(b.text for b in blocks if b.type == "text"),
            [(b.name, b.input) for b in blocks if b.type == "tool_use"],
            (message.usage.input_tokens, message.usage.output_tokens),
        )
    if sdk == "openai":
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        args = {"model": "gpt-test", "messages": sdk_calls.QUESTION}
        if stream:
            with client.chat.completions.stream(**args, stream_options={"include_usage": True}) as events:
                completion = events.get_final_completion()
        else:
            completion = client.chat.completions.create(**args)
        message = completion.choices[0].message
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
        usage = completion.usage
        return message.content or "", calls, (usage.prompt_tokens, usage.completion_tokens)
    if sdk == "responses":
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        args = {"model": "gpt-5-mini", "input": QUESTION}
        if stream:
            with client.responses.stream(**args) as events:
                deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
                response = events.get_final_response()
            assert deltas == response.output_text
        else:
            response = client.responses.create(**args)
        calls = [(i.name, json.loads(i.arguments)) for i in response.output if i.type == "function_call"]
        return response.output_text, calls, (response.usage.input_tokens, response.usage.output_tokens)
    client = provider_sdk_calls.gemini_client(url)
    args = {"model": "gemini-2.5-flash", "contents": QUESTION}
    chunks = list(client.models.generate_content_stream(**args)) if stream else [client.models.generate_content(**args)]
    text = "".join(part.text for c in chunks for part in c.candidates[0].content.parts if part.text)
    calls = [(call.name, call.args) for c in chunks for call in c.function_calls or []]
    usage = chunks[-1].usage_metadata
    return text, calls, (usage.prompt_token_count, usage.candidates_token_count)


@pytest.mark.parametrize("stored_stream", [False, True], ids=["json-answers-stream", "stream-answers-json"])
@pytest.mark.parametrize("sdk", list(SDK_FORMATS))
def test_tool_calls_survive_the_conversion(provider, memory_session, sdk, stored_stream):
    """Text, tool calls and final usage reach the SDK's helpers intact in the mode the answer was not stored in."""
    store_answer(memory_session, sdk, stream=stored_stream)
    text, calls, usage = sdk_answer(sdk, provider.url, stream=not stored_stream)
    assert memory_session.calls[-1].status == "HIT" and provider.call_count == 0
    assert (text, calls, usage) == ("".join(TEXT), [(name, args) for name, args in TOOLS], USAGE)


# -- when conversion is not possible -----------------------------------------------------------------------


def test_an_answer_that_cannot_be_converted_is_a_miss_and_the_second_shape_is_stored(provider, memory_session):
    """Content that is not a block cannot be streamed faithfully: the provider answers, and that stream is stored."""
    path, body = REQUESTS["anthropic"]
    odd = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "Delivery"}, "takes two days"],
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    headers = [("content-type", "application/json")]
    import_recorded(memory_session, "POST", path, {}, json.dumps(body).encode(), 200, headers, json.dumps(odd).encode())
    first = sdk_calls.call("anthropic", provider.url, stream=True)
    second = sdk_calls.call("anthropic", provider.url, stream=True)
    assert [r.status for r in memory_session.calls[-2:]] == ["MISS", "HIT"] and provider.call_count == 1
    assert first.text == second.text and "delivery" in first.text
    namespace, key = memory_session.settings.namespace, memory_session.calls[-1].key
    assert sorted(memory_session.store.keys(f"{namespace}:")) == [
        f"{namespace}:anthropic_messages:json:{key}",
        f"{namespace}:anthropic_messages:stream:{key}",
    ]


def test_replay_mode_serves_the_other_mode_from_the_stored_answer(provider, memory_session):
    """In replay mode a stored JSON answer answers a streamed request instead of the replay miss."""
    sdk_calls.call("openai", provider.url)
    with metrion_fixture.cache(
        memory_session.url, namespace=memory_session.settings.namespace, mode="replay"
    ) as replay:
        streamed = sdk_calls.call("openai", provider.url, stream=True)
    assert replay.calls[-1].status == "HIT" and provider.call_count == 1 and "delivery" in streamed.text


def test_the_requested_mode_is_preferred_when_both_are_stored(provider, memory_session):
    """With both shapes stored, each request gets its own stored answer, not a conversion."""
    json_answer = sdk_calls.call("anthropic", provider.url)
    stream_answer = sdk_calls.call("anthropic", provider.url, stream=True, extra_headers={"x-metrion-cache": "refresh"})
    json_hit = sdk_calls.call("anthropic", provider.url)
    stream_hit = sdk_calls.call("anthropic", provider.url, stream=True)
    assert json_hit.headers["request-id"] == json_answer.headers["request-id"]
    assert stream_hit.headers["request-id"] == stream_answer.headers["request-id"] != json_answer.headers["request-id"]


# -- every field of a real answer survives, through the real SDKs -----------------------------------------------


def test_a_real_openai_answer_with_annotations_audio_and_logprobs_is_replayed_as_a_stream(provider, memory_session):
    """The fields real answers carry (annotations: [], audio, logprobs) no longer make the stored answer unusable."""
    path, body = REQUESTS["openai"]
    answer = {
        "id": "chatcmpl-CQ4vJ2cQ0Ae6nBHBr9jHq0nYvT8xk",
        "object": "chat.completion",
        "created": 1760000000,
        "model": "gpt-4o-audio-preview-2025-06-03",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Delivery takes two days.",
                    "refusal": None,
                    "annotations": [],
                    "audio": {"id": "audio_68e1f0b2", "data": "UklGRiQA", "expires_at": 1760003600, "transcript": "Hi"},
                },
                "logprobs": {"content": [{"token": "Delivery", "logprob": -0.01, "bytes": [68], "top_logprobs": []}]},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 87, "completion_tokens": 24, "total_tokens": 111},
        "service_tier": "default",
        "system_fingerprint": "fp_560af6e559",
    }
    headers = [("content-type", "application/json")]
    import_recorded(
        memory_session, "POST", path, {}, json.dumps(body).encode(), 200, headers, json.dumps(answer).encode()
    )
    client = openai.OpenAI(base_url=provider.url + "/v1", api_key="k", max_retries=0)
    with client.chat.completions.stream(model=body["model"], messages=body["messages"]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert memory_session.calls[-1].status == "HIT" and provider.call_count == 0
    message = final.choices[0].message
    assert message.content == "Delivery takes two days." and message.audio.transcript == "Hi"
    assert final.choices[0].logprobs.content[0].token == "Delivery"


def test_a_real_anthropic_answer_with_thinking_and_citations_is_replayed_as_a_stream(provider, memory_session):
    path, body = REQUESTS["anthropic"]
    citation = {
        "type": "char_location",
        "cited_text": "Delivery takes two days.",
        "document_index": 0,
        "document_title": "Shipping policy",
        "start_char_index": 0,
        "end_char_index": 24,
    }
    answer = {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-6",
        "content": [
            {"type": "thinking", "thinking": "The policy says two days.", "signature": "c2ln"},
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
            {"type": "text", "text": "Delivery takes two days.", "citations": [citation]},
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 412, "cache_read_input_tokens": 2048, "output_tokens": 186},
    }
    headers = [("content-type", "application/json")]
    import_recorded(
        memory_session, "POST", path, {}, json.dumps(body).encode(), 200, headers, json.dumps(answer).encode()
    )
    client = anthropic.Anthropic(base_url=provider.url, api_key="k", max_retries=0)
    with client.messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert memory_session.calls[-1].status == "HIT" and provider.call_count == 0
    assert [block.type for block in final.content] == ["thinking", "redacted_thinking", "text"]
    assert final.content[0].signature == "c2ln" and final.content[2].text == "Delivery takes two days."
    assert final.content[2].citations[0].cited_text == "Delivery takes two days."
