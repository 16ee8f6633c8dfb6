"""One key, two shapes, checked on generated answers: stream -> response -> stream keeps the content, per format."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrion_fixture.formats import FORMATS_BY_NAME
from metrion_fixture.formats.base import sse

CONVERTIBLE = ("anthropic_messages", "openai_chat", "openai_responses", "gemini")

texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
names = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)
arguments = st.dictionaries(names, st.one_of(st.integers(-5, 5), texts, st.booleans()), max_size=3)
answers = st.fixed_dictionaries(
    {
        "pieces": st.lists(texts, max_size=6),
        "tools": st.lists(st.tuples(names, arguments), max_size=2),
        "usage": st.tuples(st.integers(1, 10_000), st.integers(1, 10_000)),
    }
).filter(lambda answer: answer["pieces"] or answer["tools"])


def halves(text: str) -> list[str]:
    middle = len(text) // 2
    return [text[:middle], text[middle:]]


# -- a provider-like stream per format, from the generated content ----------------------------------------


def anthropic_stream(pieces, tools, usage) -> list[bytes]:
    def event(name: str, **data: Any) -> bytes:
        return sse(name, {"type": name, **data})

    start = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": 1},
    }
    events = [event("message_start", message=start), event("ping")]
    blocks: list[tuple[dict, list[dict]]] = []
    if pieces:
        blocks.append(({"type": "text", "text": ""}, [{"type": "text_delta", "text": p} for p in pieces]))
    for number, (name, args) in enumerate(tools):
        first = {"type": "tool_use", "id": f"toolu_{number}", "name": name, "input": {}}
        blocks.append((first, [{"type": "input_json_delta", "partial_json": p} for p in halves(json.dumps(args))]))
    for index, (first, deltas) in enumerate(blocks):
        events.append(event("content_block_start", index=index, content_block=first))
        events += [event("content_block_delta", index=index, delta=delta) for delta in deltas]
        events.append(event("content_block_stop", index=index))
    stop = {"stop_reason": "tool_use" if tools else "end_turn", "stop_sequence": None}
    events.append(event("message_delta", delta=stop, usage={"output_tokens": usage[1]}))
    return events + [event("message_stop")]


def openai_chat_stream(pieces, tools, usage) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x", "usage": None}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse(None, {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": p}) for p in pieces]
    for number, (name, args) in enumerate(tools):
        call = {
            "index": number,
            "id": f"call_{number}",
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        events.append(chunk({"tool_calls": [call]}))
        events += [
            chunk({"tool_calls": [{"index": number, "function": {"arguments": p}}]}) for p in halves(json.dumps(args))
        ]
    events.append(chunk({}, "tool_calls" if tools else "stop"))
    total = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return events + [sse(None, {**base, "choices": [], "usage": total}), sse(None, "[DONE]")]


def responses_stream(pieces, tools, usage) -> list[bytes]:
    sequence = iter(range(10_000))

    def event(name: str, **data: Any) -> bytes:
        return sse(name, {"type": name, "sequence_number": next(sequence), **data})

    text = "".join(pieces)
    output: list[dict] = []
    response = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "gpt-x",
        "status": "in_progress",
        "output": [],
        "usage": None,
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
    }
    events = [event("response.created", response=response), event("response.in_progress", response=response)]
    if pieces:
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
        at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
        events += [
            event("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []}),
            event("response.content_part.added", **at, part={**part, "text": ""}),
            *(event("response.output_text.delta", **at, delta=p) for p in pieces),
            event("response.output_text.done", **at, text=text),
            event("response.content_part.done", **at, part=part),
            event("response.output_item.done", output_index=0, item=item),
        ]
        output.append(item)
    for name, args in tools:
        index = len(output)
        item = {
            "id": f"fc_{index}",
            "type": "function_call",
            "status": "completed",
            "call_id": f"call_{index}",
            "name": name,
            "arguments": json.dumps(args),
        }
        at = {"item_id": item["id"], "output_index": index}
        events += [
            event("response.output_item.added", output_index=index, item={**item, "arguments": ""}),
            *(event("response.function_call_arguments.delta", **at, delta=p) for p in halves(item["arguments"])),
            event("response.function_call_arguments.done", **at, arguments=item["arguments"]),
            event("response.output_item.done", output_index=index, item=item),
        ]
        output.append(item)
    total = {"input_tokens": usage[0], "output_tokens": usage[1], "total_tokens": sum(usage)}
    done = {**response, "status": "completed", "output": output, "usage": total}
    return events + [event("response.completed", response=done)]


def gemini_stream(pieces, tools, usage) -> list[bytes]:
    def chunk(parts: list[dict], **extra: Any) -> bytes:
        candidate = {"content": {"parts": parts, "role": "model"}, "index": 0, **extra}
        return sse(
            None,
            {
                "candidates": [candidate],
                "modelVersion": "gemini-x",
                "responseId": "r1",
                "usageMetadata": {"promptTokenCount": usage[0], "totalTokenCount": usage[0]},
            },
            crlf=True,
        )

    events = [chunk([{"text": p}]) for p in pieces]
    calls = [{"functionCall": {"name": name, "args": args}} for name, args in tools]
    final = {"promptTokenCount": usage[0], "candidatesTokenCount": usage[1], "totalTokenCount": sum(usage)}
    last = {
        "candidates": [{"content": {"parts": calls, "role": "model"}, "index": 0, "finishReason": "STOP"}],
        "modelVersion": "gemini-x",
        "responseId": "r1",
        "usageMetadata": final,
    }
    return events + [sse(None, last, crlf=True)]


STREAMS = {
    "anthropic_messages": anthropic_stream,
    "openai_chat": openai_chat_stream,
    "openai_responses": responses_stream,
    "gemini": gemini_stream,
}


# -- the content an SDK user sees in a non-streamed answer --------------------------------------------------


def content(name: str, body: bytes) -> tuple[str, list[tuple[str, Any]]]:
    """The text and the tool calls (name, arguments) of a non-streamed answer."""
    answer = json.loads(body)
    if name == "anthropic_messages":
        blocks = answer["content"]
        text = "".join(b["text"] for b in blocks if b["type"] == "text")
        return text, [(b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"]
    if name == "openai_chat":
        message = answer["choices"][0]["message"]
        calls = [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []
        ]
        return message["content"] or "", calls
    if name == "openai_responses":
        items = answer["output"]
        text = "".join(p["text"] for i in items if i["type"] == "message" for p in i["content"])
        return text, [(i["name"], json.loads(i["arguments"])) for i in items if i["type"] == "function_call"]
    parts = answer["candidates"][0]["content"]["parts"]
    return "".join(p.get("text", "") for p in parts), [
        (p["functionCall"]["name"], p["functionCall"]["args"]) for p in parts if "functionCall" in p
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=answers, name=st.sampled_from(CONVERTIBLE))
def test_stream_to_response_to_stream_keeps_text_tool_calls_and_usage(answer, name):
    """A provider stream assembled into a response, then replayed as a stream, keeps every piece of content."""
    wire_format = FORMATS_BY_NAME[name]
    stream = STREAMS[name](answer["pieces"], answer["tools"], answer["usage"])
    body = wire_format.body_from_stream(stream)
    assert body is not None
    expected = ("".join(answer["pieces"]), [(tool, args) for tool, args in answer["tools"]])
    assert content(name, body) == expected
    assert wire_format.usage([body], stream=False) == wire_format.usage(stream, stream=True)
    usage = wire_format.usage([body], stream=False)
    assert (usage.input_tokens, usage.output_tokens) == answer["usage"]

    replayed = wire_format.stream_from_body(body, {"include_usage": True})
    assert replayed is not None
    assert wire_format.usage(replayed, stream=True) == usage
    again = wire_format.body_from_stream(replayed)
    assert json.loads(again) == json.loads(body), "response -> stream -> response is the identity"
