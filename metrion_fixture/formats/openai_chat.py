"""OpenAI Chat Completions: ``POST .../chat/completions`` (also spoken by Mistral and xAI Grok)."""

from __future__ import annotations

import json
import re
from typing import Any

from .base import (
    ChunkWatcher,
    Prompt,
    StreamWatcher,
    Usage,
    WireFormat,
    chat_prompt,
    dump,
    json_error_field,
    json_object,
    json_payloads,
    number,
    sse,
    sse_events,
    tool_call_text,
)

_ERROR_TYPES = {400: "invalid_request_error", 504: "timeout"}


class OpenAIChat(WireFormat):
    name = "openai_chat"
    provider = "openai"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.rstrip("/").endswith("/chat/completions")

    def prompt(self, path: str, body: Any) -> Prompt | None:
        found = chat_prompt(body)
        if found is None:
            return None
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        choices = body.get("n")
        shape: dict[str, Any] = {"include_usage": include_usage}
        if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
            shape["choices"] = choices
        return Prompt(found[0], found[1], body.get("stream") is True, shape)

    # The stream is complete once every choice has its finish_reason and, when the request set
    # stream_options.include_usage, the usage chunk has arrived: see ChatStreamWatcher.
    stream_trailer = sse(None, "[DONE]")

    def stream_event(self, event: str | None, data: str) -> str | None:
        # Without the request's shape: a stream of one choice, no usage asked for.
        return ChatStreamWatcher(self).classify(event, data)

    def stream_watcher(self, shape: dict[str, Any] | None = None) -> ChunkWatcher:
        return ChatStreamWatcher(self, shape)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return openai_error_body(status, message)

    def usage(self, chunks: list[bytes], stream: bool) -> Usage | None:
        # Streams carry it in a final chunk (OpenAI with stream_options.include_usage; Mistral always).
        found = None
        for payload in json_payloads(chunks, stream):
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                found = payload["usage"]
        return chat_usage(found)

    def stream_from_body(self, body: bytes, shape: dict[str, Any] | None) -> list[bytes] | None:
        return _stream_from_completion(json_object(body), bool(shape and shape.get("include_usage")))

    def text_of(self, answer: dict[str, Any]) -> str | None:
        message = answer["choices"][0]["message"]
        parts = [message.get("content") or message.get("refusal") or ""]
        parts += [
            tool_call_text(call["function"]["name"], call["function"].get("arguments", ""))
            for call in message.get("tool_calls") or []
        ]
        return "\n".join(part for part in parts if part)

    def body_from_stream(self, chunks: list[bytes]) -> bytes | None:
        return _completion_from_stream(chunks)


# Fields every chunk repeats from the completion.
_CHUNK_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
# Message fields a stream can carry; anything else (audio, annotations) makes the answer not convertible.
_STREAMABLE = frozenset({"role", "content", "refusal", "tool_calls", "function_call"})


def _stream_from_completion(completion: dict[str, Any], include_usage: bool) -> list[bytes] | None:
    if completion.get("object") != "chat.completion" or not isinstance(completion.get("choices"), list):
        return None
    # Mistral speaks this format and always sends the usage, on the chunk that finishes the answer.
    mistral = str(completion.get("model", "")).startswith(("mistral", "ministral", "codestral", "magistral"))
    usage = completion.get("usage")
    base = {name: completion[name] for name in _CHUNK_FIELDS if name in completion}
    base["object"] = "chat.completion.chunk"
    if include_usage:
        base["usage"] = None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse(None, {**base, "choices": [choice], **extra})

    events = []
    for choice in completion["choices"]:
        message, index = choice.get("message") or {}, choice.get("index", 0)
        if choice.get("logprobs") or not set(message) <= _STREAMABLE:
            return None
        events.append(chunk(index, {"role": message.get("role", "assistant"), "content": "", "refusal": None}))
        if message.get("content"):
            events.append(chunk(index, {"content": message["content"]}))
        if message.get("refusal"):
            events.append(chunk(index, {"refusal": message["refusal"]}))
        for position, call in enumerate(message.get("tool_calls") or []):
            events.append(chunk(index, {"tool_calls": [{"index": position, **call}]}))
        if message.get("function_call"):
            events.append(chunk(index, {"function_call": message["function_call"]}))
        finish_usage = {"usage": usage} if mistral and usage and not include_usage else {}
        events.append(chunk(index, {}, choice.get("finish_reason"), **finish_usage))
    if include_usage and usage is not None:
        events.append(sse(None, {**base, "choices": [], "usage": usage}))
    events.append(sse(None, "[DONE]"))
    return events


