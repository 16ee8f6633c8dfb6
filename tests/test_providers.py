"""Gemini, Mistral and OpenAI Responses through their real SDKs: keyed, stored and replayed like the rest."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest
from provider_sdk_calls import GEMINI_KEY, PROVIDER_SDKS, QUESTION, call

import metrion_fixture
from metrion_fixture import cache_key
from metrion_fixture.core.entry import Entry
from metrion_fixture.formats import wire_format_for

MODES = [(False, False), (False, True), (True, False), (True, True)]
MODE_IDS = ["sync-json", "async-json", "sync-stream", "async-stream"]


def _all_stored(session) -> bytes:
    store = session.store
    keys = store.keys(f"{session.settings.namespace}:")
    return b"\n".join([key.encode() for key in keys] + [store.get(key) or b"" for key in keys])


@pytest.mark.parametrize("sdk", PROVIDER_SDKS)
@pytest.mark.parametrize(("stream", "use_async"), MODES, ids=MODE_IDS)
def test_second_identical_call_is_served_from_the_cache(provider, memory_session, sdk, stream, use_async):
    """The second identical SDK call is a HIT that gives the SDK the same text and usage, without the provider."""
    first = call(sdk, provider.url, stream=stream, use_async=use_async)
    second = call(sdk, provider.url, stream=stream, use_async=use_async)
    assert [record.status for record in memory_session.calls] == ["MISS", "HIT"]
    assert provider.call_count == 1
    assert second.text == first.text and "delivery" in second.text
    assert second.usage == first.usage and second.usage is not None


def test_the_store_holds_entries_on_every_backend(provider, session):
    """Each new format is stored and replayed on memory, SQLite and Redis alike."""
    for sdk in PROVIDER_SDKS:
        call(sdk, provider.url)
        call(sdk, provider.url)
    assert session.stats.hits == 3 and provider.call_count == 3


def test_gemini_key_is_model_from_the_path_and_contents_with_the_system_instruction_first(provider, memory_session):
    """Gemini: the model comes from the URL path, messages are contents, systemInstruction counts as the first message."""
    call("gemini", provider.url, model="gemini-2.0-flash", system="Answer briefly.")
    sent = provider.calls[-1].json
    assert "model" not in sent
    expected = cache_key(
        "gemini-2.0-flash", [{"role": "system", "content": sent["systemInstruction"]}, *sent["contents"]]
    )
    record = memory_session.calls[-1]
    assert (record.key, record.model, record.wire_format) == (expected, "gemini-2.0-flash", "gemini")
    namespace = memory_session.settings.namespace
    assert memory_session.store.get(f"{namespace}:gemini:json:{expected}") is not None
    call("gemini", provider.url, model="gemini-2.0-flash", system="Answer at length.")
    assert memory_session.calls[-1].status == "MISS", "another system instruction is another request"


def test_gemini_stream_and_json_share_one_key(provider, memory_session):
    """generateContent and streamGenerateContent of the same prompt share the key: one answers the other."""
    first = call("gemini", provider.url, stream=False)
    second = call("gemini", provider.url, stream=True)
    json_call, stream_call = memory_session.calls
    assert json_call.key == stream_call.key and (json_call.stream, stream_call.stream) == (False, True)
    assert stream_call.status == "HIT" and provider.call_count == 1
    assert (second.text, second.usage) == (first.text, first.usage)


def test_gemini_api_key_never_reaches_the_store(provider, memory_session):
    """Neither the x-goog-api-key header nor the ?key= query parameter is stored."""
    call("gemini", provider.url)
    assert provider.calls[-1].headers["x-goog-api-key"] == GEMINI_KEY
    body = {"contents": [{"role": "user", "parts": [{"text": "Another question?"}]}]}
    url = f"{provider.url}/v1beta/models/gemini-2.0-flash:generateContent?key=AIza-query-secret-key"
    with httpx.Client() as client:
        assert client.post(url, json=body).headers["x-metrion-cache"] == "MISS"
        assert client.post(url, json=body).headers["x-metrion-cache"] == "HIT"
    assert provider.calls[-1].query == "key=AIza-query-secret-key"
    stored = _all_stored(memory_session)
    assert stored and GEMINI_KEY.encode() not in stored and b"AIza-query-secret-key" not in stored


def test_gemini_vertex_paths_are_keyed_by_the_model_in_the_path(provider, memory_session):
    """Vertex AI paths (projects/.../publishers/google/models/M) are cached, keyed by M."""
    body = {"contents": [{"role": "user", "parts": [{"text": QUESTION}]}]}
    url = f"{provider.url}/v1beta1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro"
    with httpx.Client() as client:
        first = client.post(url + ":generateContent", json=body)
        second = client.post(url + ":generateContent", json=body)
        streamed = client.post(url + ":streamGenerateContent?alt=sse", json=body)
    assert (first.headers["x-metrion-cache"], second.headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert (
        second.json()["candidates"][0]["content"]["parts"][0]["text"]
        == first.json()["candidates"][0]["content"]["parts"][0]["text"]
    )
    assert first.headers["x-metrion-cache-key"] == cache_key("gemini-2.5-pro", body["contents"])
    assert streamed.headers["x-metrion-cache-key"] == first.headers["x-metrion-cache-key"]


@pytest.mark.parametrize("failure", ["cut-stream", "error-event"])
def test_gemini_broken_streams_are_not_stored(provider, memory_session, failure):
    """A Gemini stream has no terminator: a cut-off body or an error event is never stored."""
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own error type differs per failure
        call("gemini", provider.url, stream=True, headers={"x-simulate": failure})
    assert memory_session.stats.stored == 0
    call("gemini", provider.url, stream=True)
    assert memory_session.calls[-1].status == "MISS"


def test_gemini_paths_are_recognised_and_its_streams_say_when_they_are_complete():
    """Gemini has no end event, but its final state (each candidate's finishReason) says the answer is whole."""
    gemini = wire_format_for("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent")
    assert gemini is not None and gemini.name == "gemini" and gemini.has_stream_terminator is True
    assert wire_format_for("POST", "/v1beta/models/gemini-2.0-flash:countTokens") is None
    assert wire_format_for("GET", "/v1beta/models/gemini-2.0-flash:generateContent") is None


def test_responses_key_puts_instructions_first_and_reads_a_string_input_as_one_user_message(provider, memory_session):
    """OpenAI Responses: messages are input (a string is one user message), instructions first."""
    call("responses", provider.url, instructions="Be brief.")
    expected = cache_key(
        "gpt-5-mini", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    )
    assert memory_session.calls[-1].key == expected
    call("responses", provider.url, instructions="Be brief.", question=[{"role": "user", "content": QUESTION}])
    assert memory_session.calls[-1].status == "HIT", "the same conversation written as a list"


@pytest.mark.parametrize("state", ["previous_response_id", "conversation"])
def test_responses_with_server_side_state_are_never_answered_from_another_conversation(provider, memory_session, state):
    """previous_response_id / conversation enter the key: only the same conversation's entry answers."""
    call("responses", provider.url, **{state: "resp_conversation_a"})
    call("responses", provider.url, **{state: "resp_conversation_b"})
    call("responses", provider.url)
    assert [r.status for r in memory_session.calls] == ["MISS", "MISS", "MISS"]
    assert len({r.key for r in memory_session.calls}) == 3
    call("responses", provider.url, **{state: "resp_conversation_a"})
    assert memory_session.calls[-1].status == "HIT"
    assert provider.call_count == 3


def test_background_responses_are_not_cached(provider, memory_session):
    """A background response is fetched later by polling: the cache lets it through untouched."""
    body = {"model": "gpt-5-mini", "input": QUESTION, "background": True}
    with httpx.Client() as client:
        answer = client.post(f"{provider.url}/v1/responses", json=body)
    assert answer.headers["x-metrion-cache"] == "BYPASS" and memory_session.stats.stored == 0


@pytest.mark.parametrize("failure", ["cut-stream", "error-event", "no-terminator"])
def test_responses_broken_streams_are_not_stored(provider, memory_session, failure):
    """A Responses stream is stored only once response.completed arrived without an error event."""
    try:
        call("responses", provider.url, stream=True, headers={"x-simulate": failure})
    except Exception:  # noqa: BLE001 - the SDK reports some failures, not all
        pass
    assert memory_session.stats.stored == 0


@pytest.mark.parametrize("stored_stream", [False, True], ids=["json-then-stream", "stream-then-json"])
def test_mistral_replays_carry_the_content_type_its_sdk_checks(provider, memory_session, stored_stream):
    """Mistral's SDK refuses an answer of the wrong content-type: hits in either mode carry the right one."""
    first = call("mistral", provider.url, stream=stored_stream)
    namespace, key = memory_session.settings.namespace, memory_session.calls[-1].key
    variant = "stream" if stored_stream else "json"
    stored = Entry.decode(memory_session.store.get(f"{namespace}:openai_chat:{variant}:{key}"))
    expected_type = "text/event-stream" if stored_stream else "application/json"
    assert dict(stored.headers)["content-type"].startswith(expected_type)
    same_mode = call("mistral", provider.url, stream=stored_stream)
    other_mode = call("mistral", provider.url, stream=not stored_stream)
    assert [r.status for r in memory_session.calls] == ["MISS", "HIT", "HIT"] and provider.call_count == 1
    assert first.text == same_mode.text == other_mode.text
    assert first.usage == same_mode.usage == other_mode.usage


def test_a_stored_responses_prompt_template_enters_the_key(provider, memory_session):
    """Two calls that differ only in the stored prompt's variables (or version) are two answers, never one."""
    lisbon = {"id": "pmpt_68e1f5a0b7c48190", "version": "3", "variables": {"city": "Lisbon"}}
    call("responses", provider.url, prompt=lisbon)
    call("responses", provider.url, prompt={**lisbon, "variables": {"city": "Porto"}})
    call("responses", provider.url, prompt={**lisbon, "version": "4"})
    assert [r.status for r in memory_session.calls] == ["MISS", "MISS", "MISS"]
    call("responses", provider.url, prompt=lisbon)
    assert memory_session.calls[-1].status == "HIT" and provider.call_count == 3


def test_replay_refuses_a_request_it_cannot_key_instead_of_sending_it(provider):
    """A background Responses call cannot be answered from the cache: in replay it is refused, naming why."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", mode="replay") as session:
        with pytest.raises(openai.BadRequestError) as raised:
            call("responses", provider.url, background=True)
        assert "background" in str(raised.value) and "x-metrion-cache: false" in str(raised.value)
        assert provider.call_count == 0
        call("responses", provider.url, background=True, headers={"x-metrion-cache": "false"})
        assert provider.call_count == 1 and [r.status for r in session.calls] == ["ERROR", "BYPASS"]
