"""A simulated LLM provider on loopback: Anthropic, OpenAI Chat and Responses, Gemini, Mistral.

For the offline demo and the test suite.

Stdlib only. The answers carry the fields real ones carry today, by default or when the request
asks for them as it would the real API: OpenAI's ``annotations``, ``refusal``, ``service_tier``,
``system_fingerprint``, usage details and stream ``obfuscation`` padding, ``logprobs`` (with
``"logprobs": true``), ``audio`` (with ``"modalities": ["text", "audio"]``), ``reasoning_content``
(``deepseek-reasoner``); Anthropic's cache usage fields, ``service_tier`` and thinking blocks (with
``"thinking": {"type": "enabled"}``); Responses reasoning items (with ``"reasoning"``); Gemini's
safety ratings, usage metadata and thought parts (with ``"includeThoughts": true``), in CRLF-framed
streams as Gemini sends them.

Other answers and failure modes are chosen per request with the ``x-simulate`` header
(comma-separated, e.g. ``gzip, cut-stream``):

- failures: ``status-500``, ``status-429``, ``status-400``, ``cut-stream``, ``error-event``,
  ``no-terminator``, ``big``, ``error-200`` (an error body with status 200, as some gateways send);
- answers: ``tool-call`` (a call of the first tool the request offers), ``citations``, ``refusal``
  (OpenAI), ``reasoning`` (OpenRouter's ``reasoning`` / ``reasoning_details``, or DeepSeek's
  ``reasoning_content`` for ``deepseek`` models);
- framing: ``gzip`` (the body), ``crlf`` or ``cr`` (SSE line ends; ``lf`` for Gemini's),
  ``ping-comments`` (``: ping`` comment lines between events), ``sse-as-json`` (a stream labelled
  ``Content-Type: application/json``, as some gateways do).
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import socketserver
import threading
import time
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = ["DELIVERY_ANSWER", "ReceivedCall", "SimulatedProvider", "make_answer"]

DELIVERY_ANSWER = (
    "Standard delivery takes 3-5 business days; express delivery arrives the next business day "
    "when you order before 2 pm. Orders over 50 euros ship free, and you get a tracking link by "
    "email as soon as your parcel leaves our warehouse."
)
_BIG_SIZE = 2 * 1024 * 1024
_MAX_DELTAS = 64  # one delta per word, except that the 2 MiB answer is batched into this many
_ENDPOINTS = {"anthropic": "/v1/messages", "openai": "/chat/completions", "responses": "/responses"}  # path suffixes
_GEMINI_METHODS = (":generateContent", ":streamGenerateContent")
_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"}
_ERRORS = {  # status -> (Anthropic error type, OpenAI error type, message)
    400: ("invalid_request_error", "invalid_request_error", "Simulated invalid request."),
    404: ("not_found_error", "not_found_error", "Not found."),
    429: ("rate_limit_error", "rate_limit_exceeded", "Simulated rate limit: slow down."),
    500: ("api_error", "server_error", "Simulated internal server error."),
}


@dataclass(frozen=True)
class ReceivedCall:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    json: Any


def make_answer(question: str, *, big: bool = False) -> str:
    """The deterministic answer the provider gives to ``question``."""
    question = " ".join(question.split())
    if "delivery" in question.lower():
        answer = DELIVERY_ANSWER
    else:
        answer = f"Here is a simulated answer to: {question}"
    if big:
        answer = " ".join([answer] * (_BIG_SIZE // (len(answer) + 1) + 1))
    return answer


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        blocks = (b for b in content if isinstance(b, dict) and b.get("type") == "text")
        return " ".join(str(b.get("text", "")) for b in blocks)
    return ""


def _kind(path: str) -> str:
    """Which simulated API a path belongs to, or "" for none."""
    path = path.rstrip("/")
    if "/models/" in path and path.endswith(_GEMINI_METHODS):
        return "gemini"
    return next((k for k, suffix in _ENDPOINTS.items() if path.endswith(suffix)), "")


def _gemini_text(content: Any) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    return " ".join(str(p.get("text", "")) for p in parts or [] if isinstance(p, dict))


def _responses_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    content = item.get("content") if isinstance(item, dict) else None
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return _text_of(content)


def _question_and_prompt(kind: str, req: dict[str, Any]) -> tuple[str, list[str]]:
    """The last user question and every prompt text of a request, whatever its API."""
    if kind == "gemini":
        contents = [c for c in req.get("contents") or [] if isinstance(c, dict)]
        users = [c for c in contents if c.get("role", "user") == "user"]
        system = _gemini_text(req.get("systemInstruction") or req.get("system_instruction"))
        return (_gemini_text(users[-1]) if users else ""), [system] + [_gemini_text(c) for c in contents]
    if kind == "responses":
        given = req.get("input")
        items: list[Any] = [given] if isinstance(given, str) else [i for i in given or [] if isinstance(i, (str, dict))]
        users = [i for i in items if isinstance(i, str) or i.get("role", "user") == "user"]
        texts = [_text_of(req.get("instructions"))] + [_responses_text(i) for i in items]
        return (_responses_text(users[-1]) if users else ""), texts
    messages = [m for m in req.get("messages") or [] if isinstance(m, dict)]
    user_turns = [m for m in messages if m.get("role") == "user"]
    question = _text_of(user_turns[-1].get("content")) if user_turns else ""
    return question, [_text_of(req.get("system"))] + [_text_of(m.get("content")) for m in messages]


def _count_words(texts: Iterable[str]) -> int:
    return sum(len(t.split()) for t in texts)


def _pieces(text: str) -> list[str]:
    words = re.findall(r"\s*\S+", text) or [text]
    step = -(-len(words) // _MAX_DELTAS)
    return ["".join(words[i : i + step]) for i in range(0, len(words), step)]


def _sse(event: str | None, data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


_SIGNATURE = "EqQBCkYIBxgCKkDw0fOjYh1p0n9w3rmp7R3eZkqeJ8cB2X0vYp7Tj5oQ4mYzS1YH0mX6ZsG8f9X2oQ=="


def _frame(events: list[bytes], modes: set[str], default_newline: bytes = b"\n") -> list[bytes]:
    """The framing quirks real streams have: CRLF or lone-CR line ends, ``: ping`` comments."""
    newline = b"\r\n" if "crlf" in modes else b"\r" if "cr" in modes else b"\n" if "lf" in modes else default_newline
    if "ping-comments" in modes:
        events = [event + (b": ping\n\n" if index % 3 == 2 else b"") for index, event in enumerate(events)]
    if newline != b"\n":  # JSON payloads hold no raw line break: every one is framing
        events = [event.replace(b"\n", newline) for event in events]
    return events


def _first_tool(req: dict[str, Any], modes: set[str]) -> str | None:
    """The tool the answer calls: the first one offered, when the request asks for a tool call."""
    if "tool-call" not in modes:
        return None
    for tool in req.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        function: dict[str, Any] = tool["function"] if isinstance(tool.get("function"), dict) else tool
        declarations = tool.get("functionDeclarations") or tool.get("function_declarations")
        if isinstance(declarations, list) and declarations and isinstance(declarations[0], dict):
            function = declarations[0]
        if isinstance(function.get("name"), str):
            return str(function["name"])
    return None


def _logprobs(pieces: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "token": piece,
            "logprob": -0.0123,
            "bytes": list(piece.encode()),
            "top_logprobs": [{"token": piece, "logprob": -0.0123, "bytes": list(piece.encode())}],
        }
        for piece in pieces
    ]


def _cut(events: list[bytes], error: bytes, modes: set[str]) -> tuple[list[bytes], bool]:
    """Apply the stream failure modes (the last event is the end marker); True means hang up."""
    half = max(1, len(events) // 2)
    if "cut-stream" in modes:
        return events[:half], True
    if "error-event" in modes:
        return events[:half] + [error], False
    if "no-terminator" in modes:
        return events[:-1], False
    return events, False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    provider: SimulatedProvider

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can stall.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-stream and stop() closing connections are expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle on, the body waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    server: _Server
    _gzip = False

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.provider._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.provider._track(self.connection, add=False)

    def do_POST(self) -> None:
        self._handle()

    do_GET = do_HEAD = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_POST

    # -- request ---------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _handle(self) -> None:
        url = urlsplit(self.path)
        body = self._read_body()
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = None
        headers = {k.lower(): v for k, v in self.headers.items()}
        provider = self.server.provider
        provider._record(ReceivedCall(self.command, url.path, url.query, headers, body, parsed))
        modes = {m.strip().lower() for m in headers.get("x-simulate", "").split(",") if m.strip()}
        self._gzip = "gzip" in modes  # reset per request: the handler outlives it on keep-alive

        kind = _kind(url.path)
        if not kind or self.command != "POST":
            return self._send_error(404, kind or "anthropic", f"No route for {self.command} {url.path}")
        if provider.latency:
            time.sleep(provider.latency)
        if not isinstance(parsed, dict):
            return self._send_error(400, kind, "The request body is not a valid JSON object.")
        for status in (500, 429, 400):
            if f"status-{status}" in modes:
                return self._send_error(status, kind, _ERRORS[status][2])
        if "error-200" in modes:  # OpenAI-compatible gateways answer an upstream failure so
            return self._send_error(500, kind, "Upstream provider error.", sent_status=200)
        question, prompt = _question_and_prompt(kind, parsed)
        answer = make_answer(question, big="big" in modes)
        tokens = (_count_words(prompt), len(answer.split()))
        if kind == "gemini":
            return self._gemini(url.path, parsed, answer, tokens, modes)
        handler = {"anthropic": self._anthropic, "responses": self._responses}.get(kind, self._openai)
        handler(parsed, answer, tokens, modes)

    # -- Anthropic Messages and OpenAI Chat Completions ----------------------------------------------

    def _anthropic(self, req: dict[str, Any], answer: str, tokens: tuple[int, int], modes: set[str]) -> None:
        usage = {
            "input_tokens": tokens[0],
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": tokens[1],
            "service_tier": "standard",
        }
        message = {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": str(req.get("model", "claude-simulated")),
        }
        headers = self._headers("request-id", "anthropic-ratelimit-requests-remaining")
        thinking = isinstance(req.get("thinking"), dict) and req["thinking"].get("type") in ("enabled", "adaptive")
        tool = _first_tool(req, modes)
        thought = f"The user asks: {answer[:40]}. A short, direct answer will do."
        text_block: dict[str, Any] = {"type": "text", "text": answer}
        if "citations" in modes:
            text_block["citations"] = [
                {
                    "type": "web_search_result_location",
                    "cited_text": answer[:60],
                    "url": "https://example.com/source",
                    "title": "A simulated source",
                    "encrypted_index": "Eo8BCioIAhgBIiQ0NGFlNjc2Yy0yZmM3",
                }
            ]
        tool_block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": tool, "input": {"query": "x"}}
        stop = {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None}
        if not req.get("stream"):
            content: list[dict[str, Any]] = [text_block]
            if thinking:
                content.insert(0, {"type": "thinking", "thinking": thought, "signature": _SIGNATURE})
            if tool:
                content.append(tool_block)
            body = {**message, "content": content, **stop, "usage": usage}
            return self._send_json(200, body, headers, cut="cut-stream" in modes)

        def event(name: str, **data: Any) -> bytes:
            return _sse(name, {"type": name, **data})

        start: dict[str, Any] = {
            **message,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        blocks: list[bytes] = []
        index = 0
        if thinking:
            blocks += [
                event(
                    "content_block_start", index=0, content_block={"type": "thinking", "thinking": "", "signature": ""}
                ),
                event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": thought}),
                event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": _SIGNATURE}),
                event("content_block_stop", index=0),
            ]
            index = 1
        opened: dict[str, Any] = {"type": "text", "text": ""}
        if "citations" in modes:
            opened["citations"] = []
        blocks.append(event("content_block_start", index=index, content_block=opened))
        if index == 0:
            blocks.append(event("ping"))  # the real API pings right after the first block starts
        blocks += [
            event("content_block_delta", index=index, delta={"type": "text_delta", "text": p}) for p in _pieces(answer)
        ]
        if "citations" in modes:
            citation = text_block["citations"][0]
            blocks.append(
                event("content_block_delta", index=index, delta={"type": "citations_delta", "citation": citation})
            )
        blocks.append(event("content_block_stop", index=index))
        if tool:
            index += 1
            blocks += [
                event("content_block_start", index=index, content_block={**tool_block, "input": {}}),
                event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": ""}),
                event(
                    "content_block_delta",
                    index=index,
                    delta={"type": "input_json_delta", "partial_json": '{"query": "x"}'},
                ),
                event("content_block_stop", index=index),
            ]
        final_usage = {
            name: usage[name] for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        }
        events = [
            event("message_start", message=start),
            *blocks,
            event("message_delta", delta=stop, usage={**final_usage, "output_tokens": tokens[1]}),
            event("message_stop"),
        ]
        error = event("error", error={"type": "overloaded_error", "message": "Overloaded"})
        self._send_stream(*_cut(events, error, modes), headers, modes)

    def _openai(self, req: dict[str, Any], answer: str, tokens: tuple[int, int], modes: set[str]) -> None:
        model = str(req.get("model", "gpt-simulated"))
        deepseek = model.startswith("deepseek")
        reasoning_tokens = 11 if "reasoning" in modes or model == "deepseek-reasoner" else 0
        usage = {
            "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1] + reasoning_tokens,
            "total_tokens": sum(tokens) + reasoning_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:29]}",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_560af6e559",
        }
        headers = self._headers("x-request-id", "x-ratelimit-remaining-requests")
        tool = _first_tool(req, modes)
        refusal = "I'm sorry, I can't help with that." if "refusal" in modes else None
        thought = f"Thinking about: {answer[:40]}" if reasoning_tokens else None
        audio = isinstance(req.get("modalities"), list) and "audio" in req["modalities"]
        wants_logprobs = req.get("logprobs") is True
        pieces = _pieces(answer)
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": tool, "arguments": '{"query":"x"}'},
        }
        finish = "tool_calls" if tool else "stop"
        if not req.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if (tool or refusal or audio) else answer,
                "refusal": refusal,
                "annotations": [],
            }
            if tool:
                message["tool_calls"] = [call]
            if audio:
                message["audio"] = {
                    "id": f"audio_{uuid.uuid4().hex[:24]}",
                    "data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEAgD4AAAB9AAACABAAZGF0YQAAAAA=",
                    "expires_at": int(time.time()) + 3600,
                    "transcript": answer,
                }
            if thought and deepseek:
                message["reasoning_content"] = thought
            elif thought:
                message["reasoning"] = thought
                details = {"type": "reasoning.text", "text": thought, "format": "unknown", "index": 0}
                message["reasoning_details"] = [details]
            logprobs = {"content": _logprobs(pieces), "refusal": None} if wants_logprobs else None
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
            body = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return self._send_json(200, body, headers, cut="cut-stream" in modes)

        options = req.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        # With include_usage the real API puts "usage": null on every chunk but the final usage one.
        chunk = {**base, "object": "chat.completion.chunk", **({"usage": None} if include_usage else {})}

        def delta(d: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            choice = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}
            # The real API pads each chunk with random characters against length side channels.
            return _sse(
                None, {**chunk, "choices": [choice], "obfuscation": "x" * (len(d.get("content") or "") % 7 + 1)}
            )

        body_deltas: list[bytes] = []
        if thought:
            field = "reasoning_content" if deepseek else "reasoning"
            body_deltas.append(delta({"content": None, field: thought}))
        if tool:
            body_deltas.append(
                delta({"tool_calls": [{"index": 0, **call, "function": {"name": tool, "arguments": ""}}]})
            )
            body_deltas.append(delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"query":"x"}'}}]}))
        elif refusal:
            body_deltas.append(delta({"refusal": refusal}))
        elif audio:
            audio_id = f"audio_{uuid.uuid4().hex[:24]}"
            body_deltas += [delta({"audio": {"id": audio_id, "transcript": p}}) for p in pieces]
            body_deltas.append(delta({"audio": {"id": audio_id, "data": "UklGRiQAAABXQVZF", "expires_at": 1}}))
        else:
            body_deltas += [
                delta({"content": p}, logprobs={"content": _logprobs([p]), "refusal": None} if wants_logprobs else None)
                for p in pieces
            ]
        # Mistral (same wire shape) always puts the usage on the chunk that finishes the answer.
        mistral = model.startswith(("mistral", "ministral", "codestral", "magistral"))
        finish_chunk = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "usage": usage}
        events = [
            delta({"role": "assistant", "content": "", "refusal": None}),
            *body_deltas,
            *([_sse(None, finish_chunk)] if mistral else [delta({}, finish)]),
            *([_sse(None, {**chunk, "choices": [], "usage": usage, "obfuscation": "Qm"})] if include_usage else []),
            _sse(None, "[DONE]"),
        ]
        error = _sse(None, {"error": {"message": "server had an error", "type": "server_error"}})
        self._send_stream(*_cut(events, error, modes), headers, modes)

    # -- OpenAI Responses and Gemini ---------------------------------------------------------------

    def _responses(self, req: dict[str, Any], answer: str, tokens: tuple[int, int], modes: set[str]) -> None:
        reasoning = isinstance(req.get("reasoning"), dict)
        reasoning_tokens = 64 if reasoning else 0
        usage = {
            "input_tokens": tokens[0],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tokens[1] + reasoning_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": sum(tokens) + reasoning_tokens,
        }
        item_id = f"msg_{uuid.uuid4().hex[:24]}"
        response: dict[str, Any] = {
            "id": f"resp_{uuid.uuid4().hex[:24]}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": req.get("instructions"),
            "max_output_tokens": None,
            "model": str(req.get("model", "gpt-simulated")),
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": req.get("previous_response_id"),
            "reasoning": req.get("reasoning") if reasoning else {"effort": None, "summary": None},
            "service_tier": "default",
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": None,
            "user": None,
            "metadata": {},
        }
        annotations = (
            [
                {
                    "type": "url_citation",
                    "start_index": 0,
                    "end_index": 10,
                    "title": "A source",
                    "url": "https://example.com",
                }
            ]
            if "citations" in modes
            else []
        )
        part = {"type": "output_text", "text": answer, "annotations": annotations, "logprobs": []}
        item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
        summary = {"type": "summary_text", "text": "**Answering the question**"}
        reasoning_item = {"id": f"rs_{uuid.uuid4().hex[:24]}", "type": "reasoning", "summary": [summary]}
        output = [reasoning_item, item] if reasoning else [item]
        done = {**response, "output": output, "usage": usage}
        headers = self._headers("x-request-id", "x-ratelimit-remaining-requests")
        if not req.get("stream"):
            return self._send_json(200, done, headers, cut="cut-stream" in modes)

        sequence = iter(range(1_000_000))

        def event(name: str, **data: Any) -> bytes:
            return _sse(name, {"type": name, "sequence_number": next(sequence), **data})

        opened = {**response, "status": "in_progress"}
        position = 1 if reasoning else 0
        at = {"item_id": item_id, "output_index": position, "content_index": 0}
        thinking: list[bytes] = []
        if reasoning:
            rs = {"item_id": reasoning_item["id"], "output_index": 0, "summary_index": 0}
            thinking = [
                event("response.output_item.added", output_index=0, item={**reasoning_item, "summary": []}),
                event("response.reasoning_summary_part.added", **rs, part={**summary, "text": ""}),
                event("response.reasoning_summary_text.delta", **rs, delta=summary["text"], obfuscation="a1"),
                event("response.reasoning_summary_text.done", **rs, text=summary["text"]),
                event("response.reasoning_summary_part.done", **rs, part=summary),
                event("response.output_item.done", output_index=0, item=reasoning_item),
            ]
        added = {**item, "status": "in_progress", "content": []}
        events = [
            event("response.created", response=opened),
            event("response.in_progress", response=opened),
            *thinking,
            event("response.output_item.added", output_index=position, item=added),
            event("response.content_part.added", **at, part={**part, "text": "", "annotations": []}),
            *(
                event("response.output_text.delta", **at, delta=p, logprobs=[], obfuscation="k" * (len(p) % 5 + 1))
                for p in _pieces(answer)
            ),
            *(
                event("response.output_text.annotation.added", **at, annotation_index=i, annotation=a)
                for i, a in enumerate(annotations)
            ),
            event("response.output_text.done", **at, text=answer, logprobs=[]),
            event("response.content_part.done", **at, part=part),
            event("response.output_item.done", output_index=position, item=item),
            event("response.completed", response=done),
        ]
        error = event("error", code="server_error", message="server had an error", param=None)
        self._send_stream(*_cut(events, error, modes), headers, modes)

    def _gemini(self, path: str, req: dict[str, Any], answer: str, tokens: tuple[int, int], modes: set[str]) -> None:
        model = path.rstrip("/").rpartition(":")[0].rpartition("/")[2]
        thoughts = 7 if "thinking" in model else 0
        config = req.get("generationConfig") or req.get("generation_config") or {}
        thinking_config = (
            config.get("thinkingConfig") or config.get("thinking_config") if isinstance(config, dict) else None
        )
        show_thoughts = isinstance(thinking_config, dict) and bool(
            thinking_config.get("includeThoughts") or thinking_config.get("include_thoughts")
        )
        thoughts = thoughts or (9 if show_thoughts else 0)
        usage = {
            "promptTokenCount": tokens[0],
            "candidatesTokenCount": tokens[1],
            "totalTokenCount": sum(tokens) + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens[0]}],
            **({"thoughtsTokenCount": thoughts} if thoughts else {}),
        }
        base = {"modelVersion": model, "responseId": uuid.uuid4().hex[:22]}
        headers = {"x-goog-request-id": uuid.uuid4().hex, "server-timing": "gfet4t7; dur=1"}
        tool = _first_tool(req, modes)
        safety = [
            {"category": category, "probability": "NEGLIGIBLE"}
            for category in (
                "HARM_CATEGORY_HATE_SPEECH",
                "HARM_CATEGORY_DANGEROUS_CONTENT",
                "HARM_CATEGORY_HARASSMENT",
                "HARM_CATEGORY_SEXUALLY_EXPLICIT",
            )
        ]
        thought_part: dict[str, Any] = {"text": f"Considering: {answer[:40]}", "thought": True}

        def candidate(parts: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
            found: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if finish:
                found.update(finishReason=finish, safetyRatings=safety)
                if "citations" in modes:
                    source = {"startIndex": 0, "endIndex": min(len(answer), 40), "uri": "https://example.com/source"}
                    found["citationMetadata"] = {"citationSources": [source]}
            return found

        call: dict[str, Any] = {"functionCall": {"name": tool, "args": {"query": "x"}}}
        if not path.endswith(":streamGenerateContent"):
            parts: list[dict[str, Any]] = [call] if tool else [{"text": answer}]
            if show_thoughts:
                parts.insert(0, thought_part)
            body = {"candidates": [candidate(parts, "STOP")], "usageMetadata": usage, **base}
            return self._send_json(200, body, headers, cut="cut-stream" in modes)
        pieces = _pieces(answer)
        running = {"promptTokenCount": tokens[0], "totalTokenCount": tokens[0]}
        texts: list[list[dict[str, Any]]] = [[{"text": p}] for p in pieces] if not tool else [[call]]
        if show_thoughts:
            texts.insert(0, [thought_part])
        events = [_sse(None, {"candidates": [candidate(p)], "usageMetadata": running, **base}) for p in texts[:-1]] + [
            _sse(None, {"candidates": [candidate(texts[-1], "STOP")], "usageMetadata": usage, **base})
        ]
        error = _sse(None, {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})
        if "no-terminator" in modes:  # Gemini has no terminator: the closest failure is a cut
            modes = {*modes, "cut-stream"}
        # Gemini frames its events with CRLF.
        self._send_stream(*_cut(events, error, modes), headers, modes, newline=b"\r\n")

    # -- response writing ----------------------------------------------------------------------

    def _headers(self, request_id: str, ratelimit: str) -> dict[str, str]:
        return {
            request_id: f"req_{uuid.uuid4().hex[:24]}",
            ratelimit: str(max(0, 1000 - self.server.provider.call_count)),
            "set-cookie": f"__sim_session={uuid.uuid4().hex}; Path=/; HttpOnly; Secure; SameSite=None",
        }

    def _start(self, status: int, content_type: str, extra: dict[str, str], length: int | None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        if length is None:
            self.send_header("transfer-encoding", "chunked")
            self.send_header("cache-control", "no-cache")
        else:
            self.send_header("content-length", str(length))
        if self._gzip:
            self.send_header("content-encoding", "gzip")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_json(self, status: int, obj: Any, extra: dict[str, str], *, cut: bool = False) -> None:
        data = json.dumps(obj).encode()
        if self._gzip:
            data = gzip.compress(data)
        self._start(status, "application/json", extra, len(data))
        if self.command == "HEAD":
            return
        if cut:
            self.wfile.write(data[: len(data) // 2])
            return self._hang_up()
        self.wfile.write(data)

    def _send_error(self, status: int, kind: str, message: str, *, sent_status: int | None = None) -> None:
        anthropic_type, openai_type, _ = _ERRORS[status]
        if kind == "gemini":
            obj: dict[str, Any] = {"error": {"code": status, "message": message, "status": _GEMINI_STATUS[status]}}
            extra = {"x-goog-request-id": uuid.uuid4().hex}
        elif kind == "anthropic":
            obj = {"type": "error", "error": {"type": anthropic_type, "message": message}}
            extra = {"request-id": f"req_{uuid.uuid4().hex[:24]}"}
        else:
            obj = {"error": {"message": message, "type": openai_type, "param": None, "code": None}}
            extra = {"x-request-id": f"req_{uuid.uuid4().hex[:24]}"}
        self._send_json(sent_status or status, obj, {**extra, "x-should-retry": "false"})

    def _send_stream(
        self, events: list[bytes], hang_up: bool, extra: dict[str, str], modes: set[str], newline: bytes = b"\n"
    ) -> None:
        events = _frame(events, modes, newline)
        content_type = "application/json" if "sse-as-json" in modes else "text/event-stream; charset=utf-8"
        self._start(200, content_type, extra, None)
        gz = zlib.compressobj(wbits=31) if self._gzip else None
        delay = self.server.provider.chunk_delay
        for i, event in enumerate(events):
            if i and delay:
                time.sleep(delay)
            # A sync flush per event keeps every event decodable as soon as its chunk lands.
            self._chunk(gz.compress(event) + gz.flush(zlib.Z_SYNC_FLUSH) if gz else event)
        if hang_up:
            return self._hang_up()
        if gz:
            self._chunk(gz.flush())
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _hang_up(self) -> None:
        """Close without finishing the body, as a dropped upstream connection would."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class SimulatedProvider:
    """An Anthropic Messages, OpenAI Chat Completions / Responses and Gemini look-alike served from daemon threads."""

    def __init__(
        self, *, latency: float = 0.0, chunk_delay: float = 0.0, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.host, self.port = host, port
        self.url = ""
        self.calls: list[ReceivedCall] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SimulatedProvider:
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), _Handler)
        server.provider = self
        host, self.port = str(server.server_address[0]), int(server.server_address[1])
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
        self._server = server
        # A short poll interval (serve_forever's argument) lets stop() return promptly.
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Idle keep-alive connections would otherwise keep their handler threads parked in a read.
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SimulatedProvider:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def call_count(self) -> int:
        """POSTs to the LLM endpoints, whatever their outcome."""
        with self._lock:
            return sum(c.method == "POST" and bool(_kind(c.path)) for c in self.calls)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    def _record(self, call: ReceivedCall) -> None:
        with self._lock:
            self.calls.append(call)

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)
