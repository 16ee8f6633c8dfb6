"""The second adversarial round (issue 14): each defect it found, as a test that failed before its fix.

Driven through raw httpx2 clients whose provider is a MockTransport (see test_reliability_fuzz)
or the SlowProvider of test_reliability_flight, so each runs in well under a second unless
time is what it measures.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx2
import pytest

from metrion_fixture import CacheSession, MetrionCacheError
from metrion_fixture.core.key import cache_key
from metrion_fixture.transports.httpx2 import CacheTransport

ANTHROPIC_ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "ok"}]}
OPENAI_ANSWER = {
    "id": "c1",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
}


class Provider:
    """Counts calls; answers each with the text it is told (by default: which call it was)."""

    def __init__(self) -> None:
        self.received: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.received.append(request)
        answer = ANTHROPIC_ANSWER if request.url.path.endswith("/messages") else OPENAI_ANSWER
        answer = json.loads(json.dumps(answer))
        if "content" in answer:
            answer["content"][0]["text"] = f"answer {len(self.received)}"
        else:
            answer["choices"][0]["message"]["content"] = f"answer {len(self.received)}"
        return httpx2.Response(200, json=answer)


def client_for(provider: Provider, url: str = "memory://round2", **options: Any) -> tuple[httpx2.Client, CacheSession]:
    options.setdefault("namespace", f"r2-{uuid.uuid4().hex[:12]}")
    session = CacheSession(url, **options)
    transport = CacheTransport(httpx2.MockTransport(provider), session=session)
    return httpx2.Client(transport=transport, base_url="https://provider.test"), session


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- 8. key computation is total over every valid JSON value -------------------------------------

ODD_BODIES = {
    "lone surrogate in a message": '{"model":"m","messages":[{"role":"user","content":"cut \\ud83d"}]}',
    "lone surrogate in the model": '{"model":"m\\udc00","messages":[{"role":"user","content":"x"}]}',
    "lone surrogate in the system prompt": '{"model":"m","system":"\\ud83d","messages":[{"role":"user","content":"x"}]}',
    **{
        f"nested {depth} levels": '{"model":"m","messages":[{"role":"user","content":' + nested(depth) + "}]}"
        for depth in (979, 981, 983, 990)
    },
    "nested objects 985 levels": '{"model":"m","messages":[{"role":"user","content":'
    + '{"a":' * 985
    + "1"
    + "}" * 985
    + "}]}",
}


@pytest.mark.parametrize("route", ["/v1/messages", "/v1/chat/completions"])
@pytest.mark.parametrize("name", sorted(ODD_BODIES))
def test_valid_json_never_raises_from_the_transport_and_is_cached(name, route):
    """A lone surrogate or deep nesting: the provider's answer, then a HIT (or passed through); never an exception.

    Nesting deep enough that the JSON parser itself gives up (how deep depends on the stack
    already in use) is passed through untouched; anything it parses is keyed and cached.
    """
    provider = Provider()
    client, _ = client_for(provider)
    with client:
        first = client.post(route, content=ODD_BODIES[name].encode())
        second = client.post(route, content=ODD_BODIES[name].encode())
    assert first.status_code == second.status_code == 200
    tags = [first.headers["x-metrion-cache"], second.headers["x-metrion-cache"]]
    if tags == ["BYPASS", "BYPASS"]:
        assert name.startswith("nested") and len(provider.received) == 2
    else:
        assert tags == ["MISS", "HIT"]
        assert first.content == second.content and len(provider.received) == 1
    if name.startswith("lone"):
        assert tags == ["MISS", "HIT"]


def test_the_key_is_total_and_keeps_distinct_prompts_apart():
    """The key of text UTF-8 cannot carry is its escaped form's hash; nothing collides with a valid prompt."""
    assert cache_key("m", ["\ud83d"]) != cache_key("m", ["\\ud83d"]) != cache_key("m", ["\ud83d\ude00"])
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    assert len(cache_key("m", deep)) == 64
    shallow = [[{"b": 1, "a": ["é", 2.5, None, True]}]]
    expected = json.dumps(
        {"model": "m", "messages": shallow}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    from metrion_fixture.core.key import _iterative_json

    assert _iterative_json({"model": "m", "messages": shallow}) == expected


# -- 1. scope="credential" sees Azure OpenAI's api-key ---------------------------------------------


@pytest.mark.parametrize("where", ["header", "query"])
def test_azure_api_key_is_a_credential(where):
    """Two Azure OpenAI keys (``api-key`` header or ``?api-key=``) never share an answer; one key gets its HIT."""
    provider = Provider()
    client, session = client_for(provider, scope="credential")
    path = "/openai/deployments/gpt/chat/completions?api-version=2024-06-01"
    body = {"model": "gpt", "messages": [{"role": "user", "content": "tenant question"}]}

    def ask(secret: str) -> httpx2.Response:
        if where == "header":
            return client.post(path, json=body, headers={"api-key": secret})
        return client.post(path + f"&api-key={secret}", json=body)

    with client:
        answers = [ask(secret) for secret in ("tenant-A-secret", "tenant-B-secret", "tenant-A-secret")]
    assert [a.headers["x-metrion-cache"] for a in answers] == ["MISS", "MISS", "HIT"]
    assert answers[1].json() != answers[0].json() and answers[2].json() == answers[0].json()
    stored = " ".join(session.store.keys(f"{session.settings.namespace}:"))
    assert "tenant" not in stored


# -- 10. reserved namespaces are refused -----------------------------------------------------------


@pytest.mark.parametrize("name", ["_ledger", "_anything"])
def test_reserved_namespaces_are_refused(name):
    with pytest.raises(MetrionCacheError, match="reserved"):
        CacheSession("memory://round2", namespace=name)
