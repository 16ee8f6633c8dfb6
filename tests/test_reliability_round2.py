"""The second adversarial round (issue 14): each defect it found, as a test that failed before its fix.

Driven through raw httpx2 clients whose provider is a MockTransport (see test_reliability_fuzz)
or the SlowProvider of test_reliability_flight, so each runs in well under a second unless
time is what it measures.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx2
import pytest
from test_reliability_flight import BODY as FLIGHT_BODY
from test_reliability_flight import SSE, SlowProvider, run_threads, sync_request, text_of

from metrion_fixture import CacheSession, MetrionCacheError
from metrion_fixture.core.key import _iterative_json, cache_key
from metrion_fixture.core.scope import credential_tag
from metrion_fixture.transports.httpx2 import AsyncCacheTransport, CacheTransport

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


# -- single flight: 2 (one store timeout), 3 (never wait for oneself), 4 (failures at once), 5 (both shapes) --


def hanging(seconds: float):
    def call(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        raise TimeoutError("store hung")

    return call


def test_a_store_that_hangs_mid_request_costs_one_timeout_not_two():
    """The lookup and the lock work, then the store hangs: the write times out, the release is skipped by the breaker."""
    provider = Provider()
    client, session = client_for(provider, url=f"memory://{uuid.uuid4().hex}")
    store = session.store
    store.set = hanging(0.8)  # type: ignore[method-assign]
    store.release = hanging(0.8)  # type: ignore[method-assign]
    with client:
        started = time.monotonic()
        response = client.post("/v1/messages", json={"model": "m", "messages": [{"role": "user", "content": "hang"}]})
        elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.headers["x-metrion-cache"] == "MISS"
    assert len(provider.received) == 1
    assert elapsed < 1.4, f"{elapsed:.2f} s: more than one store timeout (0.8 s)"


def test_one_thread_opening_two_identical_streams_never_waits_for_itself():
    """Two identical streams opened before the first is read: the second goes to the provider at once."""
    provider = SlowProvider(pause=0.0)
    session = CacheSession(f"memory://{uuid.uuid4().hex}", namespace="r2-self", single_flight_wait=5)
    body = {**FLIGHT_BODY, "stream": True}
    with httpx2.Client(transport=CacheTransport(httpx2.MockTransport(provider), session=session)) as client:
        started = time.monotonic()
        first = client.send(client.build_request("POST", "https://p.test/v1/messages", json=body), stream=True)
        second = client.send(client.build_request("POST", "https://p.test/v1/messages", json=body), stream=True)
        opened = time.monotonic() - started
        texts = [text_of(response.read(), True) for response in (second, first)]
        first.close()
        second.close()
    assert opened < 1.0, f"the second stream waited {opened:.2f} s for a lock its own thread holds"
    assert texts == ["the answer", "the answer"] and provider.calls == 2


def test_the_same_in_one_asyncio_task():
    calls: list[int] = []

    async def provider(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=b"".join(SSE))

    session = CacheSession(f"memory://{uuid.uuid4().hex}", namespace="r2-self-async", single_flight_wait=5)
    body = {**FLIGHT_BODY, "stream": True}

    async def main() -> float:
        transport = AsyncCacheTransport(httpx2.MockTransport(provider), session=session)
        async with httpx2.AsyncClient(transport=transport) as client:
            started = time.monotonic()
            first = await client.send(
                client.build_request("POST", "https://p.test/v1/messages", json=body), stream=True
            )
            second = await client.send(
                client.build_request("POST", "https://p.test/v1/messages", json=body), stream=True
            )
            opened = time.monotonic() - started
            await second.aread()
            await first.aread()
            await first.aclose()
            await second.aclose()
            return opened

    opened = asyncio.run(main())
    assert opened < 1.0, f"the second stream waited {opened:.2f} s for a lock its own task holds"
    assert len(calls) == 2


def test_waiters_of_a_failing_leader_fail_together_not_in_series():
    """10 identical requests, the provider answers 500 after 0.5 s: the last caller is done after ~2 calls, not 10."""
    provider = SlowProvider(decide=lambda n: "fail", pause=0.5)
    session = CacheSession(f"memory://{uuid.uuid4().hex}", namespace="r2-fail")
    started = time.monotonic()
    results = run_threads(10, lambda _: sync_request(session, provider))
    elapsed = time.monotonic() - started
    assert [r[0] for r in results] == [500] * 10
    assert elapsed < 2.0, f"the last of 10 callers was answered after {elapsed:.2f} s"


def test_mixed_stream_and_json_duplicates_make_one_provider_call():
    """5 streamed and 5 non-streamed identical requests at once: one provider call, every shape answered."""
    provider = SlowProvider(pause=0.3)
    session = CacheSession(f"memory://{uuid.uuid4().hex}", namespace="r2-mixed")
    results = run_threads(10, lambda n: sync_request(session, provider, {**FLIGHT_BODY, "stream": n % 2 == 0}))
    assert provider.calls == 1
    assert sorted(tag for _, tag, _ in results) == ["HIT"] * 9 + ["MISS"]
    assert {text_of(content, n % 2 == 0) for n, (_, _, content) in enumerate(results)} == {"the answer"}


# -- 9. an entry is served only under the storage key it was written for -----------------------------


@pytest.mark.parametrize("moved_to", ["namespace", "format", "scope"])
def test_an_entry_copied_under_another_storage_key_is_not_served(moved_to):
    """The same prompt's answer, copied under another namespace's, format's or scope's storage key: a MISS."""
    url = f"memory://{uuid.uuid4().hex}"
    provider = Provider()
    body = {"model": "m", "messages": [{"role": "user", "content": "moved"}]}
    writer, written = client_for(provider, url=url, namespace="r2-origin")
    with writer:
        assert writer.post("/v1/messages", json=body).headers["x-metrion-cache"] == "MISS"
    (source,) = written.store.keys("r2-origin:")
    value = written.store.get(source)
    assert value is not None
    namespace, route, options, headers = "r2-origin", "/v1/messages", {}, {}
    if moved_to == "namespace":
        namespace = "r2-elsewhere"
    elif moved_to == "format":
        route = "/v1/chat/completions"
    else:
        options, headers = {"scope": "credential"}, {"x-api-key": "tenant-B"}
    reader, session = client_for(provider, url=url, namespace=namespace, **options)
    with reader:
        target = source.replace("r2-origin", namespace)
        if moved_to == "format":
            target = target.replace("anthropic_messages", "openai_chat")
        if moved_to == "scope":
            target += f":cred-{credential_tag(headers)}"
        session.store.set(target, value, 3600)
        response = reader.post(route, json=body, headers=headers)
    assert response.headers["x-metrion-cache"] == "MISS", "an entry written for another storage key was served"
    assert len(provider.received) == 2
