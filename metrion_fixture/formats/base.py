"""What every wire format tells the engine, and the SSE scanning they share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prompt:
    """The part of a request that enters the cache key."""

    model: str
    messages: list[Any]
    stream: bool


class WireFormat:
    """One provider API shape. Subclasses are small: matching, extraction, stream ends, errors.

    ``name`` separates entries in the store, so an answer in one format never
    answers a request in another.
    """

    name: str = ""
    # Whether streams of this format end with an explicit event. Formats without
    # one are complete when the body ends cleanly.
    has_stream_terminator: bool = True

    def matches(self, method: str, path: str) -> bool:
        raise NotImplementedError

    def prompt(self, path: str, body: Any) -> Prompt | None:
        """Model, messages and streaming of a parsed JSON body, or None if not cacheable."""
        raise NotImplementedError

    def stream_event(self, event: str | None, data: str) -> str | None:
        """Classify one server-sent event: "end" (the terminator), "error", or None."""
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        raise NotImplementedError


def chat_prompt(body: Any, system: Any = None) -> tuple[str, list[Any]] | None:
    """Model and messages of a chat-shaped body, with an out-of-band system prompt first."""
    if not isinstance(body, dict):
        return None
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model or not isinstance(messages, list):
        return None
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return model, messages


class StreamWatcher:
    """Follows a server-sent event stream chunk by chunk to see whether it ended cleanly.

    Only the event framing is parsed (lines, ``event:`` and ``data:`` fields); the
    wire format decides which event ends the stream and which one is an error.
    """

    __slots__ = ("_format", "_partial", "_event", "_data", "ended", "failed")

    def __init__(self, wire_format: WireFormat) -> None:
        self._format = wire_format
        self._partial = b""
        self._event: str | None = None
        self._data: list[str] = []
        self.ended = False
        self.failed = False

    def feed(self, chunk: bytes) -> None:
        if self.failed:
            return
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            if self.failed:  # an error is final, however the bytes were split
                return
            self._line(raw.rstrip(b"\r").decode("utf-8", "replace"))

    def _line(self, line: str) -> None:
        if not line:
            if self._event is not None or self._data:
                self._dispatch()
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)

    def _dispatch(self) -> None:
        verdict = self._format.stream_event(self._event, "\n".join(self._data))
        self._event, self._data = None, []
        if verdict == "error":
            self.failed = True
        elif verdict == "end":
            self.ended = True
        elif self.ended:
            # Anything meaningful after the terminator means we misread the stream.
            self.failed = True


def json_error_field(data: str) -> bool:
    """Whether an SSE data payload is a JSON object carrying an ``error`` member."""
    if '"error"' not in data:
        return False
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and bool(parsed.get("error"))
