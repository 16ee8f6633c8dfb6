"""Anthropic Messages: ``POST .../v1/messages``."""

from __future__ import annotations

import json
from typing import Any

from .base import (
    Prompt,
    Usage,
    WireFormat,
    chat_prompt,
    dump,
    json_object,
    json_payloads,
    number,
    sse,
    sse_events,
    tool_call_text,
)

_ERROR_TYPES = {400: "invalid_request_error", 504: "timeout_error"}


class AnthropicMessages(WireFormat):
    name = "anthropic_messages"
    provider = "anthropic"

    def matches(self, method: str, path: str) -> bool:
        # "/v1/messages" whatever prefix a gateway puts before it; not OpenAI's /v1/threads/{id}/messages.
        return method == "POST" and path.rstrip("/").endswith("/v1/messages")

    def prompt(self, path: str, body: Any) -> Prompt | None:
        # The system prompt lives outside the messages here; it must still change the key.
        found = chat_prompt(body, body.get("system") if isinstance(body, dict) else None)
        if found is None:
            return None
        messages = found[1]
        # A code-execution container kept on Anthropic's side (its files) changes the right answer.
        if body.get("container") is not None:
            messages = [{"role": "container", "content": body["container"]}, *messages]
        return Prompt(found[0], messages, body.get("stream") is True)

    # message_delta carries the stop reason and the final usage: the answer is complete there.
    # litellm closes the response after it and never reads message_stop.
    stream_trailer = sse("message_stop", {"type": "message_stop"})

    def stream_event(self, event: str | None, data: str) -> str | None:
        if event == "message_delta":
            return "end" if _stop_reason(data) else None
        if event == "message_stop":
            return "trailer"
        if event == "ping":
            return "ignore"
        if event == "error":
            return "error"
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}

    def usage(self, chunks: list[bytes], stream: bool) -> Usage | None:
        # A stream reports it in message_start, then the totals so far in each message_delta.
        found: dict[str, Any] = {}
        for payload in json_payloads(chunks, stream):
            if not isinstance(payload, dict):
                continue
            message = payload.get("message") if payload.get("type") == "message_start" else payload
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                found.update({name: value for name, value in usage.items() if value is not None})
        if not found:
            return None
        cache_write, cache_read = (
            number(found.get("cache_creation_input_tokens")),
            number(found.get("cache_read_input_tokens")),
        )
        return Usage(
            # Anthropic counts cached prompt tokens apart from input_tokens.
            input_tokens=number(found.get("input_tokens")) + cache_write + cache_read,
            output_tokens=number(found.get("output_tokens")),
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
        )

    def stream_from_body(self, body: bytes, shape: dict[str, Any] | None) -> list[bytes] | None:
        return _stream_from_message(json_object(body))

    def text_of(self, answer: dict[str, Any]) -> str | None:
        parts = []
        for block in answer["content"]:
            if block.get("type") == "text":
                parts.append(block["text"])
            elif block.get("type") in ("tool_use", "server_tool_use"):
                parts.append(tool_call_text(block["name"], block.get("input", {})))
        return "\n".join(parts)

    def body_from_stream(self, chunks: list[bytes]) -> bytes | None:
        return _message_from_stream(chunks)


def _opening(block: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A content block as it opens in a stream, and the deltas that fill it in, as the API streams them.

    Text and thinking arrive as text; a tool's input (tool_use, server_tool_use, mcp_tool_use...)
    as JSON text; a text block's citations one citations_delta each. Any other block (redacted
    thinking, tool results run by the server, blocks newer than this module) opens whole.
    """
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        citations = block.get("citations")
        if isinstance(citations, list) and citations:
            first = {name: value for name, value in block.items() if name != "citations"}
            deltas = [{"type": "citations_delta", "citation": citation} for citation in citations]
        else:
            first, deltas = dict(block), []
        first["text"] = ""
        return first, [*deltas, {"type": "text_delta", "text": block["text"]}]
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        deltas = [{"type": "thinking_delta", "thinking": block["thinking"]}]
        if block.get("signature"):
            deltas.append({"type": "signature_delta", "signature": block["signature"]})
        return {**block, "thinking": "", "signature": ""}, deltas
    if isinstance(block.get("input"), dict):
        partial = json.dumps(block["input"], ensure_ascii=False)
        return {**block, "input": {}}, [{"type": "input_json_delta", "partial_json": partial}]
    return block, []


def _stream_from_message(message: dict[str, Any]) -> list[bytes] | None:
    if message.get("type") != "message" or not isinstance(message.get("content"), list):
        return None
    usage = dict(message.get("usage") or {})
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    events = [sse("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return None  # not a content block: nothing a stream could carry
        first, deltas = _opening(block)
        events.append(
            sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": first})
        )
        for delta in deltas:
            events.append(sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    delta = {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")}
    events.append(sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
    events.append(sse("message_stop", {"type": "message_stop"}))
    return events


def _message_from_stream(chunks: list[bytes]) -> bytes | None:
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    partial_json: dict[int, str] = {}
    for event, data in sse_events(chunks):
        if event in ("ping", "content_block_stop", "message_stop"):
            continue
        payload = json_object(data)
        if event == "message_start":
            message = dict(payload["message"])
        elif event == "content_block_start":
            blocks[payload["index"]] = dict(payload["content_block"])
        elif event == "content_block_delta":
            index, delta = payload["index"], payload["delta"]
            block, kind = blocks[index], delta.get("type")
            if kind == "text_delta":
                block["text"] += delta["text"]
            elif kind == "input_json_delta":
                partial_json[index] = partial_json.get(index, "") + delta["partial_json"]
            elif kind == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif kind == "signature_delta":
                block["signature"] = delta["signature"]
            elif kind == "citations_delta":
                block["citations"] = [*(block.get("citations") or []), delta["citation"]]
            elif isinstance(kind, str) and kind.endswith("_delta"):
                # A delta newer than this module: its text is appended to the block's field of that name.
                for name, value in delta.items():
                    if name == "type":
                        continue
                    current = block.get(name)
                    block[name] = current + value if isinstance(current, str) and isinstance(value, str) else value
            else:
                return None
        elif event == "message_delta" and message is not None:
            message.update(payload.get("delta") or {})
            usage = {name: value for name, value in (payload.get("usage") or {}).items() if value is not None}
            message["usage"] = {**(message.get("usage") or {}), **usage}
        else:
            return None  # an event this module does not know: do not guess
    if message is None:
        return None
    for index, text in partial_json.items():
        blocks[index]["input"] = json.loads(text) if text else {}
    message["content"] = [blocks[index] for index in sorted(blocks)]
    return dump(message)


def _stop_reason(data: str) -> bool:
    """Whether a message_delta's data says why the message stopped."""
    if '"stop_reason"' not in data:
        return False
    try:
        delta = json.loads(data).get("delta")
    except (ValueError, AttributeError):
        return False
    return isinstance(delta, dict) and bool(delta.get("stop_reason"))


WIRE_FORMAT = AnthropicMessages()
