"""The cache's promises as the real SDKs (and raw httpx2) see them, against the simulated provider:
the key, what is kept apart, the request headers, TTLs, header stripping, session modes,
response headers, what is never stored, secrets, configuration errors and bounded records."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import anthropic
import httpx2
import openai
import pytest
from sdk_calls import QUESTION, SDKS, call

import metrion_fixture
from metrion_fixture import CacheSession, MetrionCacheError, cache_key
from metrion_fixture.core.directives import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS
from metrion_fixture.core.entry import Entry
from metrion_fixture.integrations import patching
from metrion_fixture.runtime.activation import active_session

ANTHROPIC_KEY = "sk-ant-secret-test-key"
OPENAI_KEY = "sk-openai-secret-test-key"
MODEL = {"anthropic": "claude-test", "openai": "gpt-test"}
WIRE = {"anthropic": "anthropic_messages", "openai": "openai_chat"}
PATH = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions"}
REQUEST_ID = {"anthropic": "request-id", "openai": "x-request-id"}
RATE_LIMIT = {"anthropic": "anthropic-ratelimit-requests-remaining", "openai": "x-ratelimit-remaining-requests"}
# anthropic 2.x sends its key as a bearer token, like openai.
API_KEY_HEADER = {
    "anthropic": ("authorization", f"Bearer {ANTHROPIC_KEY}"),
    "openai": ("authorization", f"Bearer {OPENAI_KEY}"),
}
SYSTEM = "You are the support desk of a small web shop. Answer in one sentence."


# -- helpers -----------------------------------------------------------------------------------------


def sdk_module(sdk: str):
    return anthropic if sdk == "anthropic" else openai


def client(sdk: str, url: str, *, use_async: bool = False, max_retries: int = 0):
    """A fresh SDK client (fresh per call for async: each call runs in its own event loop)."""
    if sdk == "anthropic":
        cls = anthropic.AsyncAnthropic if use_async else anthropic.Anthropic
        return cls(base_url=url, api_key=ANTHROPIC_KEY, max_retries=max_retries)
    cls = openai.AsyncOpenAI if use_async else openai.OpenAI
    return cls(base_url=url + "/v1", api_key=OPENAI_KEY, max_retries=max_retries)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def unique_question() -> list[dict[str, str]]:
    return ask(f"What are your delivery times? ({uuid.uuid4().hex[:8]})")


def storage_key(session: CacheSession, sdk: str, model: str, messages, *, stream: bool = False) -> str:
    variant = "stream" if stream else "json"
    return f"{session.settings.namespace}:{WIRE[sdk]}:{variant}:{cache_key(model, messages)}"


def stored_keys(session: CacheSession) -> list[str]:
    return session.store.keys(f"{session.settings.namespace}:")


def raw_post(url: str, path: str, *, headers=None, **kwargs) -> httpx2.Response:
    """One POST through a plain httpx2 client (routed through the cache by the patch)."""
    with httpx2.Client() as http:
        return http.post(url + path, headers=headers, **kwargs)


def error_of(sdk: str, excinfo) -> dict:
    """The whole JSON error body the SDK received."""
    return json.loads(excinfo.value.response.text)


def error_message(sdk: str, body: dict) -> str:
    return body["error"]["message"]


def assert_provider_error_shape(sdk: str, body: dict, error_type: str | None = None) -> None:
    if sdk == "anthropic":
        assert body["type"] == "error"
        assert set(body["error"]) >= {"type", "message"}
        if error_type:
            assert body["error"]["type"] == error_type
    else:
        assert set(body) == {"error"}
        assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)
        if error_type:
            assert body["error"]["type"] == error_type


@pytest.fixture
def memory_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


# -- 1. the key --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", SDKS)
def test_key_header_is_sha256_of_model_and_messages(provider, memory_session, sdk):
    """x-metrion-cache-key is sha256 of canonical {"model","messages"} JSON, non-ASCII text included."""
    messages = ask("Combien de temps dure la livraison ? 配送 ✓ Grüße")
    answer = call(sdk, provider.url, messages=messages)
    canonical = json.dumps(
        {"model": MODEL[sdk], "messages": messages}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert answer.headers["x-metrion-cache-key"] == expected == metrion_fixture.cache_key(MODEL[sdk], messages)
    assert memory_session.calls[-1].key == expected
    assert stored_keys(memory_session) == [f"{memory_session.settings.namespace}:{WIRE[sdk]}:json:{expected}"]


@pytest.mark.parametrize("sdk", SDKS)
def test_parameters_other_than_model_and_messages_do_not_change_the_key(provider, memory_session, sdk):
    """max_tokens, temperature, stream and other parameters leave the key unchanged (and hit)."""
    extra = {"max_tokens": 3, "temperature": 0.9, "top_p": 0.1, "metadata": {"user_id": "u-1"}, "seed": 42}
    first = call(sdk, provider.url, extra_body=extra)
    second = call(sdk, provider.url)
    streamed = call(sdk, provider.url, stream=True, extra_body={"temperature": 0.0})

    expected = cache_key(MODEL[sdk], QUESTION)
    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert second.text == first.text
    assert first.headers["x-metrion-cache-key"] == second.headers["x-metrion-cache-key"] == expected
    # Streaming is the same key too: the stored answer is replayed as a stream (issue 4: one key, two shapes).
    assert streamed.cache == "HIT" and streamed.headers["x-metrion-cache-key"] == expected
    assert streamed.text == first.text
    # The parameters did reach the provider.
    assert provider.calls[0].json["temperature"] == 0.9 and provider.calls[0].json["max_tokens"] == 3
    assert provider.call_count == 1


@pytest.mark.parametrize("sdk", SDKS)
def test_changing_model_or_a_message_is_a_miss(provider, memory_session, sdk):
    """A different model or a different message is another key: a miss that reaches the provider."""
    base = call(sdk, provider.url)
    other_model = call(sdk, provider.url, model=MODEL[sdk] + "-2")
    other_message = call(sdk, provider.url, messages=ask("What are your delivery times? "))
    more_messages = call(
        sdk, provider.url, messages=[*QUESTION, {"role": "assistant", "content": "Soon."}, *ask("How soon?")]
    )
    answers = [base, other_model, other_message, more_messages]
    assert [a.cache for a in answers] == ["MISS"] * 4
    assert len({a.headers["x-metrion-cache-key"] for a in answers}) == 4
    assert other_model.headers["x-metrion-cache-key"] == cache_key(MODEL[sdk] + "-2", QUESTION)
    assert provider.call_count == 4
    assert call(sdk, provider.url).cache == "HIT"


def test_anthropic_system_prompt_is_part_of_the_key(provider, memory_session):
    """Anthropic's top-level system changes the key, as a leading {"role":"system"} message would."""
    plain = call("anthropic", provider.url)
    with_system = call("anthropic", provider.url, system=SYSTEM)
    other_system = call("anthropic", provider.url, system=SYSTEM + " Be polite.")

    assert [plain.cache, with_system.cache, other_system.cache] == ["MISS", "MISS", "MISS"]
    assert with_system.headers["x-metrion-cache-key"] == cache_key(
        "claude-test", [{"role": "system", "content": SYSTEM}, *QUESTION]
    )
    assert plain.headers["x-metrion-cache-key"] == cache_key("claude-test", QUESTION)
    assert other_system.headers["x-metrion-cache-key"] != with_system.headers["x-metrion-cache-key"]
    assert call("anthropic", provider.url, system=SYSTEM).cache == "HIT"
    assert provider.call_count == 3


