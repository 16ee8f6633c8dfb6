"""Conversions between a stored answer's two shapes carry every field the provider sent.

One test per field seen in real answers (shapes from the providers' API references and public
recordings; the payloads are written here). A JSON answer turned into a stream and back is the
same answer, field for field, and the stream carries the field where the provider's streams do;
a real stream assembled into JSON keeps what its chunks said. What cannot be produced (an OpenAI
stream recorded without its usage) is not converted: a miss, never an answer lacking a field the
real one always has.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from corekit import sse

from metrion_fixture.formats import FORMATS_BY_NAME
from metrion_fixture.formats.base import sse_events

CHAT = FORMATS_BY_NAME["openai_chat"]
ANTHROPIC = FORMATS_BY_NAME["anthropic_messages"]
GEMINI = FORMATS_BY_NAME["gemini"]
RESPONSES = FORMATS_BY_NAME["openai_responses"]

USAGE = {
    "prompt_tokens": 87,
    "completion_tokens": 24,
    "total_tokens": 111,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def completion(message: dict[str, Any], model: str = "gpt-4o-mini-2024-07-18", **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    choice.update(extra.pop("choice", {}))
    return {
        "id": "chatcmpl-CQ4vJ2cQ0Ae6nBHBr9jHq0nYvT8xk",
        "object": "chat.completion",
        "created": 1760000000,
        "model": model,
        "choices": [choice],
        "usage": USAGE,
        "service_tier": "default",
        "system_fingerprint": "fp_560af6e559",
        **extra,
    }


def round_trip(wire_format: Any, answer: dict[str, Any], shape: dict[str, Any] | None = None) -> tuple[Any, list]:
    """The answer as a stream, and that stream assembled back into JSON."""
    stream = wire_format.stream_from_body(json.dumps(answer).encode(), shape)
    assert stream is not None, "refused"
    watcher = wire_format.stream_watcher(shape)
    for chunk in stream:
        watcher.feed(chunk)
    watcher.close()
    assert watcher.ended and not watcher.failed  # a complete stream of the provider's
    body = wire_format.body_from_stream(stream)
    assert body is not None
    return json.loads(body), [json.loads(data) for _, data in sse_events(stream) if not data.startswith("[DONE]")]


def deltas(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [choice["delta"] for event in events for choice in event.get("choices") or []]


# -- OpenAI Chat Completions: JSON -> stream -> JSON ---------------------------------------------------------

CHAT_MESSAGES = {
    "annotations-empty": {"role": "assistant", "content": "Lisbon.", "refusal": None, "annotations": []},
    "annotations-url-citation": {
        "role": "assistant",
        "content": "Tram 28 first ran in 1914 (Wikipedia).",
        "refusal": None,
        "annotations": [
            {
                "type": "url_citation",
                "url_citation": {
                    "start_index": 26,
                    "end_index": 37,
                    "title": "Tram 28 (Lisbon)",
                    "url": "https://en.wikipedia.org/wiki/Lisbon_tramway_network",
                },
            }
        ],
    },
    "refusal": {
        "role": "assistant",
        "content": None,
        "refusal": "I'm sorry, I can't help with that.",
        "annotations": [],
    },
    "tool_calls": {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": [],
        "tool_calls": [
            {
                "id": "call_p1sVZ6hFO2QpRYk1rCxWnbdX",
                "type": "function",
                "function": {"name": "convert_currency", "arguments": '{"amount":25,"to":"USD"}'},
            },
            {
                "id": "call_Xq2mB8",
                "type": "function",
                "function": {"name": "get_rate", "arguments": '{"from":"EUR"}'},
            },
        ],
    },
    "function_call": {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": [],
        "function_call": {"name": "get_weather", "arguments": '{"city":"Porto"}'},
    },
    "audio": {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "annotations": [],
        "audio": {
            "id": "audio_68e1f0b2c4d88191a1",
            "data": "UklGRiQAAABXQVZFZm10IAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "expires_at": 1760003600,
            "transcript": "Boa noite!",
        },
    },
}


@pytest.mark.parametrize("field", sorted(CHAT_MESSAGES))
def test_an_openai_message_field_survives_json_to_stream_and_back(field):
    answer = completion(CHAT_MESSAGES[field])
    assembled, events = round_trip(CHAT, answer, {"include_usage": True})
    assert assembled == answer
    name = field.split("-")[0]
    assert any(name in delta for delta in deltas(events)), f"{name} is in no delta"


def test_openai_logprobs_survive_json_to_stream_and_back():
    logprobs = {
        "content": [
            {
                "token": "Yes",
                "logprob": -2.1e-06,
                "bytes": [89, 101, 115],
                "top_logprobs": [
                    {"token": "Yes", "logprob": -2.1e-06, "bytes": [89, 101, 115]},
                    {"token": "yes", "logprob": -13.25, "bytes": [121, 101, 115]},
                ],
            },
            {"token": ".", "logprob": -0.31, "bytes": [46], "top_logprobs": []},
        ],
        "refusal": None,
    }
    answer = completion(
        {"role": "assistant", "content": "Yes.", "refusal": None, "annotations": []}, choice={"logprobs": logprobs}
    )
    assembled, events = round_trip(CHAT, answer, {"include_usage": True})
    assert assembled == answer
    assert any(choice.get("logprobs") for event in events for choice in event.get("choices") or [])


@pytest.mark.parametrize(
    ("name", "message", "model", "extra"),
    [
        (
            "reasoning_content",  # DeepSeek
            {
                "role": "assistant",
                "content": "437",
                "reasoning_content": "19 * 23 = 19 * 20 + 19 * 3 = 380 + 57 = 437.",
            },
            "deepseek-reasoner",
            {},
        ),
        (
            "reasoning_details",  # OpenRouter, with the provider it routed to
            {
                "role": "assistant",
                "content": "No: 91 is 7 times 13.",
                "refusal": None,
                "reasoning": "91 = 7 * 13, so it is composite.",
                "reasoning_details": [
                    {
                        "type": "reasoning.text",
                        "text": "91 = 7 * 13, so it is composite.",
                        "signature": "c2ltdWxhdGVkIHNpZ25hdHVyZQ==",
                        "format": "anthropic-claude-v1",
                        "index": 0,
                    }
                ],
            },
            "anthropic/claude-sonnet-4.5",
            {"provider": "Anthropic", "choice": {"native_finish_reason": "end_turn"}},
        ),
        (
            "content_filter_results",  # Azure OpenAI
            {"role": "assistant", "content": "Lisbon.", "refusal": None, "annotations": []},
            "gpt-4o-2024-11-20",
            {
                "prompt_filter_results": [
                    {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}
                ],
                "choice": {"content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}},
            },
        ),
    ],
    ids=lambda value: value if isinstance(value, str) and "/" not in value and " " not in value else "",
)
def test_fields_of_openai_compatible_providers_survive_json_to_stream_and_back(name, message, model, extra):
    answer = completion(message, model, **copy.deepcopy(extra))
    assembled, _ = round_trip(CHAT, answer, {"include_usage": True})
    assert assembled == answer


# -- OpenAI Chat Completions: a real stream -> JSON ---------------------------------------------------------------

_CHUNK = {
    "id": "chatcmpl-CQ4wB5",
    "object": "chat.completion.chunk",
    "created": 1760000100,
    "model": "gpt-4o-audio-preview-2025-06-03",
    "service_tier": "default",
    "system_fingerprint": "fp_560af6e559",
}


def chat_stream(*parts: dict[str, Any], usage: bool = True, finish: str = "stop", **chunk: Any) -> list[bytes]:
    """A stream as OpenAI sends it: the role, the given deltas, the finish chunk, the usage chunk, [DONE]."""
    base = {**_CHUNK, **chunk}

    def event(delta: dict[str, Any], finish_reason: str | None = None, **choice: Any) -> bytes:
        return sse(None, {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, **choice}]})

    events = [event({"role": "assistant", "content": "", "refusal": None})]
    events += [event(part.pop("delta"), **part) if "delta" in part else event(part) for part in map(dict, parts)]
    events.append(event({}, finish))
    if usage:
        events.append(sse(None, {**base, "choices": [], "usage": USAGE}))
    return [*events, sse(None, "[DONE]")]


def assembled(stream: list[bytes]) -> dict[str, Any]:
    body = CHAT.body_from_stream(stream)
    assert body is not None
    return json.loads(body)


def test_a_streamed_audio_answer_is_assembled_from_its_pieces():
    stream = chat_stream(
        {"audio": {"id": "audio_68e1f0b2", "transcript": "Boa "}},
        {"audio": {"data": "UklGRiQAAABX", "transcript": "noite!"}},
        {"audio": {"data": "QVZFZm10IA=="}},
        {"audio": {"expires_at": 1760003600}},
    )
    message = assembled(stream)["choices"][0]["message"]
    assert message["audio"] == {
        "id": "audio_68e1f0b2",
        "transcript": "Boa noite!",
        "data": "UklGRiQAAABXQVZFZm10IA==",
        "expires_at": 1760003600,
    }
    assert message["content"] is None and message["annotations"] == []


def test_a_deepseek_reasoning_stream_keeps_its_reasoning_content():
    stream = chat_stream(
        {"reasoning_content": "19 * 23 = "},
        {"reasoning_content": "437."},
        {"content": "437"},
        model="deepseek-reasoner",
    )
    message = assembled(stream)["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("19 * 23 = 437.", "437")
    assert "annotations" not in message  # DeepSeek's answers have none: nothing is invented


def test_openrouter_reasoning_details_merge_by_index():
    piece = {"type": "reasoning.text", "format": "anthropic-claude-v1", "index": 0}
    stream = chat_stream(
        {"reasoning": "91 = 7 * 13, ", "reasoning_details": [{**piece, "text": "91 = 7 * 13, ", "signature": None}]},
        {"reasoning": "so composite.", "reasoning_details": [{**piece, "text": "so composite.", "signature": "c2ln"}]},
        {"content": "No: 91 is 7 times 13."},
        model="anthropic/claude-sonnet-4.5",
        provider="Anthropic",
    )
    answer = assembled(stream)
    message = answer["choices"][0]["message"]
    assert message["reasoning"] == "91 = 7 * 13, so composite."
    assert message["reasoning_details"] == [{**piece, "text": "91 = 7 * 13, so composite.", "signature": "c2ln"}]
    assert answer["provider"] == "Anthropic"


def test_streamed_tool_call_pieces_become_whole_calls_without_their_stream_index():
    stream = chat_stream(
        {"tool_calls": [{"index": 0, "id": "call_p1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"amount":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "25}"}}]},
        finish="tool_calls",
    )
    choice = assembled(stream)["choices"][0]
    assert choice["message"]["tool_calls"] == [
        {"id": "call_p1", "type": "function", "function": {"name": "f", "arguments": '{"amount":25}'}}
    ]
    assert (choice["message"]["content"], choice["finish_reason"]) == (None, "tool_calls")


def test_streamed_logprobs_are_gathered_in_order():
    token = {"bytes": [89], "top_logprobs": []}
    stream = chat_stream(
        {"delta": {"content": "Yes"}, "logprobs": {"content": [{**token, "token": "Yes", "logprob": -0.1}]}},
        {
            "delta": {"content": "."},
            "logprobs": {"content": [{**token, "token": ".", "logprob": -0.3}], "refusal": None},
        },
    )
    logprobs = assembled(stream)["choices"][0]["logprobs"]
    assert [entry["token"] for entry in logprobs["content"]] == ["Yes", "."]
    assert logprobs["refusal"] is None


def test_the_streams_obfuscation_padding_is_not_part_of_the_answer():
    stream = chat_stream({"content": "Lisbon."}, obfuscation="aGk")
    answer = assembled(stream)
    assert "obfuscation" not in answer and answer["choices"][0]["message"]["content"] == "Lisbon."


def test_an_openai_stream_recorded_without_usage_is_no_json_answer():
    # A real completion always reports usage (code reads completion.usage.total_tokens): a miss, not usage None.
    assert CHAT.body_from_stream(chat_stream({"content": "Lisbon."}, usage=False)) is None
    assert CHAT.body_from_stream(chat_stream({"content": "Lisbon."})) is not None


def test_a_stored_answer_without_usage_is_no_stream_for_a_request_that_asked_for_the_usage_chunk():
    answer = completion({"role": "assistant", "content": "Lisbon.", "refusal": None, "annotations": []})
    del answer["usage"]
    body = json.dumps(answer).encode()
    assert CHAT.stream_from_body(body, {"include_usage": True}) is None
    assert CHAT.stream_from_body(body, {"include_usage": False}) is not None


# -- Anthropic Messages ------------------------------------------------------------------------------------------


def message(*content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": "msg_01Ag3VoKLMzvsDzVH4TBHt9B",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-6",
        "content": list(content),
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 412,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2048,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 186,
            "service_tier": "standard",
        },
        **extra,
    }


ANTHROPIC_BLOCKS = {
    "thinking": [
        {"type": "thinking", "thinking": "sqrt(1019) is about 31.9; no prime divides it.", "signature": "c2ln"},
        {"type": "text", "text": "Yes, 1019 is prime."},
    ],
    "redacted_thinking": [
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"},
        {"type": "text", "text": "Yes."},
    ],
    "tool_use": [
        {"type": "text", "text": "Let me check the weather."},
        {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather", "input": {"city": "Faro"}},
    ],
    "web_search_citations": [
        {
            "type": "server_tool_use",
            "id": "srvtoolu_01WYG3ziw53XMcoyKL4XcZmE",
            "name": "web_search",
            "input": {"query": "Lisbon tram 28 opening year"},
        },
        {
            "type": "web_search_tool_result",
            "tool_use_id": "srvtoolu_01WYG3ziw53XMcoyKL4XcZmE",
            "content": [
                {
                    "type": "web_search_result",
                    "title": "Tram 28 (Lisbon)",
                    "url": "https://en.wikipedia.org/wiki/Lisbon_tramway_network",
                    "encrypted_content": "EqkCCioIBxgCIiQ0NGFl",
                    "page_age": "March 3, 2025",
                }
            ],
        },
        {
            "type": "text",
            "text": "The line dates from 1914, when the route was first electrified.",
            "citations": [
                {
                    "type": "web_search_result_location",
                    "cited_text": "The route was electrified in 1914 ...",
                    "url": "https://en.wikipedia.org/wiki/Lisbon_tramway_network",
                    "title": "Tram 28 (Lisbon)",
                    "encrypted_index": "Eo8BCioIBxgCIiQ0",
                }
            ],
        },
    ],
    "document_citations": [
        {
            "type": "text",
            "text": "The grass is green.",
            "citations": [
                {
                    "type": "char_location",
                    "cited_text": "The grass is green.",
                    "document_index": 0,
                    "document_title": "Example Document",
                    "start_char_index": 0,
                    "end_char_index": 20,
                }
            ],
        }
    ],
}


@pytest.mark.parametrize("blocks", sorted(ANTHROPIC_BLOCKS))
def test_anthropic_content_blocks_survive_json_to_stream_and_back(blocks):
    answer = message(*ANTHROPIC_BLOCKS[blocks])
    assembled_message, events = round_trip(ANTHROPIC, answer)
    assert assembled_message == answer
    started = [event["content_block"]["type"] for event in events if event["type"] == "content_block_start"]
    assert started == [block["type"] for block in ANTHROPIC_BLOCKS[blocks]]


def test_anthropic_citations_stream_as_citations_deltas():
    _, events = round_trip(ANTHROPIC, message(*ANTHROPIC_BLOCKS["document_citations"]))
    kinds = [event["delta"]["type"] for event in events if event["type"] == "content_block_delta"]
    assert kinds == ["citations_delta", "text_delta"]


def test_anthropic_message_fields_newer_than_the_module_survive():
    answer = message(
        {"type": "text", "text": "Done."},
        container={"id": "container_011CPR5CNjB747bTd36fQLFk", "expires_at": "2025-05-23T21:13:31Z"},
    )
    assembled_message, _ = round_trip(ANTHROPIC, answer)
    assert assembled_message == answer


# -- Gemini ------------------------------------------------------------------------------------------------------

SAFETY = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"},
]
GEMINI_USAGE = {
    "promptTokenCount": 21,
    "candidatesTokenCount": 22,
    "totalTokenCount": 98,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 21}],
    "thoughtsTokenCount": 55,
}


def gemini_answer(*parts: dict[str, Any], **candidate: Any) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"parts": list(parts), "role": "model"},
                "finishReason": "STOP",
                "safetyRatings": SAFETY,
                "index": 0,
                **candidate,
            }
        ],
        "usageMetadata": GEMINI_USAGE,
        "modelVersion": "gemini-2.5-flash",
        "responseId": "Hq3laI2cBrSxz7IPpd6YsQ4",
    }


@pytest.mark.parametrize(
    "answer",
    [
        gemini_answer(
            {"text": "Begun in 1501, the monastery is a Manueline masterpiece."},
            citationMetadata={
                "citationSources": [{"startIndex": 0, "endIndex": 55, "uri": "https://www.mosteirojeronimos.gov.pt/"}]
            },
            avgLogprobs=-0.2154,
        ),
        gemini_answer({"functionCall": {"name": "get_weather", "args": {"city": "Porto"}}, "thoughtSignature": "CiQB"}),
        gemini_answer(
            {"text": "Thinking about the tides.", "thought": True},
            {"text": "High tide is at 14:05."},
            groundingMetadata={"webSearchQueries": ["Cascais tide times"], "groundingChunks": []},
        ),
    ],
    ids=["citations-safety-usage", "function-call-signature", "thought-grounding"],
)
def test_gemini_answers_survive_json_to_stream_and_back(answer):
    assembled_answer, _ = round_trip(GEMINI, answer)
    assert assembled_answer == answer


def test_a_gemini_streams_citations_are_gathered_from_every_chunk():
    def chunk(text: str, source: dict[str, Any], **candidate: Any) -> bytes:
        return sse(
            None,
            {
                "candidates": [
                    {
                        "content": {"parts": [{"text": text}], "role": "model"},
                        "citationMetadata": {"citationSources": [source]},
                        "safetyRatings": SAFETY,
                        "index": 0,
                        **candidate,
                    }
                ],
                "usageMetadata": GEMINI_USAGE,
                "modelVersion": "gemini-2.5-flash",
            },
            crlf=True,
        )

    first, second = {"startIndex": 0, "endIndex": 9, "uri": "https://a.pt/"}, {"startIndex": 10, "endIndex": 20}
    body = GEMINI.body_from_stream([chunk("Begun in ", first), chunk("1501.", second, finishReason="STOP")])
    candidate = json.loads(body)["candidates"][0]
    assert candidate["citationMetadata"] == {"citationSources": [first, second]}
    assert candidate["content"]["parts"] == [{"text": "Begun in 1501."}]
    assert (candidate["finishReason"], candidate["safetyRatings"]) == ("STOP", SAFETY)


def test_a_gemini_stream_without_usage_metadata_is_no_json_answer():
    chunk = {"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}, "finishReason": "STOP"}]}
    assert GEMINI.body_from_stream([sse(None, chunk, crlf=True)]) is None


# -- OpenAI Responses ---------------------------------------------------------------------------------------------


def test_a_responses_answer_streams_its_annotations_logprobs_and_reasoning_and_comes_back_whole():
    answer = {
        "id": "resp_68e1f5a0b7c48190",
        "object": "response",
        "created_at": 1760000400,
        "status": "completed",
        "model": "gpt-5-mini-2025-08-07",
        "output": [
            {"id": "rs_68e1f5a1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "**Hours**"}]},
            {"id": "ws_68e1f5a2", "type": "web_search_call", "status": "completed"},
            {
                "id": "msg_68e1f5a3",
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {
                        "type": "output_text",
                        "text": "It opens at 10:00 on Sundays (gulbenkian.pt).",
                        "logprobs": [{"token": "It", "logprob": -0.01, "bytes": [73, 116], "top_logprobs": []}],
                        "annotations": [
                            {
                                "type": "url_citation",
                                "start_index": 32,
                                "end_index": 46,
                                "title": "Opening hours",
                                "url": "https://gulbenkian.pt/en/visit",
                            }
                        ],
                    }
                ],
            },
        ],
        "usage": {
            "input_tokens": 35,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 210,
            "output_tokens_details": {"reasoning_tokens": 128},
            "total_tokens": 245,
        },
    }
    assembled_answer, events = round_trip(RESPONSES, answer)
    assert assembled_answer == answer
    added = [event["annotation"] for event in events if event["type"] == "response.output_text.annotation.added"]
    assert added == answer["output"][2]["content"][0]["annotations"]
    delta = next(event for event in events if event["type"] == "response.output_text.delta")
    assert delta["logprobs"] == answer["output"][2]["content"][0]["logprobs"]
