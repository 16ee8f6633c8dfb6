"""The simulated provider's realistic answers and framing quirks, through the cache and the real SDKs.

Real answers carry more than text (thinking, tool calls, citations, logprobs, audio, reasoning
fields, annotations) and real streams come framed in CRLF or lone CR, with ``: ping``
comments, gzip-compressed, or labelled ``application/json``. Each is asked for twice in one
mode (MISS then HIT, one provider call) and once in the other mode (a HIT converted from the
stored answer), and the SDK must read the same answer each time.
"""

from __future__ import annotations

import gzip
from typing import Any

import httpx
import pytest
from recorded_calls import send

from metrion_fixture.testing.provider import make_answer

MODELS = {
    "anthropic": "claude-haiku-4-5",
    "openai": "gpt-4o-mini",
    "responses": "gpt-5-mini",
    "gemini": "gemini-2.5-flash",
}


def question_request(api: str, question: str, model: str | None = None, **extra: Any) -> dict[str, Any]:
    model = model or MODELS[api]
    if api == "anthropic":
        return {"model": model, "max_tokens": 1024, "messages": [{"role": "user", "content": question}], **extra}
    if api == "openai":
        return {"model": model, "messages": [{"role": "user", "content": question}], **extra}
    if api == "responses":
        return {"model": model, "input": question, **extra}
    return {"contents": [{"parts": [{"text": question}], "role": "user"}], **extra}


def ask_three_times(
    api: str,
    request: dict[str, Any],
    provider: Any,
    session: Any,
    *,
    stream: bool,
    modes: str,
    model: str | None = None,
) -> list[str]:
    """Stored mode twice, then the other mode: what the SDK read each time, with the cache's statuses checked."""
    model = model or (MODELS[api] if api == "gemini" else None)
    headers = {"x-simulate": modes} if modes else None
    said = [
        send(api, request, provider.url, stream=stream, model=model, headers=headers),
        send(api, request, provider.url, stream=stream, model=model, headers=headers),
        send(api, request, provider.url, stream=not stream, model=model, headers=headers),
    ]
    assert [record.status for record in session.calls] == ["MISS", "HIT", "HIT"], said
    assert provider.call_count == 1
    return said


# -- framing quirks ---------------------------------------------------------------------------------------------

QUIRKS = ("crlf", "cr", "ping-comments", "gzip", "crlf, ping-comments, gzip")


# google-genai reads every line of a stream as JSON: a comment breaks it, and Gemini sends none.
FRAMINGS = [(api, quirk) for api in sorted(MODELS) for quirk in QUIRKS if not (api == "gemini" and "ping" in quirk)]


@pytest.mark.parametrize(("api", "quirk"), FRAMINGS)
def test_framed_streams_are_stored_replayed_and_converted(api, quirk, provider, memory_session):
    question = f"How are streams framed with {quirk} for {api}?"
    said = ask_three_times(api, question_request(api, question), provider, memory_session, stream=True, modes=quirk)
    assert all(make_answer(question) in text for text in said), said


@pytest.mark.parametrize("api", sorted(MODELS))
def test_streams_labelled_json_are_stored_and_replayed(api, provider, memory_session):
    question = f"Is a stream labelled JSON still a stream for {api}?"
    said = ask_three_times(
        api, question_request(api, question), provider, memory_session, stream=True, modes="sse-as-json"
    )
    assert all(make_answer(question) in text for text in said), said


@pytest.mark.parametrize(
    ("api", "path", "modes", "expected"),
    [
        ("anthropic", "/v1/messages", "crlf", b"event: message_stop\r\ndata: "),
        ("openai", "/v1/chat/completions", "cr", b"data: [DONE]\r\r"),
        ("openai", "/v1/chat/completions", "ping-comments", b"\n: ping\n\n"),
        ("gemini", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "", b"}\r\n\r\n"),
        ("gemini", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "lf", b"}\n\n"),
    ],
)
def test_the_provider_frames_streams_as_asked(api, path, modes, expected, provider):
    """The quirks reach the wire (the SDK tests above would pass on tidy streams too)."""
    body = (
        question_request(api, "Frame this?", stream=True) if api != "gemini" else question_request(api, "Frame this?")
    )
    response = httpx.post(provider.url + path, json=body, headers={"x-simulate": modes}, params={"alt": "sse"})
    assert response.status_code == 200 and expected in response.content
    if modes == "lf":
        assert b"\r" not in response.content