def test_openai_system_message_keys_like_anthropic_system(provider, memory_session):
    """An OpenAI system message in messages gives the same key as Anthropic's system parameter."""
    model = "shared-model"
    oa = call("openai", provider.url, model=model, messages=[{"role": "system", "content": SYSTEM}, *QUESTION])
    an = call("anthropic", provider.url, model=model, system=SYSTEM)
    expected = cache_key(model, [{"role": "system", "content": SYSTEM}, *QUESTION])
    assert oa.headers["x-metrion-cache-key"] == an.headers["x-metrion-cache-key"] == expected


# -- 2. separation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("first_sdk", SDKS)
def test_same_prompt_through_both_sdks_is_two_entries(provider, memory_session, first_sdk):
    """The same model+messages in the Anthropic and the OpenAI format are separate entries."""
    second_sdk = "openai" if first_sdk == "anthropic" else "anthropic"
    model = "shared-model"
    first = call(first_sdk, provider.url, model=model)
    second = call(second_sdk, provider.url, model=model)

    assert (first.cache, second.cache) == ("MISS", "MISS")
    assert first.headers["x-metrion-cache-key"] == second.headers["x-metrion-cache-key"]
    assert provider.call_count == 2
    assert sorted(stored_keys(memory_session)) == sorted(
        storage_key(memory_session, sdk, model, QUESTION) for sdk in SDKS
    )
    assert call(first_sdk, provider.url, model=model).cache == "HIT"
    assert call(second_sdk, provider.url, model=model).cache == "HIT"
    assert provider.call_count == 2


