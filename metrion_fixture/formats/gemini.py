"""Google Gemini ``generateContent``: the Developer API and Vertex AI paths.

``POST .../models/{model}:generateContent`` answers with JSON,
``POST .../models/{model}:streamGenerateContent?alt=sse`` with server-sent events.
On Vertex the model sits under ``projects/{p}/locations/{l}/publishers/google/models/{m}``.
The model comes from the path (the body has none), the messages are ``contents``,
and ``systemInstruction`` counts as the first message. A Gemini stream has no end
event: it is complete once each candidate asked for has its ``finishReason`` (or the prompt
was blocked, ``promptFeedback.blockReason``), not merely when the body ends.
"""

from __future__ import annotations

import json
from typing import Any

from .base import (
    ChunkWatcher,
    Prompt,
    StreamWatcher,
    Usage,
    WireFormat,
    dump,
    json_error_field,
    json_object,
    json_payloads,
    last_user_text,
    number,
    sse,
    sse_events,
    tool_call_text,
)

_METHODS = {"generateContent": False, "streamGenerateContent": True}
_STATUSES = {400: "INVALID_ARGUMENT", 504: "DEADLINE_EXCEEDED"}


def _split(path: str) -> tuple[str, bool] | None:
    """Model and streaming of a Gemini path, or None when the path is not a generate call."""
    head, sep, method = path.rstrip("/").rpartition(":")
    if not sep or method not in _METHODS:
        return None
    prefix, slash, model = head.rpartition("/")
    if not slash or not model or not prefix.endswith("models"):
        return None
    return model, _METHODS[method]


class Gemini(WireFormat):
    name = "gemini"
    provider = "google"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and _split(path) is not None

    def prompt(self, path: str, body: Any) -> Prompt | None:
        found = _split(path)
        if found is None or not isinstance(body, dict):
            return None
        contents = body.get("contents")
        if not isinstance(contents, list):
            return None
        system = body.get("systemInstruction", body.get("system_instruction"))
        messages = contents if system is None else [{"role": "system", "content": system}, *contents]
        # A context cache on Google's side holds part of the prompt: which one changes the right answer.
        cached = body.get("cachedContent", body.get("cached_content"))
        if cached is not None:
            messages = [{"role": "cached_content", "name": cached}, *messages]
        config = body.get("generationConfig", body.get("generation_config"))
        count = config.get("candidateCount", config.get("candidate_count")) if isinstance(config, dict) else None
        shape = {"candidates": count} if isinstance(count, int) and not isinstance(count, bool) and count > 1 else None
        return Prompt(found[0], messages, found[1], shape)

    def preview(self, prompt: Prompt) -> str:
        return last_user_text(prompt.messages, ("user", None))  # a content without a role is the user's

    def unkeyable_reason(self, path: str, body: Any) -> str:
        if not isinstance(body, dict):
            return "its body is not a JSON object"
        if not isinstance(body.get("contents"), list):
            return "it has no list of contents"
        return ""

    def stream_event(self, event: str | None, data: str) -> str | None:
        return GeminiStreamWatcher(self).classify(event, data)

    def stream_watcher(self, shape: dict[str, Any] | None = None) -> ChunkWatcher:
        return GeminiStreamWatcher(self, shape)

    def usage(self, chunks: list[bytes], stream: bool) -> Usage | None:
        # Every stream chunk may carry usageMetadata, the running totals: the last one is the answer's.
        found = None
        for payload in json_payloads(chunks, stream):
            if isinstance(payload, dict) and isinstance(payload.get("usageMetadata"), dict):
                found = payload["usageMetadata"]
        if found is None:
            return None
        thoughts = number(found.get("thoughtsTokenCount"))
        return Usage(
            input_tokens=number(found.get("promptTokenCount")) + number(found.get("toolUsePromptTokenCount")),
            # Thoughts are billed as output but counted apart from the candidates.
            output_tokens=number(found.get("candidatesTokenCount")) + thoughts,
            cache_read_tokens=number(found.get("cachedContentTokenCount")),
            reasoning_tokens=thoughts,
        )

    def stream_from_body(self, body: bytes, shape: dict[str, Any] | None) -> list[bytes] | None:
        # A stream of one chunk holding the whole answer is a valid Gemini stream (short answers are one).
        response = json_object(body)
        if not isinstance(response.get("candidates"), list):
            return None
        return [sse(None, response, crlf=True)]

    def text_of(self, answer: dict[str, Any]) -> str | None:
        text, calls = "", []
        for part in answer["candidates"][0]["content"].get("parts") or []:
            if "text" in part and not part.get("thought"):  # thoughts are the model's, not the answer
                text += part["text"]
            elif "functionCall" in part:
                calls.append(tool_call_text(part["functionCall"]["name"], part["functionCall"].get("args", {})))
        return "\n".join(part for part in (text, *calls) if part)

    def body_from_stream(self, chunks: list[bytes]) -> bytes | None:
        merged: dict[str, Any] = {}
        candidates: dict[int, dict[str, Any]] = {}
        for _, data in sse_events(chunks):
            payload = json_object(data)
            for name, value in payload.items():
                if name != "candidates":
                    merged[name] = value  # usageMetadata, modelVersion, responseId...: the last is the whole
            for part in payload.get("candidates") or []:
                candidate = candidates.setdefault(part.get("index", 0), {"content": {"parts": [], "role": "model"}})
                for name, value in part.items():
                    if name == "content":
                        candidate["content"]["role"] = value.get("role", "model")
                        _merge_parts(candidate["content"]["parts"], value.get("parts") or [])
                    elif isinstance(value, dict) and isinstance(candidate.get(name), dict):
                        # Each chunk's citations and log probabilities are its own: gathered, not replaced.
                        for member, more in value.items():
                            held = candidate[name].get(member)
                            candidate[name][member] = (
                                held + more if isinstance(held, list) and isinstance(more, list) else more
                            )
                    else:
                        candidate[name] = value  # finishReason, safetyRatings, groundingMetadata: the last is the whole
        if not candidates or not isinstance(merged.get("usageMetadata"), dict):
            return None  # a real answer always reports its usage
        merged["candidates"] = [candidates[index] for index in sorted(candidates)]
        return dump({"candidates": merged.pop("candidates"), **merged})

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"error": {"code": status, "message": message, "status": _STATUSES.get(status, "INTERNAL")}}


