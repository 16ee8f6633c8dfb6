"""Anthropic Messages: ``POST .../v1/messages``."""

from __future__ import annotations

from typing import Any

from .base import Prompt, WireFormat, chat_prompt

_ERROR_TYPES = {400: "invalid_request_error", 504: "timeout_error"}


class AnthropicMessages(WireFormat):
    name = "anthropic_messages"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.rstrip("/").endswith("/messages")

    def prompt(self, path: str, body: Any) -> Prompt | None:
        # The system prompt lives outside the messages here; it must still change the key.
        found = chat_prompt(body, body.get("system") if isinstance(body, dict) else None)
        if found is None:
            return None
        return Prompt(found[0], found[1], body.get("stream") is True)

    def stream_event(self, event: str | None, data: str) -> str | None:
        if event == "message_stop":
            return "end"
        if event == "error":
            return "error"
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


WIRE_FORMAT = AnthropicMessages()