def test_namespaces_in_one_store_are_separate(provider, memory_url, namespace):
    """Two namespaces on the same store neither see nor clear each other's entries."""
    with metrion_fixture.cache(memory_url, namespace=namespace + "-a") as a:
        assert call("anthropic", provider.url).cache == "MISS"
    with metrion_fixture.cache(memory_url, namespace=namespace + "-b") as b:
        assert call("anthropic", provider.url).cache == "MISS"
        assert call("anthropic", provider.url).cache == "HIT"
    assert provider.call_count == 2
    assert b.clear() == 1
    with metrion_fixture.cache(memory_url, namespace=namespace + "-a"):
        assert call("anthropic", provider.url).cache == "HIT"
    assert a.store is b.store and len(a.store.keys(namespace + "-a:")) == 1 and b.store.keys(namespace + "-b:") == []


@pytest.mark.parametrize("first_stream", [False, True], ids=["json-first", "stream-first"])
@pytest.mark.parametrize("sdk", SDKS)
def test_stream_and_json_answer_each_other(provider, memory_session, sdk, first_stream):
    """A streamed and a non-streamed request share the key and the entry: the other mode is a converted hit."""
    a = call(sdk, provider.url, stream=first_stream)
    b = call(sdk, provider.url, stream=not first_stream)
    c = call(sdk, provider.url, stream=first_stream)
    d = call(sdk, provider.url, stream=not first_stream)

    assert [a.cache, b.cache, c.cache, d.cache] == ["MISS", "HIT", "HIT", "HIT"]
    assert a.text == b.text == c.text == d.text
    assert provider.call_count == 1
    assert [r.stream for r in memory_session.calls] == [first_stream, not first_stream] * 2
    assert stored_keys(memory_session) == [storage_key(memory_session, sdk, MODEL[sdk], QUESTION, stream=first_stream)]


# -- 3. the x-metrion-cache request header -----------------------------------------------------------


@pytest.mark.parametrize("sdk", SDKS)
def test_header_true_hits_after_a_miss(provider, memory_url, namespace, sdk):
    """x-metrion-cache: true caches even when the session default would not (mode off)."""
    with metrion_fixture.cache(memory_url, namespace=namespace, mode="off"):
        first = call(sdk, provider.url, extra_headers={"x-metrion-cache": "true"})
        second = call(sdk, provider.url, extra_headers={"x-metrion-cache": "TRUE"})
    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert provider.call_count == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", SDKS)
def test_header_refresh_calls_the_provider_and_replaces_the_entry(provider, memory_session, sdk, stream):
    """x-metrion-cache: refresh skips the lookup, calls the provider and stores the new answer."""
    original = call(sdk, provider.url, stream=stream)
    refreshed = call(sdk, provider.url, stream=stream, extra_headers={"x-metrion-cache": " refresh "})
    after = call(sdk, provider.url, stream=stream)

    assert (original.cache, refreshed.cache, after.cache) == ("MISS", "REFRESH", "HIT")
    assert provider.call_count == 2
    assert memory_session.stats.refreshes == 1 and memory_session.stats.stored == 2
    # The hit replays the refreshed answer, not the original one.
    assert refreshed.headers[REQUEST_ID[sdk]] != original.headers[REQUEST_ID[sdk]]
    assert after.headers[REQUEST_ID[sdk]] == refreshed.headers[REQUEST_ID[sdk]]
    assert "age" not in refreshed.headers


@pytest.mark.parametrize("sdk", SDKS)
def test_header_false_bypasses_and_stores_nothing(provider, memory_session, sdk):
    """x-metrion-cache: false goes to the provider every time and stores nothing, even over an entry."""
    answers = [call(sdk, provider.url, extra_headers={"x-metrion-cache": "False"}) for _ in range(2)]
    assert [a.cache for a in answers] == ["BYPASS", "BYPASS"]
    assert provider.call_count == 2
    assert memory_session.stats.stored == 0 and stored_keys(memory_session) == []
    assert memory_session.stats.bypassed == 2
    call(sdk, provider.url)  # now store one
    assert call(sdk, provider.url, extra_headers={"x-metrion-cache": "false"}).cache == "BYPASS"
    assert provider.call_count == 4


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("value", ["yes", "1", "", "off"])
@pytest.mark.parametrize("sdk", SDKS)
def test_invalid_header_value_is_a_400_never_sent_upstream(provider, memory_session, sdk, value, use_async):
    """An invalid x-metrion-cache value is answered with a 400 in the provider's shape; no upstream call, no retry."""
    errors = sdk_module(sdk)
    with pytest.raises(errors.BadRequestError) as excinfo:
        call(
            sdk,
            provider.url,
            use_async=use_async,
            client=client(sdk, provider.url, use_async=use_async, max_retries=2),
            extra_headers={"x-metrion-cache": value},
        )
    response = excinfo.value.response
    body = error_of(sdk, excinfo)
    assert excinfo.value.status_code == 400
    assert response.headers["x-metrion-cache"] == "ERROR"
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["x-metrion-cache-key"] == cache_key(MODEL[sdk], QUESTION)
    assert_provider_error_shape(sdk, body, "invalid_request_error")
    assert error_message(sdk, body).startswith("metrion cache:")
    assert "x-metrion-cache" in error_message(sdk, body)
    assert provider.call_count == 0
    assert [r.status for r in memory_session.calls] == ["ERROR"]
    assert memory_session.calls[0].http_status == 400 and memory_session.stats.errors == 1


