"""One request through a real SDK against the simulated provider, sync or async, streamed or not.

Each call returns the answer text and the HTTP response headers, so tests can
compare what the SDK saw on a miss and on a hit.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any

import anthropic
import openai

SDKS = ("anthropic", "openai")
QUESTION = [{"role": "user", "content": "What are your delivery times?"}]


@dataclass
class Answer:
    text: str
    headers: dict[str, str]
    usage: Any = None

    @property
    def cache(self) -> str | None:
        return self.headers.get("x-metrion-cache")


def call(sdk: str, base_url: str, *, stream: bool = False, use_async: bool = False, **options: Any) -> Answer:
    """Run one SDK call; async calls get a fresh event loop each, as separate scripts would."""
    if use_async:
        return asyncio.run(acall(sdk, base_url, stream=stream, **options))
    return (_anthropic if sdk == "anthropic" else _openai)(base_url, stream=stream, **options)


async def acall(sdk: str, base_url: str, *, stream: bool = False, **options: Any) -> Answer:
    return await (_anthropic_async if sdk == "anthropic" else _openai_async)(base_url, stream=stream, **options)


async def _parsed(raw: Any) -> Any:
    # The SDKs' raw async responses differ on whether parse() is a coroutine.
    parsed = raw.parse()
    return await parsed if inspect.isawaitable(parsed) else parsed


def _anthropic_args(messages: Any, extra_headers: dict[str, str] | None, **params: Any) -> dict[str, Any]:
    return {
        "model": params.pop("model", "claude-test"),
        "max_tokens": params.pop("max_tokens", 100),
        "messages": messages if messages is not None else QUESTION,
        "extra_headers": extra_headers,
        **params,
    }


def _openai_args(messages: Any, extra_headers: dict[str, str] | None, **params: Any) -> dict[str, Any]:
    return {
        "model": params.pop("model", "gpt-test"),
        "messages": messages if messages is not None else QUESTION,
        "extra_headers": extra_headers,
        **params,
    }


def _anthropic(
    base_url: str, *, stream: bool, messages: Any = None, extra_headers=None, client=None, **params
) -> Answer:
    client = client or anthropic.Anthropic(base_url=base_url, api_key="sk-ant-secret-test-key", max_retries=0)
    args = _anthropic_args(messages, extra_headers, **params)
    if stream:
        with client.messages.stream(**args) as events:
            text = "".join(events.text_stream)
            final = events.get_final_message()
            return Answer(text, dict(events.response.headers), final.usage)
    raw = client.messages.with_raw_response.create(**args)
    message = raw.parse()
    return Answer("".join(block.text for block in message.content), dict(raw.headers), message.usage)


async def _anthropic_async(
    base_url: str, *, stream: bool, messages: Any = None, extra_headers=None, client=None, **params
) -> Answer:
    client = client or anthropic.AsyncAnthropic(base_url=base_url, api_key="sk-ant-secret-test-key", max_retries=0)
    args = _anthropic_args(messages, extra_headers, **params)
    if stream:
        async with client.messages.stream(**args) as events:
            text = "".join([piece async for piece in events.text_stream])
            final = await events.get_final_message()
            return Answer(text, dict(events.response.headers), final.usage)
    raw = await client.messages.with_raw_response.create(**args)
    message = await _parsed(raw)
    return Answer("".join(block.text for block in message.content), dict(raw.headers), message.usage)


def _openai(base_url: str, *, stream: bool, messages: Any = None, extra_headers=None, client=None, **params) -> Answer:
    client = client or openai.OpenAI(base_url=base_url + "/v1", api_key="sk-openai-secret-test-key", max_retries=0)
    args = _openai_args(messages, extra_headers, **params)
    if stream:
        raw = client.chat.completions.with_raw_response.create(
            stream=True, stream_options={"include_usage": True}, **args
        )
        text, usage = "", None
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        return Answer(text, dict(raw.headers), usage)
    raw = client.chat.completions.with_raw_response.create(**args)
    completion = raw.parse()
    return Answer(completion.choices[0].message.content or "", dict(raw.headers), completion.usage)


async def _openai_async(
    base_url: str, *, stream: bool, messages: Any = None, extra_headers=None, client=None, **params
) -> Answer:
    client = client or openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="sk-openai-secret-test-key", max_retries=0)
    args = _openai_args(messages, extra_headers, **params)
    if stream:
        raw = await client.chat.completions.with_raw_response.create(
            stream=True, stream_options={"include_usage": True}, **args
        )
        text, usage = "", None
        async for chunk in await _parsed(raw):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        return Answer(text, dict(raw.headers), usage)
    raw = await client.chat.completions.with_raw_response.create(**args)
    completion = await _parsed(raw)
    return Answer(completion.choices[0].message.content or "", dict(raw.headers), completion.usage)
