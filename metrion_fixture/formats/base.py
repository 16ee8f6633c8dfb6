"""What every wire format tells the engine, and the helpers the formats share."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.records import Usage
from .sse import MAX_EVENT_BYTES, Event, SSEDecoder, SSEError


@dataclass(frozen=True)
class Prompt:
    """The part of a request that enters the cache key."""

    model: str
    messages: list[Any]
    stream: bool
    # Request options that shape the answer but not which answer it is (OpenAI's
    # stream_options.include_usage, the number of choices asked for): needed to turn a stored
    # answer into the other mode, and to tell when a stream of it is complete.
    shape: dict[str, Any] | None = None


class WireFormat:
    """One provider API shape. Subclasses are small: matching, extraction, stream ends, errors.

    ``name`` separates entries in the store, so an answer in one format never
    answers a request in another.
    """

    name: str = ""
    # Who is billed for answers in this format, unless the model's price entry says otherwise.
    provider: str = ""
    # Whether streams of this format say when the answer is complete (a final event or state).
    # Streams of a format that does not (gRPC) are complete when their transport ends cleanly.
    has_stream_terminator: bool = True
    # What a complete stream of this format ends with after its final state, for a stream stored
    # although the caller stopped reading before it (litellm leaves an Anthropic stream after
    # message_delta, never reading message_stop): the replayed stream must still end as the provider's do.
    stream_trailer: bytes = b""

    def matches(self, method: str, path: str) -> bool:
        raise NotImplementedError

    def prompt(self, path: str, body: Any) -> Prompt | None:
        """Model, messages and streaming of a parsed JSON body, or None if not cacheable."""
        raise NotImplementedError

    def unkeyable_reason(self, path: str, body: Any) -> str:
        """Why :meth:`prompt` finds nothing to key in a parsed body, for the replay refusal ("" if it does)."""
        return chat_unkeyable_reason(body)

    def preview(self, prompt: Prompt) -> str:
        """The start of the last user message's text, on one line ("" if it has none): what ``ls`` shows."""
        return last_user_text(prompt.messages)

    def stream_event(self, event: str | None, data: str) -> str | None:
        """Classify one server-sent event (see :class:`StreamWatcher`).

        "end": the provider's final state has arrived (the answer is complete); "trailer": an event
        that only follows the final state (Anthropic's message_stop, OpenAI's [DONE]), no proof of
        completeness by itself; "ignore": an event allowed anywhere (a ping); "error"; None: a
        part of the answer.
        """
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

    def answer_text(self, chunks: Sequence[bytes], stream: bool) -> str | None:
        """The answer as a person reads it (``metrion-cache show --text``): a stream assembled, tool calls named.

        None when the stored bytes are not a whole answer of this format.
        """
        try:
            body = self.body_from_stream(list(chunks)) if stream else b"".join(chunks)
            return None if body is None else self.text_of(json_object(body))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def text_of(self, answer: dict[str, Any]) -> str | None:
        """The text of a parsed non-streamed answer of this format."""
        return None

    def stream_watcher(self, shape: dict[str, Any] | None = None) -> ChunkWatcher:
        """What follows a streamed answer of this format to tell whether it is whole.

        ``shape`` is the request's :attr:`Prompt.shape` (what the complete answer must contain).
        """
        return StreamWatcher(self)

    def storable_body(self, body: bytes) -> bool:
        """Whether a non-streamed answer is a whole answer, worth storing.

        Not truncated, not a gateway's HTML, and not an error object sent with a 200 (OpenAI-compatible
        gateways do: ``{"error": {...}}``, ``{"object": "error", ...}``), which inside a stream is refused too.
        """
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return False
        return isinstance(parsed, dict) and not is_error_object(parsed)

    def is_stream_answer(self, requested_stream: bool, headers: list[tuple[str, str]]) -> bool:
        """Whether the provider's answer is a stream, to pass on chunk by chunk while it is recorded.

        An event stream says so, and so does the answer to a streamed request whatever its label:
        gateways send event streams as ``application/json`` (or ``text/plain``, or unlabelled). Were
        it a JSON body after all, it still reaches the caller byte for byte, and is not stored (no
        event in it brings the final state), as a JSON body never answers a streamed request.
        """
        kinds = [value.split(";")[0].strip().lower() for name, value in headers if name.lower() == "content-type"]
        if "text/event-stream" in kinds:
            return True
        return requested_stream and all(kind in _STREAM_LABELS for kind in kinds)

    # Whether answers of this format can be converted between streamed and not (see below):
    # a format that cannot is not looked up in the other mode.
    converts_modes: bool = True


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


PREVIEW_CHARS = 60


def last_user_text(messages: Sequence[Any], user_roles: tuple[Any, ...] = ("user",)) -> str:
    """The first ``PREVIEW_CHARS`` characters of the last user message that has text, spaces collapsed.

    A message's text is its ``content`` when a string, else the ``text`` of its content parts
    (OpenAI, Anthropic, Responses) or of its ``parts`` (Gemini). Images, tool results and other
    parts are not text and are left out.
    """
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") not in user_roles:
            continue
        text = " ".join(_texts(message.get("content", message.get("parts")))).split()
        if text:
            return " ".join(text)[:PREVIEW_CHARS]
    return ""


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    found = []
    for part in content:
        if isinstance(part, str):
            found.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            found.append(part["text"])
    return found


# Content types seen on event streams besides their own (recordings of gateways and proxies).
_STREAM_LABELS = frozenset({"application/json", "text/plain", "application/x-ndjson", ""})