# -- 4. TTL --------------------------------------------------------------------------------------------


def test_ttl_default_max_age_cap_and_zero_on_every_store(provider, session):
    """Default TTL 7 days; max-age=N sets it; capped at 365 days; max-age=0 stores nothing; malformed is a 400."""
    cases = {
        "default": (None, DEFAULT_TTL_SECONDS),
        "sixty": ("max-age=60", 60),
        "huge": ("max-age=99999999999", MAX_TTL_SECONDS),
        "with-other-directives": ("no-cache, max-age=3600", 3600),
    }
    for name, (cache_control, expected) in cases.items():
        messages = ask(f"What are your delivery times? ({name})")
        headers = {"Cache-Control": cache_control} if cache_control else None
        assert call("anthropic", provider.url, messages=messages, extra_headers=headers).cache == "MISS"
        key = storage_key(session, "anthropic", "claude-test", messages)
        ttl = session.store.ttl(key)
        assert ttl is not None and expected - 30 <= ttl <= expected, (name, ttl)
        assert Entry.decode(session.store.get(key)).ttl == expected

    before = provider.call_count
    zero = ask("What are your delivery times? (zero)")
    for _ in range(2):
        answer = call("anthropic", provider.url, messages=zero, extra_headers={"Cache-Control": "max-age=0"})
        assert answer.cache == "MISS" and "delivery" in answer.text
    assert provider.call_count == before + 2
    assert session.store.get(storage_key(session, "anthropic", "claude-test", zero)) is None

    for bad in ("max-age=abc", "max-age=-1"):
        with pytest.raises(anthropic.BadRequestError) as excinfo:
            call("anthropic", provider.url, messages=zero, extra_headers={"Cache-Control": bad})
        assert excinfo.value.response.headers["x-metrion-cache"] == "ERROR"
        assert excinfo.value.response.headers["x-should-retry"] == "false"
        assert error_message("anthropic", error_of("anthropic", excinfo)).startswith(
            "metrion cache: invalid Cache-Control"
        )
    assert provider.call_count == before + 2
    assert len(stored_keys(session)) == len(cases)


@pytest.mark.parametrize("sdk", SDKS)
def test_malformed_max_age_is_a_400_in_the_provider_shape(provider, memory_session, sdk):
    """A malformed max-age gives the SDK's BadRequestError and never reaches the provider, for both formats."""
    with pytest.raises(sdk_module(sdk).BadRequestError) as excinfo:
        call(
            sdk,
            provider.url,
            client=client(sdk, provider.url, max_retries=2),
            extra_headers={"Cache-Control": "max-age=abc"},
        )
    assert_provider_error_shape(sdk, error_of(sdk, excinfo), "invalid_request_error")
    assert provider.call_count == 0 and memory_session.stats.errors == 1


def test_session_ttl_option_sets_the_store_ttl(provider, memory_url, namespace):
    """The session's ttl option ('90m') is the TTL of stored entries when no max-age is sent."""
    with metrion_fixture.cache(memory_url, namespace=namespace, ttl="90m") as active:
        call("anthropic", provider.url)
        ttl = active.store.ttl(storage_key(active, "anthropic", "claude-test", QUESTION))
    assert 5400 - 30 <= ttl <= 5400


def test_entries_expire_after_their_ttl(provider, memory_session, monkeypatch):
    """On the memory store an entry is a hit within its TTL (age reported) and a miss after it."""
    assert call("anthropic", provider.url).cache == "MISS"
    real_time = time.time

    monkeypatch.setattr(time, "time", lambda: real_time() + 6 * 86400)
    within = call("anthropic", provider.url)
    assert within.cache == "HIT"
    assert 6 * 86400 - 30 <= int(within.headers["age"]) <= 6 * 86400 + 30

    monkeypatch.setattr(time, "time", lambda: real_time() + DEFAULT_TTL_SECONDS + 60)
    assert call("anthropic", provider.url).cache == "MISS"
    assert provider.call_count == 2


def test_short_max_age_expires(provider, memory_session, monkeypatch):
    """An entry stored with max-age=60 is gone 61 seconds later."""
    call("anthropic", provider.url, extra_headers={"Cache-Control": "max-age=60"})
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 61)
    assert call("anthropic", provider.url).cache == "MISS"