def _merge_parts(parts: list[dict[str, Any]], more: list[dict[str, Any]]) -> None:
    """Append streamed parts; consecutive text of the same kind (answer or thought) joins into one part."""
    for part in more:
        last = parts[-1] if parts else None
        if (
            last is not None
            and set(part) <= {"text", "thought", "thoughtSignature"}
            and set(last) <= {"text", "thought", "thoughtSignature"}
            and "text" in part
            and "text" in last
            and last.get("thought") == part.get("thought")
            and "thoughtSignature" not in last
        ):
            last["text"] += part["text"]
            if "thoughtSignature" in part:
                last["thoughtSignature"] = part["thoughtSignature"]
        else:
            parts.append(dict(part))


class GeminiStreamWatcher(StreamWatcher):
    """Complete once every candidate asked for (``candidateCount``) has a ``finishReason``, or the prompt was blocked.

    Chunks after that (a last ``usageMetadata``) are allowed: only the final state is needed.
    """

    __slots__ = ("_candidates", "_finished")

    def __init__(self, wire_format: WireFormat, shape: dict[str, Any] | None = None) -> None:
        super().__init__(wire_format)
        self._candidates = (shape or {}).get("candidates", 1)
        self._finished: set[Any] = set()

    def classify(self, event: str | None, data: str) -> str | None:
        if event == "error" or json_error_field(data):
            return "error"
        if '"finishReason"' not in data and '"blockReason"' not in data:
            return "ignore" if self.ended else None
        try:
            payload = json.loads(data)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        for candidate in payload.get("candidates") or ():
            if isinstance(candidate, dict) and candidate.get("finishReason"):
                self._finished.add(candidate.get("index", 0))
        feedback = payload.get("promptFeedback")
        blocked = isinstance(feedback, dict) and bool(feedback.get("blockReason"))
        if blocked or len(self._finished) >= self._candidates or self.ended:
            return "end"
        return None


WIRE_FORMAT = Gemini()
