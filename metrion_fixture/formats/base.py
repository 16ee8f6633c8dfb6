"""What every wire format tells the engine, and the SSE scanning they share."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Tokens one answer used, the same way for every provider.

    ``input_tokens`` counts every prompt token, cached or not; ``cache_read_tokens`` and
    ``cache_write_tokens`` are the parts of it read from / written to the provider's
    prompt cache. ``output_tokens`` counts every generated token, reasoning included;
    ``reasoning_tokens`` is that part (Gemini thoughts, OpenAI reasoning).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: value for name, value in self.__dict__.items() if value}

    @classmethod
    def from_dict(cls, data: Any) -> Usage | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{name: int(data.get(name) or 0) for name in cls.__dataclass_fields__})
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Prompt:
    """The part of a request that enters the cache key."""

    model: str
    messages: list[Any]
    stream: bool
    # Request options that shape the answer but not which answer it is (OpenAI's
    # stream_options.include_usage): needed to turn a stored answer into the other mode.
    shape: dict[str, Any] | None = None


class WireFormat:
    """One provider API shape. Subclasses are small: matching, extraction, stream ends, errors.

    ``name`` separates entries in the store, so an answer in one format never
    answers a request in another.
    """

    name: str = ""
    # Who is billed for answers in this format, unless the model's price entry says otherwise.
    provider: str = ""
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

    # One key, two shapes. A stored answer of the other mode is converted on a hit;
    # None (or an exception) means "not convertible": a miss, never a broken answer.
    def stream_from_body(self, body: bytes, shape: dict[str, Any] | None) -> list[bytes] | None:
        """A stored non-streamed answer as this provider's stream of events."""
        return None

    def body_from_stream(self, chunks: list[bytes]) -> bytes | None:
        """A stored stream assembled into this provider's non-streamed answer."""
        return None

    def usage(self, chunks: list[bytes], stream: bool) -> Usage | None:
        """The tokens a complete answer (its body, or its stream's chunks) reports, or None if it says nothing."""
        return None

    def readable(self, chunks: Sequence[bytes], stream: bool) -> str | None:
        """A stored answer as text for people (``metrion-cache show``), when its bytes are not text."""
        return None


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

    __slots__ = ("_format", "_pending", "_event", "_data", "ended", "failed")

    def __init__(self, wire_format: WireFormat) -> None:
        self._format = wire_format
        # The bytes of an unfinished line, joined only once its line break arrives: a long
        # event in small chunks then costs linear time, not a copy of the line per chunk.
        self._pending: list[bytes] = []
        self._event: str | None = None
        self._data: list[str] = []
        self.ended = False
        self.failed = False

    def feed(self, chunk: bytes) -> None:
        if self.failed:
            return
        if b"\n" not in chunk:
            if chunk:
                self._pending.append(chunk)
            return
        self._pending.append(chunk)
        lines = b"".join(self._pending).split(b"\n")
        tail = lines.pop()
        self._pending = [tail] if tail else []
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


def sse_events(chunks: list[bytes]) -> list[tuple[str | None, str]]:
    """The (event, data) pairs of a whole server-sent event stream."""
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    events: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if event is not None or data:
            events.append((event, "\n".join(data)))
    return events


def sse(event: str | None, data: Any, *, crlf: bool = False) -> bytes:
    """One server-sent event; ``data`` is JSON-encoded unless it is a string already."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    text = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
    return (text.replace("\n", "\r\n") if crlf else text).encode("utf-8")


def json_object(data: bytes | str) -> dict[str, Any]:
    """A JSON object, or ValueError."""
    parsed = json.loads(data)
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return parsed


def dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_payloads(chunks: list[bytes], stream: bool) -> list[Any]:
    """The JSON objects of an answer: its body, or each event's data (non-JSON data skipped)."""
    texts = [data for _, data in sse_events(chunks)] if stream else [b"".join(chunks).decode("utf-8", "replace")]
    found = []
    for text in texts:
        try:
            found.append(json.loads(text))
        except ValueError:
            continue
    return found


def number(value: Any) -> int:
    """A token count from a JSON field that may be missing, null or not a number."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def json_error_field(data: str) -> bool:
    """Whether an SSE data payload is a JSON object carrying an ``error`` member."""
    if '"error"' not in data:
        return False
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and bool(parsed.get("error"))