# -- 5. header stripping -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", SDKS)
def test_cache_headers_are_stripped_before_the_provider(provider, memory_session, sdk, stream):
    """The provider never sees x-metrion-cache or Cache-Control, but does get the API key."""
    answer = call(
        sdk,
        provider.url,
        stream=stream,
        extra_headers={"x-metrion-cache": "true", "Cache-Control": "max-age=60", "x-custom": "kept"},
    )
    assert answer.cache == "MISS"
    received = provider.calls[-1].headers
    assert "x-metrion-cache" not in received and "cache-control" not in received
    name, value = API_KEY_HEADER[sdk]
    assert received[name] == value
    assert received["x-custom"] == "kept"


def test_cache_headers_stripped_on_bypassed_and_non_llm_requests(provider, memory_session):
    """x-metrion-cache is stripped even from non-LLM requests; both headers from uncacheable LLM requests."""
    headers = {"x-metrion-cache": "true", "Cache-Control": "max-age=60", "x-api-key": ANTHROPIC_KEY}
    raw_post(provider.url, "/v1/messages", content=b"not json", headers=headers)
    received = provider.calls[-1].headers
    assert "x-metrion-cache" not in received and "cache-control" not in received
    assert received["x-api-key"] == ANTHROPIC_KEY

    with httpx2.Client() as http:
        other = http.get(provider.url + "/v1/models", headers=headers)
    received = provider.calls[-1].headers
    assert "x-metrion-cache" not in received and received["x-api-key"] == ANTHROPIC_KEY
    assert "x-metrion-cache" not in other.headers  # untouched, and not recorded
    assert [r.status for r in memory_session.calls] == ["BYPASS"]


# -- 6. session modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("sdk", SDKS)
def test_mode_off_caches_only_requests_with_the_header(provider, memory_url, namespace, sdk):
    """mode='off': requests without the header bypass; with x-metrion-cache: true they are cached."""
    with metrion_fixture.cache(memory_url, namespace=namespace, mode="off") as active:
        plain = [call(sdk, provider.url) for _ in range(2)]
        assert [a.cache for a in plain] == ["BYPASS", "BYPASS"]
        assert provider.call_count == 2 and stored_keys(active) == []
        opted = [call(sdk, provider.url, extra_headers={"x-metrion-cache": "true"}) for _ in range(2)]
        assert [a.cache for a in opted] == ["MISS", "HIT"]
        assert call(sdk, provider.url).cache == "BYPASS"  # an entry exists, but off does not read it
    assert provider.call_count == 4


@pytest.mark.parametrize("sdk", SDKS)
def test_mode_refresh_always_calls_the_provider_and_stores(provider, memory_url, namespace, sdk):
    """mode='refresh': every request goes to the provider and replaces the entry."""
    with metrion_fixture.cache(memory_url, namespace=namespace, mode="refresh") as active:
        answers = [call(sdk, provider.url) for _ in range(2)]
        assert [a.cache for a in answers] == ["REFRESH", "REFRESH"]
        reader = call(sdk, provider.url, extra_headers={"x-metrion-cache": "true"})
    assert reader.cache == "HIT"
    assert reader.headers[REQUEST_ID[sdk]] == answers[1].headers[REQUEST_ID[sdk]]
    assert provider.call_count == 2
    assert (active.stats.refreshes, active.stats.stored, active.stats.hits) == (2, 2, 1)


@pytest.fixture
def recorded(provider, store_url, namespace):
    """Each store with the default question recorded for both SDKs, streamed and not."""
    with metrion_fixture.cache(store_url, namespace=namespace):
        for sdk in SDKS:
            for stream in (False, True):
                # refresh stores the stream itself instead of answering it from the stored JSON
                headers = {"x-metrion-cache": "refresh"} if stream else None
                assert call(sdk, provider.url, stream=stream, extra_headers=headers).cache in ("MISS", "REFRESH")
    provider.reset()
    return store_url, namespace


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("sdk", SDKS)
def test_replay_serves_hits_without_the_provider(provider, recorded, sdk, use_async, stream):
    """mode='replay': recorded answers are served, streamed ones with the same text."""
    url, namespace = recorded
    with metrion_fixture.cache(url, namespace=namespace, mode="replay") as active:
        answer = call(sdk, provider.url, stream=stream, use_async=use_async)
    assert answer.cache == "HIT" and "delivery" in answer.text
    assert provider.call_count == 0 and active.stats.hits == 1


