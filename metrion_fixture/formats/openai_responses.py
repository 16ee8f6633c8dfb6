"""OpenAI Responses: ``POST .../responses``.

The messages are ``input`` (a plain string is the user's one message) with
``instructions`` first. Requests that depend on server-side state
(``previous_response_id``, ``conversation``, a stored ``prompt`` template with its
version and variables) carry that state into the key as a first message, so such a
request is only ever answered from an entry of the same state; ``background`` requests
(answered later, by polling) are never cached.
"""

from __future__ import annotations

import json
from typing import Any

from .base import (
    Prompt,
    Usage,
    WireFormat,
    dump,
    json_object,
    json_payloads,
    number,
    sse,
    sse_events,
    tool_call_text,
)
from .openai_chat import openai_error_body

_ENDS = frozenset({"response.completed", "response.incomplete"})
_SERVER_STATE = ("previous_response_id", "conversation", "prompt")
_ERRORS = frozenset({"error", "response.failed"})


class OpenAIResponses(WireFormat):
    name = "openai_responses"
    provider = "openai"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.rstrip("/").endswith("/responses")

    def prompt(self, path: str, body: Any) -> Prompt | None:
        if self.unkeyable_reason(path, body):
            return None
        given = body.get("input")
        if isinstance(given, str):
            messages: list[Any] = [{"role": "user", "content": given}]
        else:
            messages = list(given or [])  # a stored prompt template may be the whole input
        instructions = body.get("instructions")
        if instructions is not None:
            messages.insert(0, {"role": "system", "content": instructions})
        # Everything on the server that changes which answer is right: the conversation so far,
        # the stored prompt template (id, version, variables).
        state = {name: body[name] for name in _SERVER_STATE if body.get(name) is not None}
        if state:
            messages.insert(0, {"role": "conversation_state", **state})
        model = body.get("model")
        model = model if isinstance(model, str) else ""  # a stored prompt template may name it instead
        return Prompt(model, messages, body.get("stream") is True)

    def unkeyable_reason(self, path: str, body: Any) -> str:
        if not isinstance(body, dict):
            return "its body is not a JSON object"
        if body.get("background"):
            return "a background response is answered later, by polling, never in this request's answer"
        model, given, template = body.get("model"), body.get("input"), body.get("prompt")
        if not isinstance(template, dict) and (not isinstance(model, str) or not model):
            return "it names no model"
        if given is None and not isinstance(template, dict):
            return "it has no input and no stored prompt template"
        if given is not None and not isinstance(given, (str, list)):
            return "its input is neither text nor a list of items"
        return ""

    def stream_event(self, event: str | None, data: str) -> str | None:
        if event is None:  # the event name is optional in SSE; the payload repeats it as "type"
            event = _payload_type(data)
        if event in _ENDS:
            return "end"
        if event in _ERRORS:
            return "error"
        return None

    def usage(self, chunks: list[bytes], stream: bool) -> Usage | None:
        # A stream's final response.completed event carries the whole response, usage included.
        found = None
        for payload in json_payloads(chunks, stream):
            response = payload.get("response", payload) if isinstance(payload, dict) and stream else payload
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                found = response["usage"]
        return response_usage(found)

    def stream_from_body(self, body: bytes, shape: dict[str, Any] | None) -> list[bytes] | None:
        return _stream_from_response(json_object(body))

    def text_of(self, answer: dict[str, Any]) -> str | None:
        parts = []
        for item in answer["output"]:
            if item.get("type") == "message":
                parts += [part.get("text") or part.get("refusal") or "" for part in item.get("content") or []]
            elif item.get("type") == "function_call":
                parts.append(tool_call_text(item["name"], item.get("arguments", "")))
        return "\n".join(part for part in parts if part)

    def body_from_stream(self, chunks: list[bytes]) -> bytes | None:
        # The final event carries the whole response: that is the non-streamed answer.
        for event, data in reversed(sse_events(chunks)):
            payload = json_object(data)
            if (event or payload.get("type")) in _ENDS and isinstance(payload.get("response"), dict):
                return dump(payload["response"])
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return openai_error_body(status, message)


def _stream_from_response(response: dict[str, Any]) -> list[bytes] | None:
    status, output = response.get("status"), response.get("output")
    if (
        response.get("object") != "response"
        or status not in ("completed", "incomplete")
        or not isinstance(output, list)
    ):
        return None
    sequence = iter(range(1_000_000))

    def event(name: str, **data: Any) -> bytes:
        return sse(name, {"type": name, "sequence_number": next(sequence), **data})

    opened = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    events = [event("response.created", response=opened), event("response.in_progress", response=opened)]
    for output_index, item in enumerate(output):
        if not isinstance(item, dict):
            return None
        kind = item.get("type")
        if kind == "message":
            events.append(event("response.output_item.added", output_index=output_index, item={**item, "content": []}))
            for content_index, part in enumerate(item.get("content") or []):
                at = {"item_id": item.get("id"), "output_index": output_index, "content_index": content_index}
                if not isinstance(part, dict):
                    return None
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    empty = {**part, "text": "", "annotations": []}
                    logprobs = part.get("logprobs") or []
                    text_events = [
                        event("response.output_text.delta", **at, delta=part["text"], logprobs=logprobs),
                        *(
                            event(
                                "response.output_text.annotation.added",
                                **at,
                                annotation_index=annotation_index,
                                annotation=annotation,
                            )
                            for annotation_index, annotation in enumerate(part.get("annotations") or [])
                        ),
                        event("response.output_text.done", **at, text=part["text"], logprobs=logprobs),
                    ]
                elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                    empty = {**part, "refusal": ""}
                    text_events = [
                        event("response.refusal.delta", **at, delta=part["refusal"]),
                        event("response.refusal.done", **at, refusal=part["refusal"]),
                    ]
                else:
                    empty, text_events = part, []  # a part newer than this module: given whole
                events.append(event("response.content_part.added", **at, part=empty))
                events.extend(text_events)
                events.append(event("response.content_part.done", **at, part=part))
        elif kind == "function_call":
            events.append(
                event("response.output_item.added", output_index=output_index, item={**item, "arguments": ""})
            )
            at = {"item_id": item.get("id"), "output_index": output_index}
            events.append(event("response.function_call_arguments.delta", **at, delta=item.get("arguments", "")))
            events.append(event("response.function_call_arguments.done", **at, arguments=item.get("arguments", "")))
        else:
            # Reasoning, tool calls run by the server...: announced, then given whole, as the API may do.
            events.append(event("response.output_item.added", output_index=output_index, item=item))
        events.append(event("response.output_item.done", output_index=output_index, item=item))
    final = "response.completed" if status == "completed" else "response.incomplete"
    events.append(event(final, response=response))
    return events


def response_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    input_details, output_details = usage.get("input_tokens_details"), usage.get("output_tokens_details")
    return Usage(
        input_tokens=number(usage.get("input_tokens")),
        output_tokens=number(usage.get("output_tokens")),
        cache_read_tokens=number(input_details.get("cached_tokens")) if isinstance(input_details, dict) else 0,
        reasoning_tokens=number(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0,
    )


def _payload_type(data: str) -> str | None:
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    return parsed.get("type") if isinstance(parsed, dict) else None


WIRE_FORMAT = OpenAIResponses()