def chat_unkeyable_reason(body: Any) -> str:
    """Why a chat-shaped body (model and messages) cannot be keyed, or ""."""
    if not isinstance(body, dict):
        return "its body is not a JSON object"
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        return "it names no model"
    if messages is None and "prompt" in body:
        return "it sends a legacy `prompt` instead of `messages`"
    if not isinstance(messages, list):
        return "it has no list of messages"
    return ""


class ChunkWatcher:
    """Follows a stream chunk by chunk as it passes to the caller: did it end, did it fail?

    The engine stores a stream only if it ``ended`` (or, for formats without a terminator,
    its body ended cleanly, after :meth:`close`) and never ``failed``. This base reads
    nothing: it suits streams whose chunks say nothing about completeness (gRPC messages),
    which are complete when their transport ends cleanly.
    """

    __slots__ = ("ended", "failed", "trailed")

    def __init__(self) -> None:
        self.ended = False
        self.failed = False
        self.trailed = False  # the format's trailer arrived (nothing to add to a stored stream)

    @property
    def in_event(self) -> bool:
        """Whether the bytes read so far stop inside an event (a caller left in the middle of one)."""
        return False

    def feed(self, chunk: bytes) -> None:
        """One more chunk of the stream, as the provider sent it."""

    def close(self) -> None:
        """The stream's body ended cleanly: the last chance to find it incomplete."""


class StreamWatcher(ChunkWatcher):
    """Watches a server-sent event stream: the wire format classifies each event (:meth:`WireFormat.stream_event`).

    A stream has ``ended`` once the provider's final state has arrived ("end"), whatever follows
    or whether the caller reads on. An error is final, however the bytes were split. Anything
    meaningful after the final state or the trailer means the stream was misread, and so does an
    event the body left unfinished (unless it is the trailer) or one over the decoder's size
    bound: all fail. Formats whose completeness depends on the request (how many choices, whether
    usage was asked for) subclass this and override :meth:`classify`.
    """

    __slots__ = ("_format", "_decoder")

    def __init__(self, wire_format: WireFormat, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        super().__init__()
        self._format = wire_format
        self._decoder = SSEDecoder(max_event_bytes)

    def classify(self, event: str | None, data: str) -> str | None:
        """One event's verdict, as :meth:`WireFormat.stream_event` gives it."""
        return self._format.stream_event(event, data)

    def feed(self, chunk: bytes) -> None:
        if self.failed:
            return
        for event, data in self._decoder.feed(chunk):
            self._judge(self.classify(event, data))
            if self.failed:
                return
        if self._decoder.error is not None:
            self.failed = True

    def _judge(self, verdict: str | None) -> None:
        if verdict == "error":
            self.failed = True
        elif verdict == "end":
            if self.trailed:
                self.failed = True  # the final state after the trailer: not one stream
            self.ended = True
        elif verdict == "trailer":
            self.trailed = True
        elif verdict != "ignore" and (self.ended or self.trailed):
            self.failed = True

    @property
    def in_event(self) -> bool:
        return self._decoder.in_event

    def close(self) -> None:
        if self.failed:
            return
        for event, data in self._decoder.close():
            # The body ended inside this event: only a trailer cut short of its blank line is whole.
            verdict = self.classify(event, data)
            if verdict in ("trailer", "ignore") and self.ended:
                self._judge(verdict)
            else:
                self.failed = True


_EVENT_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


def whole_events(chunks: list[bytes]) -> list[bytes]:
    """The chunks cut after the last blank line: without an event the caller left unfinished."""
    joined = b"".join(chunks)
    boundary = max((match.end() for match in _EVENT_BOUNDARY.finditer(joined)), default=0)
    kept: list[bytes] = []
    size = 0
    for chunk in chunks:
        if size + len(chunk) >= boundary:
            if boundary > size:
                kept.append(chunk[: boundary - size])
            break
        kept.append(chunk)
        size += len(chunk)
    return kept


def sse_events(chunks: list[bytes]) -> list[Event]:
    """The (event, data) pairs of a whole server-sent event stream, its unfinished last event included.

    Raises :class:`~.sse.SSEError` (a ValueError) for an event over the size bound.
    """
    decoder = SSEDecoder()
    events = decoder.feed(b"".join(chunks))
    events += decoder.close()
    if decoder.error is not None:
        raise SSEError(decoder.error)
    return events


def sse(event: str | None, data: Any, *, crlf: bool = False) -> bytes:
    """One server-sent event; ``data`` is JSON-encoded unless it is a string already."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    text = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
    return (text.replace("\n", "\r\n") if crlf else text).encode("utf-8")


def tool_call_text(name: Any, arguments: Any) -> str:
    """A tool call in an answer's text: ``[tool call lookup({"city": "Paris"})]``."""
    shown = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"[tool call {name}({shown})]"


def json_object(data: bytes | str) -> dict[str, Any]:
    """A JSON object, or ValueError."""
    parsed = json.loads(data)
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return parsed


def is_error_object(answer: dict[str, Any]) -> bool:
    """Whether a parsed answer is an error in any provider's shape rather than an answer.

    ``{"error": {...}}`` or ``{"error": "..."}`` (OpenAI and its compatibles, Gemini; a successful
    Responses answer has ``"error": null``), ``{"object": "error", ...}`` (vLLM, Mistral),
    ``{"type": "error", "error": {...}}`` (Anthropic).
    """
    return bool(answer.get("error")) or answer.get("object") == "error" or answer.get("type") == "error"


def is_json_object(body: bytes) -> bool:
    """Whether a body parses as one JSON object."""
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


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
    return isinstance(parsed, dict) and is_error_object(parsed)