@pytest.mark.parametrize("header", [None, "true", "refresh", "TRUE"])
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("sdk", SDKS)
def test_replay_miss_is_a_400_naming_model_and_key(provider, recorded, sdk, use_async, header):
    """mode='replay': a miss is a 400 in the provider's shape naming model and key; never the provider, no retry.

    A 400 is the caller's bad request to every SDK: not a timeout or an outage (which a 504 looked like).
    """
    url, namespace = recorded
    messages = unique_question()
    extra_headers = {"x-metrion-cache": header} if header else None
    replay = metrion_fixture.cache(url, namespace=namespace, mode="replay")
    with replay as active, pytest.raises(sdk_module(sdk).APIStatusError) as excinfo:
        call(
            sdk,
            provider.url,
            use_async=use_async,
            messages=messages,
            extra_headers=extra_headers,
            client=client(sdk, provider.url, use_async=use_async, max_retries=2),
        )
    key = cache_key(MODEL[sdk], messages)
    body = error_of(sdk, excinfo)
    message = error_message(sdk, body)
    assert excinfo.value.status_code == 400
    assert isinstance(excinfo.value, sdk_module(sdk).BadRequestError)
    assert_provider_error_shape(sdk, body)
    assert message.startswith("metrion cache:")
    assert repr(MODEL[sdk]) in message and key in message and "replay" in message
    headers = excinfo.value.response.headers
    assert headers["x-should-retry"] == "false" and headers["x-metrion-cache"] == "ERROR"
    assert headers["x-metrion-cache-key"] == key
    assert provider.call_count == 0
    assert [r.status for r in active.calls] == ["ERROR"] and active.calls[0].http_status == 400
    assert active.stats.stored == 0 and len(active.store.keys(namespace + ":")) == 4


@pytest.mark.parametrize("sdk", SDKS)
def test_replay_with_refresh_header_is_still_read_only(provider, recorded, sdk):
    """In replay, a refresh header does not call the provider or rewrite the entry: the recording is served."""
    url, namespace = recorded
    with metrion_fixture.cache(url, namespace=namespace, mode="replay") as active:
        answer = call(sdk, provider.url, extra_headers={"x-metrion-cache": "refresh"})
    assert answer.cache == "HIT" and provider.call_count == 0 and active.stats.stored == 0


@pytest.mark.parametrize("sdk", SDKS)
def test_replay_with_false_header_goes_to_the_provider(provider, recorded, sdk):
    """In replay, x-metrion-cache: false is an explicit bypass to the provider, and stores nothing."""
    url, namespace = recorded
    with metrion_fixture.cache(url, namespace=namespace, mode="replay") as active:
        answer = call(sdk, provider.url, messages=unique_question(), extra_headers={"x-metrion-cache": "false"})
    assert answer.cache == "BYPASS" and provider.call_count == 1 and active.stats.stored == 0


# -- 7. response headers -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", SDKS)
def test_response_headers_on_miss_and_hit(provider, memory_session, sdk, stream):
    """Tags and key on both; age only on hits; request id, rate limit and content type replayed; set-cookie not."""
    miss = call(sdk, provider.url, stream=stream)
    hit = call(sdk, provider.url, stream=stream)
    key = cache_key(MODEL[sdk], QUESTION)

    assert miss.headers["x-metrion-cache"] == "MISS" and hit.headers["x-metrion-cache"] == "HIT"
    assert miss.headers["x-metrion-cache-key"] == hit.headers["x-metrion-cache-key"] == key
    assert "age" not in miss.headers and int(hit.headers["age"]) >= 0
    for name in (REQUEST_ID[sdk], RATE_LIMIT[sdk], "content-type"):
        assert hit.headers[name] == miss.headers[name], name
    expected_type = "text/event-stream" if stream else "application/json"
    assert hit.headers["content-type"].startswith(expected_type)
    assert "set-cookie" in miss.headers and "set-cookie" not in hit.headers

    entry = Entry.decode(
        memory_session.store.get(storage_key(memory_session, sdk, MODEL[sdk], QUESTION, stream=stream))
    )
    names = {name.lower() for name, _ in entry.headers}
    assert not names & {
        "set-cookie",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "x-metrion-cache",
        "x-metrion-cache-key",
        "age",
    }
    assert REQUEST_ID[sdk] in names


