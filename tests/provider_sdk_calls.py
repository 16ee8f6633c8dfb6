"""One request through the google-genai, mistralai or openai (Responses) SDK, sync or async, streamed or not.

Like ``sdk_calls.call``: each call returns what the SDK gave the caller (text and
usage) so tests can compare a miss with a hit.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
from google import genai
from google.genai import types as genai_types
from mistralai.client import Mistral

PROVIDER_SDKS = ("gemini", "mistral", "responses")
QUESTION = "What are your delivery times?"
GEMINI_KEY = "AIza-goog-secret-test-key"
MISTRAL_KEY = "mistral-secret-test-key"
OPENAI_KEY = "sk-openai-secret-test-key"


@dataclass
class Reply:
    text: str
    usage: Any = None
    headers: dict[str, str] | None = None


def call(sdk: str, base_url: str, *, stream: bool = False, use_async: bool = False, **options: Any) -> Reply:
    if use_async:
        return asyncio.run(acall(sdk, base_url, stream=stream, **options))
    return {"gemini": _gemini, "mistral": _mistral, "responses": _responses}[sdk](base_url, stream=stream, **options)


async def acall(sdk: str, base_url: str, *, stream: bool = False, **options: Any) -> Reply:
    handler = {"gemini": _agemini, "mistral": _amistral, "responses": _aresponses}[sdk]
    return await handler(base_url, stream=stream, **options)


# -- Gemini -------------------------------------------------------------------------------------------


def gemini_client(base_url: str, headers: dict[str, str] | None = None) -> genai.Client:
    # With aiohttp installed (xai-sdk brings it), google-genai's async client would use
    # aiohttp, which no httpx cache sees; naming an httpx2 transport keeps it on httpx2.
    options = genai_types.HttpOptions(
        base_url=base_url,
        headers=headers or {},
        async_client_args={"transport": httpx2.AsyncHTTPTransport()},
    )
    return genai.Client(api_key=GEMINI_KEY, http_options=options)


def _gemini_args(question: str, model: str, system: str | None) -> dict[str, Any]:
    config = genai_types.GenerateContentConfig(system_instruction=system) if system else None
    return {"model": model, "contents": question, "config": config}


def _gemini_reply(chunks: list[Any]) -> Reply:
    text = "".join(chunk.text or "" for chunk in chunks)
    usage = next((c.usage_metadata for c in reversed(chunks) if c.usage_metadata), None)
    response = chunks[0].sdk_http_response if chunks else None
    return Reply(text, usage, dict(response.headers or {}) if response else None)


def _gemini(
    base_url: str,
    *,
    stream: bool,
    question: str = QUESTION,
    model: str = "gemini-2.5-flash",
    system: str | None = None,
    headers=None,
) -> Reply:
    client = gemini_client(base_url, headers)  # kept referenced: a collected client closes its connections
    models = client.models
    args = _gemini_args(question, model, system)
    if stream:
        return _gemini_reply(list(models.generate_content_stream(**args)))
    return _gemini_reply([models.generate_content(**args)])


async def _agemini(
    base_url: str,
    *,
    stream: bool,
    question: str = QUESTION,
    model: str = "gemini-2.5-flash",
    system: str | None = None,
    headers=None,
) -> Reply:
    client = gemini_client(base_url, headers)
    models = client.aio.models
    args = _gemini_args(question, model, system)
    if stream:
        return _gemini_reply([chunk async for chunk in await models.generate_content_stream(**args)])
    return _gemini_reply([await models.generate_content(**args)])


# -- Mistral ------------------------------------------------------------------------------------------


def _mistral_args(question: str, model: str, headers: dict[str, str] | None) -> dict[str, Any]:
    args: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": question}]}
    if headers:
        args["http_headers"] = headers
    return args


def _mistral(
    base_url: str, *, stream: bool, question: str = QUESTION, model: str = "mistral-small-latest", headers=None
) -> Reply:
    client = Mistral(api_key=MISTRAL_KEY, server_url=base_url)
    args = _mistral_args(question, model, headers)
    if stream:
        text, usage = "", None
        for event in client.chat.stream(**args):
            if event.data.choices:
                text += event.data.choices[0].delta.content or ""
            usage = event.data.usage or usage
        return Reply(text, usage)
    response = client.chat.complete(**args)
    return Reply(response.choices[0].message.content or "", response.usage)


async def _amistral(
    base_url: str, *, stream: bool, question: str = QUESTION, model: str = "mistral-small-latest", headers=None
) -> Reply:
    client = Mistral(api_key=MISTRAL_KEY, server_url=base_url)
    args = _mistral_args(question, model, headers)
    if stream:
        text, usage = "", None
        async for event in await client.chat.stream_async(**args):
            if event.data.choices:
                text += event.data.choices[0].delta.content or ""
            usage = event.data.usage or usage
        return Reply(text, usage)
    response = await client.chat.complete_async(**args)
    return Reply(response.choices[0].message.content or "", response.usage)


# -- OpenAI Responses ---------------------------------------------------------------------------------


def _responses_args(question: Any, model: str, headers: dict[str, str] | None, **params: Any) -> dict[str, Any]:
    return {"model": model, "input": question, "extra_headers": headers, **params}


def _responses(
    base_url: str, *, stream: bool, question: Any = QUESTION, model: str = "gpt-5-mini", headers=None, **params
) -> Reply:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=OPENAI_KEY, max_retries=0)
    args = _responses_args(question, model, headers, **params)
    if stream:
        with client.responses.stream(**args) as events:
            text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
            final = events.get_final_response()
            return Reply(text, final.usage)
    raw = client.responses.with_raw_response.create(**args)
    response = raw.parse()
    return Reply(response.output_text, response.usage, dict(raw.headers))


async def _aresponses(
    base_url: str, *, stream: bool, question: Any = QUESTION, model: str = "gpt-5-mini", headers=None, **params
) -> Reply:
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=OPENAI_KEY, max_retries=0)
    args = _responses_args(question, model, headers, **params)
    if stream:
        async with client.responses.stream(**args) as events:
            text = "".join([event.delta async for event in events if event.type == "response.output_text.delta"])
            final = await events.get_final_response()
            return Reply(text, final.usage)
    raw = await client.responses.with_raw_response.create(**args)
    response = raw.parse()
    if asyncio.iscoroutine(response):
        response = await response
    return Reply(response.output_text, response.usage, dict(raw.headers))
