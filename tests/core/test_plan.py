"""Planning, before any I/O: the key, where an entry is stored, what a mode and a header decide, the plan memo."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from corekit import ANTHROPIC, CASES, GEMINI, OPENAI_CHAT, OPENAI_RESPONSES, Case, Req

from metrion_fixture.core.engine import Plan, PlanMemo, Settings, plan_request
from metrion_fixture.core.records import BYPASS, MISS, REFRESH
from metrion_fixture.formats import wire_format_for

each_format = pytest.mark.parametrize("case", CASES.values(), ids=CASES)


def plan(req: Req, settings: Settings | None = None, memo: PlanMemo | None = None) -> Plan:
    query = req.query if req.query is not None else (req.case.stream_query if req.stream else b"")
    wire_format = wire_format_for("POST", req.path)
    return plan_request(settings or Settings(), wire_format, req.path, req.headers, req.body, query, memo)


def sha256_key(model: str, messages: list[Any]) -> str:
    canonical = json.dumps({"model": model, "messages": messages}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- the key ---------------------------------------------------------------------------------------


@each_format
def test_the_key_is_the_sha256_of_model_and_messages_with_the_system_prompt_first(case):
    found = plan(Req(case))
    assert (found.model, found.key) == (case.model, sha256_key(case.model, case.key_messages))


@each_format
@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 999},
        {"temperature": 1.7, "top_p": 0.2, "seed": 7},
        {"stream": False},
        {"metadata": {"user_id": "u1"}},
        {"tools": [{"name": "calc", "description": "adds", "input_schema": {"type": "object"}}]},
        {"generationConfig": {"temperature": 1.0, "maxOutputTokens": 9}},
    ],
    ids=["max_tokens", "sampling", "stream-false", "metadata", "tools", "gemini-config"],
)
def test_the_key_ignores_every_parameter_but_model_and_messages(case, extra):
    assert plan(Req(case, extra=extra)).key == plan(Req(case)).key == case.key


@each_format
def test_a_streamed_and_a_plain_request_share_the_key_but_not_the_storage_key(case):
    plain, streamed = plan(Req(case)), plan(Req(case, True))
    assert (plain.stream, streamed.stream) == (False, True)
    assert plain.key == streamed.key
    assert (plain.storage_key, streamed.storage_key) == (case.storage_key(False), case.storage_key(True))


@pytest.mark.parametrize(
    ("case", "without", "first", "second"),
    [
        (ANTHROPIC, {}, {"system": "Be brief."}, {"system": [{"type": "text", "text": "Be verbose."}]}),
        (
            OPENAI_CHAT,
            {"messages": [{"role": "user", "content": "2+2?"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]},
            {"messages": [{"role": "system", "content": "Be verbose."}, {"role": "user", "content": "2+2?"}]},
        ),
        (OPENAI_RESPONSES, {"instructions": None}, {"instructions": "Be brief."}, {"instructions": "Be verbose."}),
        (GEMINI, {}, {"systemInstruction": {"parts": [{"text": "Be brief."}]}}, {"system_instruction": "Be verbose."}),
    ],
    ids=lambda value: value.name if isinstance(value, Case) else "",
)
def test_a_different_system_prompt_is_a_different_key(case, without, first, second):
    keys = {plan(Req(case, extra=extra)).key for extra in (without, first, second)}
    assert len(keys) == 3


def test_anthropics_system_prompt_keys_as_a_first_system_message():
    found = plan(Req(ANTHROPIC, extra={"system": "Be brief."}))
    messages = [{"role": "system", "content": "Be brief."}, *ANTHROPIC.body["messages"]]
    assert found.key == sha256_key(ANTHROPIC.model, messages)


def test_a_model_or_message_change_is_a_different_key():
    base = plan(Req(OPENAI_CHAT)).key
    assert plan(Req(OPENAI_CHAT, extra={"model": "gpt-4o"})).key != base
    assert plan(Req(OPENAI_CHAT, extra={"messages": [{"role": "user", "content": "2+3?"}]})).key != base


def test_a_responses_string_input_is_one_user_message():
    as_text = plan(Req(OPENAI_RESPONSES, extra={"instructions": None, "input": "2+2?"}))
    as_list = plan(Req(OPENAI_RESPONSES, extra={"instructions": None, "input": [{"role": "user", "content": "2+2?"}]}))
    assert as_text.key == as_list.key


@pytest.mark.parametrize("state", [{"previous_response_id": "resp_0"}, {"conversation": "conv_1"}])
def test_a_responses_request_continuing_server_state_has_its_own_key(state):
    assert plan(Req(OPENAI_RESPONSES, extra=state)).key != plan(Req(OPENAI_RESPONSES)).key


def test_a_responses_background_request_is_never_cached():
    found = plan(Req(OPENAI_RESPONSES, extra={"background": True}))
    assert (found.outcome, found.read, found.write_ttl, found.key) == (BYPASS, False, 0, "")


@pytest.mark.parametrize(
    "path",
    [
        "/v1beta/models/gemini-2.0-flash:generateContent",
        "/v1/projects/p1/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent",
    ],
)
def test_gemini_reads_the_model_from_the_path(path):
    wire_format = wire_format_for("POST", path)
    found = plan_request(Settings(), wire_format, path, {}, json.dumps(GEMINI.body).encode())
    assert (found.model, found.key) == ("gemini-2.0-flash", GEMINI.key)
    other = path.replace("gemini-2.0-flash", "gemini-2.5-pro")
    assert plan_request(Settings(), wire_format, other, {}, json.dumps(GEMINI.body).encode()).key != GEMINI.key


def test_the_storage_key_separates_namespace_wire_format_and_mode():
    body = {"model": "shared-model", "messages": [{"role": "user", "content": "hi"}]}
    anthropic = plan(Req(ANTHROPIC, extra=body))
    chat = plan(Req(OPENAI_CHAT, extra=body))
    assert anthropic.key == chat.key  # the same prompt...
    assert anthropic.storage_key == f"metrion:anthropic_messages:json:{anthropic.key}"  # ...kept apart
    assert chat.storage_key == f"metrion:openai_chat:json:{chat.key}"
    assert plan(Req(ANTHROPIC, extra=body), Settings(namespace="team-b")).storage_key.startswith("team-b:")


# -- what the mode and the header decide --------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "value", "outcome", "read", "read_only", "writes"),
    [
        ("true", None, MISS, True, False, True),
        ("true", "true", MISS, True, False, True),
        ("true", "refresh", REFRESH, False, False, True),
        ("true", "false", BYPASS, False, False, False),
        ("refresh", None, REFRESH, False, False, True),
        ("refresh", "true", MISS, True, False, True),
        ("refresh", "false", BYPASS, False, False, False),
        ("off", None, BYPASS, False, False, False),
        ("off", "true", MISS, True, False, True),
        ("off", "refresh", REFRESH, False, False, True),
        ("replay", None, MISS, True, True, False),
        ("replay", "true", MISS, True, True, False),
        ("replay", "refresh", MISS, True, True, False),
        ("replay", "false", BYPASS, False, False, False),
    ],
)
def test_the_session_mode_and_the_header_decide_reading_writing_and_the_tag(
    mode, value, outcome, read, read_only, writes
):
    found = plan(Req(ANTHROPIC, headers={} if value is None else {"x-metrion-cache": value}), Settings(mode=mode))
    assert (found.outcome, found.read, found.read_only) == (outcome, read, read_only)
    assert found.write_ttl == (Settings().ttl if writes else 0)
    assert found.strip == ("x-metrion-cache", "cache-control")
    assert found.error is None and found.key == ANTHROPIC.key


# -- credential scope ------------------------------------------------------------------------------------


def _credential(name: str, secret: str) -> dict[str, Any]:
    if name == "query":
        return {"query": f"alt=sse&key={secret}".encode()}
    value = f"Bearer {secret}" if name == "authorization" else secret
    return {"headers": {name: value}}


@pytest.mark.parametrize("carrier", ["authorization", "x-api-key", "x-goog-api-key", "query"])
def test_in_credential_scope_the_storage_key_depends_on_the_api_key_and_never_holds_it(carrier):
    scoped = Settings(scope="credential")
    one = plan(Req(GEMINI, True, **_credential(carrier, "sk-one-secret")), scoped)
    two = plan(Req(GEMINI, True, **_credential(carrier, "sk-two-secret")), scoped)
    shared = plan(Req(GEMINI, True, **_credential(carrier, "sk-one-secret")))
    assert one.key == two.key == shared.key == GEMINI.key  # the cache key does not depend on who asks
    assert shared.storage_key == GEMINI.storage_key(True)  # nor, shared, where the answer is
    assert one.storage_key != two.storage_key
    assert one.storage_key.startswith(GEMINI.storage_key(True) + ":cred-")
    assert "secret" not in one.storage_key and "sk-" not in one.storage_key


def test_one_credential_is_one_scope_whichever_header_carries_it():
    scoped = Settings(scope="credential")
    keys = {
        plan(Req(ANTHROPIC, headers={"authorization": "Bearer sk-same"}), scoped).storage_key,
        plan(Req(ANTHROPIC, headers={"x-api-key": "sk-same"}), scoped).storage_key,
    }
    assert len(keys) == 1


# -- the plan memo ------------------------------------------------------------------------------------------


class CountingMemo(PlanMemo):
    def __init__(self, **options: int) -> None:
        super().__init__(**options)
        self.used = 0

    def get(self, key: tuple[Any, ...]) -> Plan | None:
        self.used += 1
        return super().get(key)

    def put(self, key: tuple[Any, ...], plan: Plan) -> None:
        self.used += 1
        super().put(key, plan)


@each_format
def test_the_plan_memo_returns_the_same_plan_for_the_same_request(case):
    memo = PlanMemo()
    first = plan(Req(case, True), memo=memo)
    assert plan(Req(case, True), memo=memo) is first
    assert first == plan(Req(case, True))  # and it is the plan the request would get anyway


@pytest.mark.parametrize(
    "changed",
    [
        Req(GEMINI, headers={"x-metrion-cache": "refresh"}),
        Req(GEMINI, headers={"x-metrion-cache": "nope"}),
        Req(GEMINI, headers={"cache-control": "max-age=60"}),
        Req(GEMINI, extra={"contents": [{"role": "user", "parts": [{"text": "2+3?"}]}]}),
        Req(GEMINI, stream=True),
        Req(GEMINI, query=b"alt=json"),
    ],
    ids=["mode-header", "bad-mode-header", "max-age", "body", "path", "query"],
)
def test_the_plan_memo_never_answers_a_different_request(changed):
    memo = PlanMemo()
    base = plan(Req(GEMINI), memo=memo)
    found = plan(changed, memo=memo)
    assert found is not base
    assert found == plan(changed)


def test_the_plan_memo_never_answers_other_settings():
    memo = PlanMemo()
    plan(Req(ANTHROPIC), Settings(), memo)
    assert plan(Req(ANTHROPIC), Settings(mode="replay"), memo).read_only
    assert plan(Req(ANTHROPIC), Settings(namespace="other"), memo).storage_key.startswith("other:")


def test_the_plan_memo_is_never_used_in_credential_scope():
    memo = CountingMemo()
    scoped = Settings(scope="credential")
    one = plan(Req(ANTHROPIC, headers={"x-api-key": "sk-one"}), scoped, memo)
    two = plan(Req(ANTHROPIC, headers={"x-api-key": "sk-two"}), scoped, memo)
    assert one.storage_key != two.storage_key  # a remembered plan would hand one key's scope to the other
    assert memo.used == 0


def test_the_plan_memo_skips_large_bodies_and_forgets_the_oldest_plan():
    big = CountingMemo(max_body=10)
    plan(Req(ANTHROPIC), memo=big)
    assert big.used == 0
    small = PlanMemo(max_plans=2)
    first = plan(Req(ANTHROPIC), memo=small)
    plan(Req(OPENAI_CHAT), memo=small)
    plan(Req(GEMINI), memo=small)
    assert plan(Req(ANTHROPIC), memo=small) is not first
