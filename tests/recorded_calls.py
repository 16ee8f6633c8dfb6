"""A request body, as an SDK sent it, sent again through that SDK; what the parsed answer says.

For replaying recorded requests (cassettes) and for asking the simulated provider for its
realistic answers: one digest of everything an answer says (text, thinking, tool calls,
refusal, audio transcript, reasoning fields, citations), as the SDK parsed it.
"""

from __future__ import annotations

from typing import Any

import anthropic
import openai
from google import genai
from google.genai import types as genai_types


def _anthropic_digest(message: Any) -> str:
    parts = []
    for block in message.content:
        parts += [getattr(block, name, None) or "" for name in ("text", "thinking", "name")]
        parts += [citation.cited_text for citation in getattr(block, "citations", None) or []]
    return " ".join(parts)


def _openai_digest(message: Any) -> str:
    extra = message.model_extra or {}
    parts = [message.content or "", message.refusal or ""]
    parts += [str(extra.get(name) or "") for name in ("reasoning", "reasoning_content")]
    parts += [call.function.name + call.function.arguments for call in message.tool_calls or []]
    parts.append(message.audio.transcript if message.audio else "")
    return " ".join(parts)


def _openai_stream_digest(chunks: Any) -> str:
    parts = []
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            extra = delta.model_extra or {}
            parts += [delta.content or "", delta.refusal or ""]
            parts += [str(extra.get(name) or "") for name in ("reasoning", "reasoning_content")]
            audio = getattr(delta, "audio", None) or extra.get("audio")  # a field in newer SDKs
            transcript = audio.get("transcript") if isinstance(audio, dict) else getattr(audio, "transcript", None)
            parts.append(transcript or "")
            parts += [
                (c.function.name or "") + (c.function.arguments or "") for c in delta.tool_calls or [] if c.function
            ]
    return "".join(parts)


def _responses_digest(response: Any) -> str:
    calls = [item.name + item.arguments for item in response.output if item.type == "function_call"]
    return " ".join([response.output_text, *calls])


def _gemini_digest(responses: list[Any]) -> str:
    parts = []
    for response in responses:
        for candidate in response.candidates or []:
            for part in (candidate.content.parts if candidate.content else None) or []:
                parts.append(part.text or "")
                parts.append(part.function_call.name if part.function_call else "")
    return "".join(parts)


def send(
    api: str,
    request: dict[str, Any],
    base_url: str,
    *,
    stream: bool,
    model: str | None = None,
    headers: dict[str, str] | None = None,
) -> str:
    """Send ``request`` (a JSON body of ``api``: anthropic, openai, responses or gemini) through its SDK."""
    params = {name: value for name, value in request.items() if name not in ("stream", "stream_options")}
    if api == "anthropic":
        claude = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-test", max_retries=0, default_headers=headers)
        if stream:
            with claude.messages.stream(**params) as events:
                return _anthropic_digest(events.get_final_message())
        return _anthropic_digest(claude.messages.create(**params))
    gpt = openai.OpenAI(base_url=base_url + "/v1", api_key="sk-openai-test", max_retries=0, default_headers=headers)
    if api == "openai":
        if stream:
            options = request.get("stream_options") or {"include_usage": True}
            return _openai_stream_digest(gpt.chat.completions.create(**params, stream=True, stream_options=options))
        return _openai_digest(gpt.chat.completions.create(**params).choices[0].message)
    if api == "responses":
        if stream:
            with gpt.responses.stream(**params) as events:
                return _responses_digest(events.get_final_response())
        return _responses_digest(gpt.responses.create(**params))
    assert api == "gemini" and model, "a Gemini request names its model in the path"
    gemini = genai.Client(api_key="AIza-test", http_options=genai_types.HttpOptions(base_url=base_url, headers=headers))
    config = genai_types.GenerateContentConfig.model_validate(
        {
            **params.get("generationConfig", {}),
            "systemInstruction": params.get("systemInstruction"),
            "tools": params.get("tools"),
        }
    )
    if stream:
        return _gemini_digest(
            list(gemini.models.generate_content_stream(model=model, contents=params["contents"], config=config))
        )
    return _gemini_digest([gemini.models.generate_content(model=model, contents=params["contents"], config=config)])
