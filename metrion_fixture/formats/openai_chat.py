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
# Completion fields that are not carried on each chunk: the rest (Azure's prompt_filter_results,
# Perplexity's citations, OpenRouter's provider...) ride on the first chunk.
_COMPLETION_OWN = frozenset({*_CHUNK_FIELDS, "object", "choices", "usage"})
# Chunk fields that only streams have: OpenAI pads each chunk with random "obfuscation" text.
_STREAM_ONLY = frozenset({"obfuscation"})
# Choice fields the conversion writes itself; others (native_finish_reason, content_filter_results,
# stop_reason...) are carried on the chunk that finishes the choice.
_CHOICE_OWN = frozenset({"index", "message", "delta", "finish_reason", "logprobs"})
# OpenAI's own models (not "openai/gpt-4o" through a gateway, which answers in its own way).
_OPENAI_MODEL = re.compile(r"(gpt-|o[1-9]|chatgpt-|codex-)[^/]*$")
# Members of a streamed object that name it rather than add to it: replaced, never concatenated.
_IDENTITY = frozenset({"id", "type", "index", "format", "expires_at", "signature", "status"})


def _stream_from_completion(completion: dict[str, Any], include_usage: bool) -> list[bytes] | None:
    """A completion as the chunks the provider would have streamed: every field of it carried through."""
    if completion.get("object") != "chat.completion" or not isinstance(completion.get("choices"), list):
        return None
    # Mistral speaks this format and always sends the usage, on the chunk that finishes the answer.
    mistral = str(completion.get("model", "")).startswith(("mistral", "ministral", "codestral", "magistral"))
    usage = completion.get("usage")
    if include_usage and not isinstance(usage, dict):
        return None  # the request asked for the usage chunk and there is no usage to put in it
    base = {name: completion[name] for name in _CHUNK_FIELDS if name in completion}
    base["object"] = "chat.completion.chunk"
    if include_usage:
        base["usage"] = None
    first_extra = {name: value for name, value in completion.items() if name not in _COMPLETION_OWN}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        choice.update(extra.pop("choice", {}))
        return sse(None, {**base, "choices": [choice], **extra})

    events: list[bytes] = []
    for choice in completion["choices"]:
        if not isinstance(choice, dict) or not isinstance(choice.get("message") or {}, dict):
            return None
        message, index = dict(choice.get("message") or {}), choice.get("index", 0)
        opening = {"role": message.pop("role", "assistant"), "content": ""}
        if "refusal" in message:
            opening["refusal"] = None  # as OpenAI's first chunk says it; the refusal itself follows
        events.append(chunk(index, opening, **(first_extra if not events else {})))
        logprobs = choice.get("logprobs")
        content = message.pop("content", None)
        if content or logprobs:
            # One chunk holds the whole text, so it holds every token's log probability too.
            events.append(chunk(index, {"content": content or ""}, choice={"logprobs": logprobs}))
        for position, call in enumerate(message.pop("tool_calls", None) or []):
            events.append(chunk(index, {"tool_calls": [{"index": position, **call}]}))
        refusal = message.pop("refusal", None)
        if refusal:
            events.append(chunk(index, {"refusal": refusal}))
        for name, value in message.items():
            # Everything else as it is (annotations, audio, reasoning_content, reasoning_details...):
            # assembling a stream sets it back unchanged.
            events.append(chunk(index, {name: value}))
        finish_usage = {"usage": usage} if mistral and usage and not include_usage else {}
        extra = {name: value for name, value in choice.items() if name not in _CHOICE_OWN}
        events.append(chunk(index, {}, choice.get("finish_reason"), choice=extra, **finish_usage))
    if include_usage and usage is not None:
        events.append(sse(None, {**base, "choices": [], "usage": usage}))
    events.append(sse(None, "[DONE]"))
    return events


def _merge(target: dict[str, Any], delta: dict[str, Any]) -> None:
    """Add one streamed piece of an object to what came before, as the SDKs' stream accumulators do.

    Text is appended (content, reasoning, a tool call's arguments, audio data and transcript),
    objects are merged member by member, list items that carry an ``index`` merge with the item
    of that index (tool calls, reasoning_details) and the others are appended (annotations);
    names of the object (id, type, index...) and other values replace what was there.
    """
    for name, value in delta.items():
        current = target.get(name)
        if name in _IDENTITY or value is None:
            if value is not None or name not in target:
                target[name] = value
        elif isinstance(value, str) and isinstance(current, str):
            target[name] = current + value
        elif isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value)
        elif isinstance(value, list) and isinstance(current, list):
            _merge_items(current, value)
        elif isinstance(value, list):
            target[name] = []
            _merge_items(target[name], value)
        elif isinstance(value, dict):
            target[name] = {}
            _merge(target[name], value)
        else:
            target[name] = value


def _merge_items(items: list[Any], more: list[Any]) -> None:
    for item in more:
        if isinstance(item, dict) and isinstance(item.get("index"), int):
            same = next((old for old in items if isinstance(old, dict) and old.get("index") == item["index"]), None)
            if same is not None:
                _merge(same, item)
                continue
        items.append(item)  # parsed from this event's data alone: nothing else holds it


def _completion_from_stream(chunks: list[bytes]) -> bytes | None:
    """A stream assembled into the completion the provider would have answered, every field carried through.

    None (not convertible) when the stream has no choice, or no usage: a real completion always
    reports it, and code reads ``completion.usage.total_tokens``.
    """
    completion: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for _, data in sse_events(chunks):
        if data.startswith("[DONE]"):
            break
        payload = json_object(data)
        for name, value in payload.items():
            if name in ("object", "choices") or name in _STREAM_ONLY:
                continue
            if value is not None or name not in completion:
                completion[name] = value
        for part in payload.get("choices") or []:
            choice = choices.setdefault(part.get("index", 0), {"message": {}, "finish_reason": None, "logprobs": None})
            delta = part.get("delta") or {}
            if delta.get("content") == "":
                delta = {name: value for name, value in delta.items() if name != "content"}
            _merge(choice["message"], delta)
            logprobs = part.get("logprobs")
            if isinstance(logprobs, dict):
                gathered = choice["logprobs"] if isinstance(choice["logprobs"], dict) else {}
                for name, tokens in logprobs.items():
                    if isinstance(tokens, list):
                        gathered[name] = (gathered.get(name) or []) + tokens
                    elif name not in gathered:
                        gathered[name] = tokens
                choice["logprobs"] = gathered
            for name, value in part.items():
                if name == "finish_reason":
                    if value:
                        choice["finish_reason"] = value
                elif name not in _CHOICE_OWN and (value is not None or name not in choice):
                    choice[name] = value
    if not choices or not isinstance(completion.get("usage"), dict):
        return None
    completion["object"] = "chat.completion"
    completion["choices"] = []
    for index in sorted(choices):
        choice = choices[index]
        message = choice.pop("message")
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict):
                call.pop("index", None)  # a position in the stream, not part of the call
        message = {"role": message.pop("role", "assistant"), "content": None, **message}
        if _OPENAI_MODEL.match(str(completion.get("model", ""))):
            # OpenAI's own messages always have these, even when its stream never said them.
            message.setdefault("refusal", None)
            message.setdefault("annotations", [])
        completion["choices"].append({"index": index, "message": message, **choice})
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
