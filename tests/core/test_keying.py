"""What enters the key, and what replay mode does with a request it cannot key.

Server-side state that changes which answer is right enters the key, as previous_response_id
does: Gemini's cachedContent, the Responses API's stored prompt template (id, version,
variables), Anthropic's code-execution container. In replay mode a request to an LLM endpoint
that the cache cannot key is refused with the reason, never sent (unless it says
``x-metrion-cache: false`` itself).
"""

from __future__ import annotations

import json

import pytest
from corekit import ANTHROPIC, CASES, GEMINI, OPENAI_CHAT, header, make_core, run, upstream

from metrion_fixture.core.engine import REPLAY_REFUSAL_STATUS, Settings, plan_request
from metrion_fixture.core.flow import Answer, Forward, PassThrough, ReadRequest
from metrion_fixture.core.records import BYPASS, ERROR
from metrion_fixture.formats import FORMATS_BY_NAME

RESPONSES = CASES["openai_responses"]
TRUE = Settings(mode="true")


def key_of(case, body: dict, path: str | None = None) -> str:
    plan = plan_request(TRUE, case.format, path or case.json_path, {}, json.dumps(body).encode())
    assert plan.key, "not keyed"
    return plan.key


# -- server-side prompt state enters the key ---------------------------------------------------------------------

TEMPLATE = {"id": "pmpt_68e1f5a0b7c48190", "version": "3", "variables": {"city": "Lisbon"}}


def test_a_responses_call_with_only_a_stored_prompt_template_is_keyed():
    body = {"model": "gpt-5-mini", "prompt": TEMPLATE}
    plan = plan_request(TRUE, RESPONSES.format, RESPONSES.json_path, {}, json.dumps(body).encode())
    assert plan.outcome != BYPASS and plan.read and plan.write_ttl > 0


@pytest.mark.parametrize(
    "changed",
    [
        {"id": "pmpt_other"},
        {"version": "4"},
        {"variables": {"city": "Porto"}},
    ],
    ids=["id", "version", "variables"],
)
def test_the_responses_prompt_template_enters_the_key(changed):
    body = {"model": "gpt-5-mini", "input": "Plan my day.", "prompt": TEMPLATE}
    other = {**body, "prompt": {**TEMPLATE, **changed}}
    without = {"model": "gpt-5-mini", "input": "Plan my day."}
    keys = {key_of(RESPONSES, body), key_of(RESPONSES, other), key_of(RESPONSES, without)}
    assert len(keys) == 3
    assert key_of(RESPONSES, body) == key_of(RESPONSES, json.loads(json.dumps(body)))  # and is stable


def test_gemini_cached_content_enters_the_key():
    body = {"contents": [{"role": "user", "parts": [{"text": "Summarise chapter 2."}]}]}
    cached_a = {**body, "cachedContent": "cachedContents/lisbon-guide-a1b2c3"}
    cached_b = {**body, "cachedContent": "cachedContents/porto-guide-d4e5f6"}
    snake = {**body, "cached_content": "cachedContents/lisbon-guide-a1b2c3"}
    keys = [key_of(GEMINI, b) for b in (body, cached_a, cached_b)]
    assert len(set(keys)) == 3
    assert key_of(GEMINI, snake) == keys[1]  # the SDKs' two spellings are one state


def test_an_anthropic_container_enters_the_key():
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": "ls"}]}
    with_container = {**body, "container": "container_011CPR5CNjB747bTd36fQLFk"}
    assert key_of(ANTHROPIC, body) != key_of(ANTHROPIC, with_container)


# -- replay: a request that cannot be keyed is refused, not sent --------------------------------------------------

UNKEYABLE = [
    (OPENAI_CHAT, b'{"model": "gpt-4o-mini", "prompt": "Say hi"}', "legacy `prompt`"),
    (OPENAI_CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}', "names no model"),
    (ANTHROPIC, b'{"model": "claude-sonnet-4-5", "max_tokens": 5}', "no list of messages"),
    (ANTHROPIC, b"not json", "not JSON"),
    (RESPONSES, b'{"model": "gpt-4.1-mini", "input": "hi", "background": true}', "background"),
    (RESPONSES, b'{"model": "gpt-4.1-mini"}', "no input and no stored prompt template"),
    (GEMINI, b'{"contents": "hi"}', "no list of contents"),
]


@pytest.mark.parametrize(("case", "body", "reason"), UNKEYABLE, ids=[reason for _, _, reason in UNKEYABLE])
def test_in_replay_a_request_that_cannot_be_keyed_is_refused_with_why_and_never_sent(case, body, reason):
    core = make_core(mode="replay")
    result = run(core.exchange("POST", case.json_path, {}), (ReadRequest, body))
    assert isinstance(result.outcome, Answer)  # no Forward step: nothing reached the network
    reply = result.outcome.reply
    assert (reply.status, reply.kind) == (REPLAY_REFUSAL_STATUS, "replay_miss")
    assert header(reply.headers, "x-should-retry") == "false"
    assert reason in reply.message and "replay mode" in reply.message and "x-metrion-cache: false" in reply.message
    assert json.dumps(case.format.error_body(400, reply.message)).encode() == b"".join(reply.chunks)
    assert result.outcome.record.status == ERROR


@pytest.mark.parametrize(("case", "body", "reason"), UNKEYABLE, ids=[reason for _, _, reason in UNKEYABLE])
def test_in_replay_only_an_explicit_false_header_lets_an_unkeyable_request_through(case, body, reason):
    core = make_core(mode="replay")
    flow = core.exchange("POST", case.json_path, {"x-metrion-cache": "false"})
    result = run(flow, (ReadRequest, body), (Forward, upstream(False)))
    assert isinstance(result.outcome, PassThrough) and result.outcome.record.status == BYPASS
    for value in ("true", "refresh"):
        refused = run(
            make_core(mode="replay").exchange("POST", case.json_path, {"x-metrion-cache": value}), (ReadRequest, body)
        )
        assert isinstance(refused.outcome, Answer)


@pytest.mark.parametrize("mode", ["true", "refresh", "off"])
def test_outside_replay_an_unkeyable_request_is_still_passed_through(mode):
    result = run(
        make_core(mode=mode).exchange("POST", OPENAI_CHAT.json_path, {}),
        (ReadRequest, b'{"model": "gpt-4o-mini", "prompt": "Say hi"}'),
        (Forward, upstream(False)),
    )
    assert isinstance(result.outcome, PassThrough)


def test_every_format_says_why_it_cannot_key_a_body():
    for wire_format in FORMATS_BY_NAME.values():
        assert wire_format.unkeyable_reason("/", [1, 2]) == "its body is not a JSON object"