def _completion_from_stream(chunks: list[bytes]) -> bytes | None:
    completion: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for _, data in sse_events(chunks):
        if data.startswith("[DONE]"):
            break
        payload = json_object(data)
        for name in _CHUNK_FIELDS:
            if payload.get(name) is not None:
                completion[name] = payload[name]
        if payload.get("usage"):
            completion["usage"] = payload["usage"]
        for part in payload.get("choices") or []:
            if part.get("logprobs"):
                return None
            choice = choices.setdefault(part.get("index", 0), {"message": {}, "finish_reason": None})
            message, delta = choice["message"], part.get("delta") or {}
            for name, value in delta.items():
                if name == "tool_calls":
                    calls = message.setdefault("tool_calls", [])
                    for call in value:
                        while len(calls) <= call["index"]:
                            calls.append({"function": {"name": "", "arguments": ""}})
                        target = calls[call["index"]]
                        for field in ("id", "type"):
                            if call.get(field):
                                target[field] = call[field]
                        function = call.get("function") or {}
                        target["function"]["name"] += function.get("name") or ""
                        target["function"]["arguments"] += function.get("arguments") or ""
                elif name == "function_call":
                    target = message.setdefault("function_call", {"name": "", "arguments": ""})
                    target["name"] += value.get("name") or ""
                    target["arguments"] += value.get("arguments") or ""
                elif name in ("content", "refusal"):
                    if value:  # the opening chunk's "" is no content: a tool-call answer keeps content null
                        message[name] = (message.get(name) or "") + value
                elif name == "role":
                    message["role"] = value
                elif value is not None:
                    return None  # a delta field this module does not know
            if part.get("finish_reason"):
                choice["finish_reason"] = part["finish_reason"]
    if not choices:
        return None
    completion["object"] = "chat.completion"
    completion["choices"] = []
    for index in sorted(choices):
        message = choices[index]["message"]
        message = {"role": message.pop("role", "assistant"), "content": None, "refusal": None, **message}
        finish = choices[index]["finish_reason"]
        completion["choices"].append({"index": index, "message": message, "finish_reason": finish, "logprobs": None})
    return dump(completion)


def chat_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details")
    output_details = usage.get("completion_tokens_details")
    return Usage(
        input_tokens=number(usage.get("prompt_tokens")),
        output_tokens=number(usage.get("completion_tokens")),
        cache_read_tokens=number(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        reasoning_tokens=number(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0,
    )


# Only the chunks that may finish a choice or carry the usage are parsed: the others say
# "finish_reason": null and no usage, and a stream has thousands of them.
_FINISHING = re.compile(r'"finish_reason"\s*:\s*"|"usage"\s*:\s*\{')


class ChatStreamWatcher(StreamWatcher):
    """A Chat Completions stream is complete when its final state has arrived, not at [DONE].

    The final state: a finish_reason for each choice asked for (``n``), and the usage chunk when
    ``stream_options.include_usage`` asked for it. [DONE] is only its trailer; content after the
    final state means the stream was misread.
    """

    __slots__ = ("_choices", "_include_usage", "_finished", "_usage")

    def __init__(self, wire_format: WireFormat, shape: dict[str, Any] | None = None) -> None:
        super().__init__(wire_format)
        shape = shape or {}
        self._choices = shape.get("choices", 1)
        self._include_usage = bool(shape.get("include_usage"))
        self._finished: set[Any] = set()
        self._usage = False

    def classify(self, event: str | None, data: str) -> str | None:
        if data.startswith("[DONE]"):
            return "trailer"
        if event == "error" or json_error_field(data):
            return "error"
        if not self.ended and _FINISHING.search(data) is None:
            return None
        try:
            payload = json.loads(data)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        content = False
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                self._finished.add(choice.get("index", 0))
            elif any(value for value in (choice.get("delta") or {}).values()):
                content = True
        if isinstance(payload.get("usage"), dict):
            self._usage = True
        if self.ended:
            return None if content else "ignore"  # only the usage may follow the final state
        if len(self._finished) >= self._choices and (self._usage or not self._include_usage):
            return "end"
        return None


WIRE_FORMAT = OpenAIChat()


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    """An error as every OpenAI API answers it (Chat Completions and Responses alike)."""
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": None,
            "code": "metrion_cache",
        }
    }
