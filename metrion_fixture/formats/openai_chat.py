"""OpenAI Chat Completions: ``POST .../chat/completions`` (also spoken by Mistral and xAI Grok)."""

from __future__ import annotations

from typing import Any

from .base import Prompt, WireFormat, chat_prompt, json_error_field

_ERROR_TYPES = {400: "invalid_request_error", 504: "timeout"}


class OpenAIChat(WireFormat):
    name = "openai_chat"

    def matches(self, method: str, path: str) -> bool:
        return method == "POST" and path.rstrip("/").endswith("/chat/completions")

    def prompt(self, path: str, body: Any) -> Prompt | None:
        found = chat_prompt(body)
        if found is None:
            return None
        return Prompt(found[0], found[1], body.get("stream") is True)

    def stream_event(self, event: str | None, data: str) -> str | None:
        # The OpenAI SDK closes the response as soon as it reads [DONE], before the
        # body is over, so [DONE] itself is the proof of a complete stream.
        if data.startswith("[DONE]"):
            return "end"
        if event == "error" or json_error_field(data):
            return "error"
        return None

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {
            "error": {
                "message": message,
                "type": _ERROR_TYPES.get(status, "server_error"),
                "param": None,
                "code": "metrion_cache",
            }
        }


WIRE_FORMAT = OpenAIChat()
