"""Call records name their source and, with ``store_previews`` on only, the start of the last user message.

Sans-IO: the wire format reads the preview from the request, the core puts the session's source and
the plan's preview into every record. No store, no HTTP.
"""

from __future__ import annotations

import json

import pytest
from corekit import CASES, OPENAI_CHAT, Case, Req, cold, make_core, run, stored, upstream

from metrion_fixture.core.engine import Settings, plan_prompt, plan_request
from metrion_fixture.core.flow import Forward, Lookup, ReadBody, ReadRequest, Release, Write
from metrion_fixture.formats import FORMATS_BY_NAME
from metrion_fixture.formats.base import PREVIEW_CHARS, Prompt
from metrion_fixture.formats.xai_grpc import WIRE_FORMAT as XAI_GRPC

PREVIEWS = Settings(store_previews=True)


def stored_after_miss_steps(case: Case) -> list[tuple[type, object]]:
    return [(Forward, upstream(False)), (ReadBody, case.answer_bytes()), (Write, True), (Release, None)]


LONG = "Summarise   the attached\nquarterly report for the board, in three bullet points, no jargon"

# Realistic multi-turn requests, one per wire format, and the preview each must give.
REQUESTS = [
    (
        "openai_chat",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a support bot."},
                {"role": "user", "content": "Where is my order?"},
                {"role": "assistant", "content": "It left the warehouse today."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "And this invoice,"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                        {"type": "text", "text": "is it paid?"},
                    ],
                },
            ],
        },
        "And this invoice, is it paid?",
    ),
    (
        "anthropic_messages",
        "/v1/messages",
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 256,
            "system": "Use the tools.",
            "messages": [
                {"role": "user", "content": "What is the weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Paris"}}],
                },
                # A tool result has no text of its own: the question it answers is the preview.
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C"}]},
            ],
        },
        "What is the weather in Paris?",
    ),
    (
        "openai_responses",
        "/v1/responses",
        {
            "model": "gpt-4.1-mini",
            "instructions": "Be brief.",
            "input": [
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": LONG}]},
                {"type": "function_call_output", "call_id": "call_1", "output": "{}"},
            ],
        },
        "Summarise the attached quarterly report for the board, in th",
    ),
    (
        "gemini",
        "/v1beta/models/gemini-2.0-flash:generateContent",
        {
            "systemInstruction": {"parts": [{"text": "Answer in French."}]},
            "contents": [{"parts": [{"text": "Hello, who are you?"}]}],  # no role: the user's
        },
        "Hello, who are you?",
    ),
]


@pytest.mark.parametrize(("name", "path", "body", "preview"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_each_format_previews_the_last_user_text(name, path, body, preview):
    plan = plan_request(PREVIEWS, FORMATS_BY_NAME[name], path, {}, json.dumps(body).encode())
    assert plan.preview == preview
    assert len(plan.preview) <= PREVIEW_CHARS


def test_a_responses_input_string_is_its_own_preview():
    assert CASES["openai_responses"].format.preview(Prompt("m", [{"role": "user", "content": "2+2?"}], False)) == "2+2?"


def test_xai_grpc_messages_in_protobuf_json_form_are_previewed():
    messages = [
        {"content": [{"text": "Be brief."}], "role": "ROLE_SYSTEM"},
        {"content": [{"text": "Why is the sky blue?"}], "role": "ROLE_USER"},
    ]
    plan = plan_prompt(PREVIEWS, XAI_GRPC, "grok-3-mini", messages, False)
    assert plan.preview == "Why is the sky blue?"


def test_no_user_text_no_preview():
    assert OPENAI_CHAT.format.preview(Prompt("m", [{"role": "system", "content": "Be brief."}], False)) == ""


@pytest.mark.parametrize(("name", "path", "body", "preview"), REQUESTS[:1], ids=["openai_chat"])
def test_previews_are_off_by_default_since_prompts_may_be_private(name, path, body, preview):
    plan = plan_request(Settings(), FORMATS_BY_NAME[name], path, {}, json.dumps(body).encode())
    assert plan.preview == "" and plan.key


def test_a_record_names_the_cores_source_and_the_plans_preview():
    core = make_core(store_previews=True)
    core.source = "nightly-eval"
    req = Req(OPENAI_CHAT)
    miss = run(req.flow(core), *cold(req), *stored_after_miss_steps(OPENAI_CHAT)).outcome.record
    assert (miss.status, miss.source, miss.preview) == ("MISS", "nightly-eval", "2+2?")
    core.source = "tests/test_bot.py::test_faq"  # what a new test or cell does: no new core
    hit = run(req.flow(core), (ReadRequest, req.body), (Lookup, stored(OPENAI_CHAT, False))).outcome.record
    assert (hit.status, hit.source, hit.preview) == ("HIT", "tests/test_bot.py::test_faq", "2+2?")


def test_without_store_previews_a_record_has_its_source_and_no_preview():
    core = make_core()
    core.source = "batch.py"
    req = Req(OPENAI_CHAT)
    record = run(req.flow(core), *cold(req), *stored_after_miss_steps(OPENAI_CHAT)).outcome.record
    assert (record.source, record.preview) == ("batch.py", "")


def test_a_core_in_another_mode_keeps_its_source():
    core = make_core()
    core.source = "analysis.ipynb cell 3"
    assert core.with_settings(Settings(mode="refresh")).source == "analysis.ipynb cell 3"
