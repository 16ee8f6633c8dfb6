"""Made-up inputs for the sans-IO core: a fixed clock, one small request per wire format, and ``run``.

``run(flow, (StepType, answer), ...)`` drives a flow by hand: each step the flow yields must be of
the expected type, and gets the answer next to it (a callable is called with the step first).
After the last pair the flow must be over; ``run`` returns the steps it saw and the final state.
No store, no HTTP library, no session: every answer a store or a provider would give is written
out in the test.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from metrion_fixture.core.engine import Settings
from metrion_fixture.core.entry import Entry
from metrion_fixture.core.flow import Acquire, CacheCore, Lookup, Outcome, ReadRequest, Step
from metrion_fixture.core.key import cache_key
from metrion_fixture.formats import FORMATS_BY_NAME, Usage, WireFormat

WALL = 1_700_000_000.0
MONOTONIC = 500.0
TOKEN = "t"
JSON_HEADERS = [("content-type", "application/json")]
SSE_HEADERS = [("content-type", "text/event-stream; charset=utf-8")]


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, wall: float = WALL, monotonic: float = MONOTONIC) -> None:
        self.now, self.mono = wall, monotonic

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


class FakePricing:
    """One made-up price for every model: $1 per 1,000 input tokens, $2 per 1,000 output tokens."""

    @staticmethod
    def provider_of(model: str, default: str = "") -> str:
        return f"billed-{default}"

    @staticmethod
    def cost_usd(model: str, usage: Usage | None) -> float | None:
        return None if usage is None else usage.input_tokens / 1000 + usage.output_tokens * 2 / 1000


def make_core(clock: FakeClock | None = None, **settings: Any) -> CacheCore:
    return CacheCore(
        Settings(**settings), clock=clock or FakeClock(), new_token=lambda: TOKEN, plans=None, entries=None
    )


@dataclass
class Run:
    steps: list[Step]
    outcome: Outcome

    def types(self) -> list[type]:
        return [type(step) for step in self.steps]


Answers = tuple[type, Any]


def run(flow: Generator[Step, Any, Outcome], *answers: Answers) -> Run:
    """Drive ``flow``: the n-th step must be an instance of the n-th type, and is sent the n-th answer."""
    steps: list[Step] = []
    sent: Any = None
    for expected, answer in answers:
        try:
            step = flow.send(sent)
        except StopIteration as done:
            raise AssertionError(
                f"the flow ended after {[type(s).__name__ for s in steps]} with {done.value!r}; "
                f"expected a {expected.__name__} step"
            ) from None
        assert isinstance(step, expected), f"step {len(steps) + 1}: expected {expected.__name__}, got {step!r}"
        steps.append(step)
        sent = answer(step) if callable(answer) else answer
    try:
        extra = flow.send(sent)
    except StopIteration as done:
        return Run(steps, done.value)
    raise AssertionError(f"the flow went on after {[type(s).__name__ for s in steps]} with {extra!r}")


# -- one small request and answer per wire format ---------------------------------------------------


def sse(event: str | None, data: Any, *, crlf: bool = False) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    text = (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
    return (text.replace("\n", "\r\n") if crlf else text).encode()


@dataclass(frozen=True)
class Case:
    """One wire format: how to ask it, what it answers in each mode, and what the answer used."""

    name: str  # the wire format's name
    model: str
    body: dict[str, Any]  # the non-streamed request body
    json_answer: dict[str, Any]
    stream_answer: list[bytes]  # a complete stream, one event per chunk
    usage: tuple[int, int]  # (input, output) tokens both answers report
    key_messages: list[Any]  # what the key is made of, with the system prompt first
    json_path: str
    stream_path: str
    stream_query: bytes = b""
    stream_field: bool = True  # the body's "stream": true asks for a stream (Gemini: the path does)
    error_event: bytes = b""  # an error event the provider may send mid-stream
    terminator: bytes = b""  # the stream's last event (empty: the format has none)
    final_state: int = 0  # how many chunks of stream_answer it takes to hold the provider's final state

    @property
    def format(self) -> WireFormat:
        return FORMATS_BY_NAME[self.name]

    @property
    def key(self) -> str:
        return cache_key(self.model, self.key_messages)

    def storage_key(self, stream: bool, namespace: str = "metrion") -> str:
        return f"{namespace}:{self.name}:{'stream' if stream else 'json'}:{self.key}"

    def answer_bytes(self) -> bytes:
        return json.dumps(self.json_answer).encode()

    def chunks(self, stream: bool) -> list[bytes]:
        return list(self.stream_answer) if stream else [self.answer_bytes()]


@dataclass
class Req:
    """One HTTP request to a format, ready to become a flow."""

    case: Case
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # more body fields
    query: bytes | None = None

    @property
    def path(self) -> str:
        return self.case.stream_path if self.stream else self.case.json_path

    @property
    def body(self) -> bytes:
        body = dict(self.case.body)
        if self.stream and self.case.stream_field:
            body["stream"] = True
        body.update(self.extra)
        return json.dumps(body).encode()

    def flow(self, core: CacheCore) -> Generator[Step, Any, Outcome]:
        query = self.query if self.query is not None else (self.case.stream_query if self.stream else b"")
        return core.exchange("POST", self.path, self.headers, query)


ANTHROPIC = Case(
    name="anthropic_messages",
    model="claude-sonnet-4-5",
    body={"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "2+2?"}]},
    json_answer={
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "4"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 3},
    },
    stream_answer=[
        sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": 12, "output_tokens": 1},
                },
            },
        ),
        sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        sse("ping", {"type": "ping"}),
        sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "4"}},
        ),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 3},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ],
    usage=(12, 3),
    key_messages=[{"role": "user", "content": "2+2?"}],
    json_path="/v1/messages",
    stream_path="/v1/messages",
    error_event=sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    terminator=sse("message_stop", {"type": "message_stop"}),
    final_state=6,  # message_delta with its stop_reason
)

_CHAT_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini"}
OPENAI_CHAT = Case(
    name="openai_chat",
    model="gpt-4o-mini",
    body={"model": "gpt-4o-mini", "messages": _CHAT_MESSAGES, "temperature": 0},
    json_answer={
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "4", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21},
    },
    stream_answer=[
        sse(None, {**_CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        sse(None, {**_CHUNK, "choices": [{"index": 0, "delta": {"content": "4"}}]}),
        sse(None, {**_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        sse(None, {**_CHUNK, "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 1}}),
        sse(None, "[DONE]"),
    ],
    usage=(20, 1),
    key_messages=_CHAT_MESSAGES,
    json_path="/v1/chat/completions",
    stream_path="/v1/chat/completions",
    error_event=sse(None, {"error": {"message": "server had an error", "type": "server_error"}}),
    terminator=sse(None, "[DONE]"),
    final_state=3,  # the finish chunk (the request did not ask for the usage chunk)
)

_RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1700000000,
    "status": "completed",
    "model": "gpt-4.1-mini",
    "output": [
        {
            "id": "msg_1",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "4", "annotations": []}],
        }
    ],
    "usage": {"input_tokens": 15, "output_tokens": 2, "total_tokens": 17},
}
OPENAI_RESPONSES = Case(
    name="openai_responses",
    model="gpt-4.1-mini",
    body={"model": "gpt-4.1-mini", "input": "2+2?", "instructions": "Be brief.", "max_output_tokens": 50},
    json_answer=_RESPONSE,
    stream_answer=[
        sse(
            "response.created",
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": {**_RESPONSE, "status": "in_progress", "output": [], "usage": None},
            },
        ),
        sse(
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "sequence_number": 1,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "4",
            },
        ),
        sse("response.completed", {"type": "response.completed", "sequence_number": 2, "response": _RESPONSE}),
    ],
    usage=(15, 2),
    key_messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    json_path="/v1/responses",
    stream_path="/v1/responses",
    error_event=sse("error", {"type": "error", "code": "server_error", "message": "server had an error"}),
    terminator=sse("response.completed", {"type": "response.completed", "sequence_number": 2, "response": _RESPONSE}),
    final_state=3,
)

_CONTENTS = [{"role": "user", "parts": [{"text": "2+2?"}]}]
GEMINI = Case(
    name="gemini",
    model="gemini-2.0-flash",
    body={"contents": _CONTENTS, "generationConfig": {"temperature": 0, "maxOutputTokens": 50}},
    json_answer={
        "candidates": [{"content": {"parts": [{"text": "4"}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 1, "totalTokenCount": 9},
        "modelVersion": "gemini-2.0-flash",
    },
    stream_answer=[
        sse(
            None,
            {
                "candidates": [{"content": {"parts": [{"text": "4"}], "role": "model"}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
            },
            crlf=True,
        ),
        sse(
            None,
            {
                "candidates": [{"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 1, "totalTokenCount": 9},
            },
            crlf=True,
        ),
    ],
    usage=(8, 1),
    key_messages=_CONTENTS,
    json_path="/v1beta/models/gemini-2.0-flash:generateContent",
    stream_path="/v1beta/models/gemini-2.0-flash:streamGenerateContent",
    stream_query=b"alt=sse",
    stream_field=False,
    error_event=sse(None, {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}),
    final_state=2,  # the chunk with the finishReason
)

CASES = {case.name: case for case in (ANTHROPIC, OPENAI_CHAT, OPENAI_RESPONSES, GEMINI)}


def stored(
    case: Case,
    stream: bool,
    *,
    key: str | None = None,
    status: int = 200,
    age: float = 42.0,
    provider_seconds: float = 1.5,
    headers: list[tuple[str, str]] | None = None,
    chunks: list[bytes] | None = None,
    with_usage: bool = True,
    written_for: str | None = None,
) -> bytes:
    """A stored entry of ``case`` in one mode, written ``age`` seconds before the clock's wall time."""
    usage = {"input_tokens": case.usage[0], "output_tokens": case.usage[1]}
    return Entry(
        status=status,
        headers=headers if headers is not None else (SSE_HEADERS if stream else JSON_HEADERS) + [("request-id", "r1")],
        chunks=chunks if chunks is not None else case.chunks(stream),
        stream=stream,
        stored_at=WALL - age,
        ttl=3600,
        model=case.model,
        wire_format=case.name,
        key=case.key if key is None else key,
        provider_seconds=provider_seconds,
        extra={"usage": usage} if with_usage else {},
        storage_key=case.storage_key(stream) if written_for is None else written_for,
    ).encode()


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """The last value of ``name`` in a header list (None if absent)."""
    found = [value for key, value in headers if key.lower() == name]
    return found[-1] if found else None


def upstream(stream: bool, *extra: tuple[str, str], status: int = 200) -> tuple[int, list[tuple[str, str]]]:
    """The provider's status and headers: the Forward step's answer."""
    return status, (SSE_HEADERS if stream else JSON_HEADERS) + list(extra)


def cold(req: Req) -> list[Answers]:
    """A first-time request in mode true, up to its Forward: nothing stored in either mode, the lock is ours.

    With the lock taken it looks again in both modes: either may have been stored meanwhile.
    """
    return [(ReadRequest, req.body), (Lookup, None), (Lookup, None), (Acquire, True), (Lookup, None), (Lookup, None)]