@pytest.mark.parametrize("sdk", SDKS)
def test_hit_content_length_matches_its_own_body(provider, memory_session, sdk):
    """The original content-length is not replayed: a hit's content-length is that of the body it carries."""
    body = {"model": MODEL[sdk], "messages": QUESTION, "max_tokens": 50}
    miss = raw_post(provider.url, PATH[sdk], json=body, headers={"x-simulate": "gzip"})
    hit = raw_post(provider.url, PATH[sdk], json=body, headers={"x-simulate": "gzip"})
    assert (miss.headers["x-metrion-cache"], hit.headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert hit.json() == miss.json()
    for response in (miss, hit):
        assert response.headers.get_list("content-length") == [str(len(response.content))]
        assert "content-encoding" not in response.headers


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", SDKS)
def test_gzip_answers_decode_the_same_on_miss_and_hit(provider, memory_session, sdk, stream):
    """A gzip-encoded provider answer gives the same text on miss and hit; the hit is not marked gzip."""
    miss = call(sdk, provider.url, stream=stream, extra_headers={"x-simulate": "gzip"})
    hit = call(sdk, provider.url, stream=stream, extra_headers={"x-simulate": "gzip"})
    assert (miss.cache, hit.cache) == ("MISS", "HIT")
    assert "delivery" in miss.text and hit.text == miss.text
    assert "content-encoding" not in hit.headers
    assert provider.calls[-1].headers.get("accept-encoding")  # the SDK did ask for compression


# -- 8. never stored -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status", [500, 429])
@pytest.mark.parametrize("sdk", SDKS)
def test_error_answers_are_never_stored(provider, memory_session, sdk, status, stream):
    """A non-2xx answer reaches the SDK as its error, is not stored, and the next request goes upstream."""
    with pytest.raises(sdk_module(sdk).APIStatusError) as excinfo:
        call(sdk, provider.url, stream=stream, extra_headers={"x-simulate": f"status-{status}"})
    assert excinfo.value.status_code == status
    assert excinfo.value.response.headers["x-metrion-cache"] == "MISS"
    assert memory_session.stats.stored == 0 and stored_keys(memory_session) == []

    again = call(sdk, provider.url, stream=stream)
    assert again.cache == "MISS" and provider.call_count == 2
    assert call(sdk, provider.url, stream=stream).cache == "HIT"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", SDKS)
def test_answers_over_the_size_cap_are_passed_on_but_not_stored(provider, memory_url, namespace, sdk, stream):
    """With max_entry_bytes=300 a normal (~550 byte) answer still reaches the caller whole but is never stored."""
    with metrion_fixture.cache(memory_url, namespace=namespace, max_entry_bytes=300) as active:
        answers = [call(sdk, provider.url, stream=stream) for _ in range(2)]
    assert [a.cache for a in answers] == ["MISS", "MISS"]
    assert "delivery" in answers[0].text and answers[1].text == answers[0].text
    assert provider.call_count == 2 and active.stats.stored == 0 and active.store.keys(namespace + ":") == []


def test_big_answer_stored_under_default_cap_not_under_1_mib(provider, memory_url, namespace):
    """A 2 MiB answer is stored with the default 16 MiB cap and not with a 1 MiB cap."""
    headers = {"x-simulate": "big"}
    with metrion_fixture.cache(memory_url, namespace=namespace + "-default") as default:
        first = call("anthropic", provider.url, extra_headers=headers)
        second = call("anthropic", provider.url, extra_headers=headers)
    assert (first.cache, second.cache) == ("MISS", "HIT") and len(first.text) > 2_000_000
    assert second.text == first.text and default.stats.stored == 1

    with metrion_fixture.cache(memory_url, namespace=namespace + "-small", max_entry_bytes=1024 * 1024) as small:
        answers = [call("anthropic", provider.url, extra_headers=headers) for _ in range(2)]
    assert [a.cache for a in answers] == ["MISS", "MISS"] and answers[0].text == first.text
    assert small.stats.stored == 0 and provider.call_count == 3


UNCACHEABLE_BODIES = {
    "not-json": b"this is not json {",
    "json-array": b'[{"model": "m"}]',
    "no-model": json.dumps({"messages": QUESTION, "max_tokens": 5}).encode(),
    "no-messages": json.dumps({"model": "claude-test", "max_tokens": 5}).encode(),
    "messages-string": json.dumps({"model": "claude-test", "messages": "hello"}).encode(),
    "messages-object": json.dumps({"model": "claude-test", "messages": {"role": "user"}}).encode(),
    "model-number": json.dumps({"model": 4, "messages": QUESTION}).encode(),
    "model-empty": json.dumps({"model": "", "messages": QUESTION}).encode(),
    "empty": b"",
}


@pytest.mark.parametrize("sdk", SDKS)
@pytest.mark.parametrize("name", UNCACHEABLE_BODIES)
def test_requests_without_model_and_messages_are_passed_through(provider, memory_session, sdk, name):
    """Non-JSON bodies and bodies without a string model and a messages list are BYPASS, untouched, never stored."""
    body = UNCACHEABLE_BODIES[name]
    headers = {"content-type": "application/json", "x-api-key": ANTHROPIC_KEY}
    responses = [raw_post(provider.url, PATH[sdk], content=body, headers=headers) for _ in range(2)]
    assert [r.headers["x-metrion-cache"] for r in responses] == ["BYPASS", "BYPASS"]
    assert all("x-metrion-cache-key" not in r.headers for r in responses)
    assert provider.call_count == 2
    assert [c.body for c in provider.calls] == [body, body]
    assert memory_session.stats.stored == 0 and stored_keys(memory_session) == []
    assert [r.status for r in memory_session.calls] == ["BYPASS", "BYPASS"]


# -- 9. secrets ----------------------------------------------------------------------------------------


def test_no_secret_reaches_the_store(provider, session):
    """API keys, bearer tokens, x-goog-api-key and ?key= never appear in any stored value, on every store."""
    secrets = [ANTHROPIC_KEY, OPENAI_KEY, "SECRETQUERY", "SECRETGOOG", "SECRETBEARER"]
    for round_ in range(2):
        for sdk in SDKS:
            for stream in (False, True):
                # refresh at first: store the stream too, rather than answer it from the stored JSON
                refresh = stream and round_ == 0
                call(
                    sdk, provider.url, stream=stream, extra_headers={"x-metrion-cache": "refresh"} if refresh else None
                )
        response = raw_post(
            provider.url,
            "/v1/messages",
            params={"key": "SECRETQUERY"},
            json={"model": "gemini-ish", "messages": QUESTION, "max_tokens": 20},
            headers={"x-goog-api-key": "SECRETGOOG", "Authorization": "Bearer SECRETBEARER"},
        )
        assert response.status_code == 200
    assert response.headers["x-metrion-cache"] == "HIT"
    assert provider.calls[-1].query == "key=SECRETQUERY"  # the secrets did go to the provider

    keys = stored_keys(session)
    assert len(keys) == 5
    for key in keys:
        value = session.store.get(key)
        assert value
        for secret in secrets:
            assert secret.encode() not in value, (key, secret)
            assert secret not in key


# -- 10. configuration errors ------------------------------------------------------------------------


BAD_OPTIONS = {
    "mode-unknown": {"mode": "always"},
    "mode-false": {"mode": "false"},
    "ttl-zero": {"ttl": 0},
    "ttl-negative": {"ttl": -1},
    "ttl-text": {"ttl": "abc"},
    "namespace-colon": {"namespace": "a:b"},
    "namespace-empty": {"namespace": ""},
    "max-entry-bytes": {"max_entry_bytes": 0},
}
BAD_URLS = ["ftp://x", "http://localhost:6379", "sqlite://", "not a url"]


def _assert_not_installed() -> None:
    assert patching.installed() is False
    assert active_session() is None


@pytest.mark.parametrize("options", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_raise_at_once_everywhere(options, memory_url):
    """A bad option raises MetrionCacheError (a ValueError) from CacheSession, cache() and enable()."""
    _assert_not_installed()
    with pytest.raises(MetrionCacheError):
        CacheSession(memory_url, **options)
    with pytest.raises(ValueError), metrion_fixture.cache(memory_url, **options):
        pytest.fail("the block must not run")
    _assert_not_installed()
    with pytest.raises(MetrionCacheError):
        metrion_fixture.enable(memory_url, **options)
    _assert_not_installed()


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_store_url_raises_at_once(url, provider):
    """An unsupported store URL raises MetrionCacheError from cache() and enable(), leaving nothing installed."""
    with pytest.raises(MetrionCacheError, match="URL"), metrion_fixture.cache(url):
        pytest.fail("the block must not run")
    _assert_not_installed()
    with pytest.raises(MetrionCacheError):
        metrion_fixture.enable(url)
    _assert_not_installed()
    # Nothing is cached afterwards: the SDK talks to the provider directly.
    assert call("anthropic", provider.url).cache is None


def test_bad_enable_keeps_the_previous_session(memory_url, provider):
    """enable() with bad options does not replace or remove the session already enabled."""
    good = metrion_fixture.enable(memory_url)
    try:
        with pytest.raises(MetrionCacheError):
            metrion_fixture.enable(memory_url, mode="nope")
        assert active_session() is good and patching.installed()
        assert call("anthropic", provider.url).cache == "MISS"
    finally:
        metrion_fixture.disable()
    _assert_not_installed()


# -- 11. bounded records -----------------------------------------------------------------------------


def test_session_calls_are_bounded_but_stats_count_everything(provider, memory_url, namespace):
    """With max_records=3, five requests leave the last three records and stats for all five."""
    bounded = CacheSession(memory_url, namespace=namespace, max_records=3)
    with metrion_fixture.cache(session=bounded) as active:
        assert active is bounded
        statuses = [call("anthropic", provider.url, model=f"m{i % 2}").cache for i in range(5)]
    assert statuses == ["MISS", "MISS", "HIT", "HIT", "HIT"]
    assert len(bounded.calls) == 3 and [r.status for r in bounded.calls] == ["HIT", "HIT", "HIT"]
    assert [r.model for r in bounded.calls] == ["m0", "m1", "m0"]
    assert (bounded.stats.misses, bounded.stats.hits, bounded.stats.requests) == (2, 3, 5)