def test_the_provider_labels_and_compresses_streams_as_asked(provider):
    body = question_request("openai", "Label this?", stream=True)
    with httpx.stream(
        "POST", provider.url + "/v1/chat/completions", json=body, headers={"x-simulate": "sse-as-json, gzip"}
    ) as response:
        raw = response.read()  # httpx decodes the gzip body
        assert response.headers["content-type"] == "application/json"
        assert response.headers["content-encoding"] == "gzip"
    assert raw.endswith(b"data: [DONE]\n\n")
    plain = httpx.post(
        provider.url + "/v1/chat/completions", json={**body, "stream": False}, headers={"x-simulate": "gzip"}
    )
    assert plain.json()["choices"][0]["message"]["content"] == make_answer("Label this?")
    assert len(gzip.compress(plain.content)) > 0


# -- realistic answers ------------------------------------------------------------------------------------------

SEARCH_TOOL_ANTHROPIC = [{"name": "search_faq", "description": "Search the FAQ", "input_schema": {"type": "object"}}]
SEARCH_TOOL_OPENAI = [{"type": "function", "function": {"name": "search_faq", "parameters": {"type": "object"}}}]
SEARCH_TOOL_GEMINI = [{"functionDeclarations": [{"name": "search_faq", "description": "Search the FAQ"}]}]

# (label, api, request extras, model, x-simulate, what the parsed answer must say besides or instead of the answer)
ANSWERS: list[tuple[str, str, dict[str, Any], str | None, str, str]] = [
    (
        "anthropic thinking",
        "anthropic",
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        None,
        "",
        "The user asks",
    ),
    ("anthropic tool_use", "anthropic", {"tools": SEARCH_TOOL_ANTHROPIC}, None, "tool-call", "search_faq"),
    ("anthropic citations", "anthropic", {}, None, "citations", ""),
    ("openai annotations", "openai", {}, None, "", ""),
    ("openai logprobs", "openai", {"logprobs": True, "top_logprobs": 1}, None, "", ""),
    (
        "openai audio",
        "openai",
        {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
        "gpt-4o-audio-preview",
        "",
        "",
    ),
    ("openai tool_calls", "openai", {"tools": SEARCH_TOOL_OPENAI}, None, "tool-call", "search_faq"),
    ("openai refusal", "openai", {}, None, "refusal", "can't help"),
    ("deepseek reasoning_content", "openai", {}, "deepseek-reasoner", "", "Thinking about"),
    ("openrouter reasoning", "openai", {}, "anthropic/claude-haiku-4.5", "reasoning", "Thinking about"),
    ("responses reasoning", "responses", {"reasoning": {"effort": "low", "summary": "auto"}}, None, "", ""),
    ("responses citations", "responses", {}, None, "citations", ""),
    (
        "gemini thoughts",
        "gemini",
        {"generationConfig": {"thinkingConfig": {"includeThoughts": True}}},
        None,
        "",
        "Considering",
    ),
    ("gemini function call", "gemini", {"tools": SEARCH_TOOL_GEMINI}, None, "tool-call", "search_faq"),
    ("gemini citations", "gemini", {}, None, "citations", ""),
]


def _answer_cases() -> list[Any]:
    return [
        pytest.param(api, extra, model, modes, says, stream, id=f"{label}-{'stream' if stream else 'json'}")
        for label, api, extra, model, modes, says in ANSWERS
        for stream in (False, True)
    ]


@pytest.mark.parametrize(("api", "extra", "model", "modes", "says", "stream"), _answer_cases())
def test_realistic_answers_are_stored_replayed_and_converted(
    api, extra, model, modes, says, stream, provider, memory_session
):
    question = f"Which fields does a real {api} answer carry ({modes or sorted(extra)}, {model}, {stream})?"
    request = question_request(api, question, model if api != "gemini" else None, **extra)
    gemini_model = model or MODELS["gemini"] if api == "gemini" else None
    said = ask_three_times(api, request, provider, memory_session, stream=stream, modes=modes, model=gemini_model)
    needle = says or make_answer(question)
    assert all(needle in text for text in said), said


ERROR_PATHS = {
    "anthropic": "/v1/messages",
    "openai": "/v1/chat/completions",
    "responses": "/v1/responses",
    "gemini": "/v1beta/models/gemini-2.5-flash:generateContent",
}


@pytest.mark.parametrize("api", sorted(MODELS))
def test_an_error_body_in_a_200_is_never_stored(api, provider, memory_session):
    """A gateway's 200 carrying an error object is passed on, never stored: the next call asks the provider again."""
    body = question_request(api, f"Will the gateway fail for {api}?")
    for _ in range(2):
        response = httpx.post(provider.url + ERROR_PATHS[api], json=body, headers={"x-simulate": "error-200"})
        assert response.status_code == 200 and "error" in response.json()
    assert provider.call_count == 2
    assert [record.status for record in memory_session.calls] == ["MISS", "MISS"]
