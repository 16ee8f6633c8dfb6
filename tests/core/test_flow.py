"""The cache's rules, one test each, on the sans-IO core alone (``CacheCore.exchange`` / ``serve``).

Every test drives the flow by hand (see ``corekit.run``): each step the core yields is checked and
answered with made-up store and provider answers, on a fixed clock. No store, no HTTP, no session.
"""

from __future__ import annotations

import json
import zlib
from unittest.mock import ANY

import pytest
from corekit import (
    ANTHROPIC,
    CASES,
    GEMINI,
    JSON_HEADERS,
    MONOTONIC,
    OPENAI_CHAT,
    SSE_HEADERS,
    TOKEN,
    WALL,
    Case,
    FakeClock,
    FakePricing,
    Req,
    cold,
    header,
    make_core,
    run,
    sse,
    stored,
    upstream,
)

from metrion_fixture.core.engine import Settings, plan_prompt
from metrion_fixture.core.entry import Chunks, Entry, RecentEntries
from metrion_fixture.core.flow import (
    HELD_HERE,
    Acquire,
    Answer,
    CacheCore,
    Forward,
    Lookup,
    PassThrough,
    ReadBody,
    ReadRequest,
    Rebuilt,
    Release,
    Tee,
    WaitFor,
    Write,
)
from metrion_fixture.core.records import BYPASS, ERROR, HIT, MISS, REFRESH
from metrion_fixture.formats.xai_grpc import WIRE_FORMAT as XAI_GRPC

each_format = pytest.mark.parametrize("case", CASES.values(), ids=CASES)
both_modes = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])

STRIP = ("x-metrion-cache", "cache-control")
WEEK = 7 * 24 * 3600
OTHER_KEY = "0" * 64


def lock_of(case: Case, stream: bool = False) -> str:
    # One lock per key for both modes (they answer each other): the non-streamed entry's, plus ":lock".
    return case.storage_key(False) + ":lock"


def stored_after_miss(case: Case) -> list[tuple[type, object]]:
    """A non-streamed miss after its Forward: the whole body read, stored, the lock given back."""
    return [(Forward, upstream(False)), (ReadBody, case.answer_bytes()), (Write, True), (Release, None)]


def error_message(case: Case, reply_body: bytes, status: int) -> str:
    """The message of an error in ``case``'s provider shape (asserting the shape on the way)."""
    body = json.loads(reply_body)
    if case.name == "anthropic_messages":
        kind = {400: "invalid_request_error", 504: "timeout_error"}[status]
        assert body == {"type": "error", "error": {"type": kind, "message": ANY}}
        return body["error"]["message"]
    if case.name in ("openai_chat", "openai_responses"):
        kind = {400: "invalid_request_error", 504: "timeout"}[status]
        assert body == {"error": {"message": ANY, "type": kind, "param": None, "code": "metrion_cache"}}
        return body["error"]["message"]
    kind = {400: "INVALID_ARGUMENT", 504: "DEADLINE_EXCEEDED"}[status]
    assert body == {"error": {"code": status, "message": ANY, "status": kind}}
    return body["error"]["message"]


# -- traffic that is not an LLM call, or not a cacheable one -----------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/files"),
        ("GET", "/v1/messages"),
        ("POST", "/v1/messages/count_tokens"),
        ("POST", "/v1/messages/batches"),
        ("POST", "/v1/responses/resp_1/cancel"),
        ("POST", "/v1beta/models/gemini-2.0-flash:countTokens"),
    ],
)
def test_other_traffic_is_forwarded_unread_with_only_the_mode_header_stripped_and_no_record(method, path):
    core = make_core()
    headers = {"x-metrion-cache": "true", "cache-control": "max-age=60"}
    result = run(core.exchange(method, path, headers), (Forward, (200, JSON_HEADERS)))
    assert result.steps == [Forward(("x-metrion-cache",))]  # the body is never read, Cache-Control kept
    assert result.outcome == PassThrough([], None)


def test_openai_assistants_thread_messages_are_not_an_anthropic_call():
    core = make_core()
    flow = core.exchange("POST", "/v1/threads/thread_abc/messages", {"cache-control": "no-cache"})
    result = run(flow, (Forward, (200, JSON_HEADERS)))
    assert result.steps == [Forward(("x-metrion-cache",))]
    assert result.outcome == PassThrough([], None)


@pytest.mark.parametrize(
    ("case", "body"),
    [
        (ANTHROPIC, b"not json"),
        (ANTHROPIC, b""),
        (ANTHROPIC, b'{"model": "claude-sonnet-4-5", "max_tokens": 5}'),
        (OPENAI_CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}'),
        (OPENAI_CHAT, b"[1, 2]"),
        (CASES["openai_responses"], b'{"model": "gpt-4.1-mini", "input": "hi", "background": true}'),
        (GEMINI, b'{"contents": "hi"}'),
    ],
    ids=["not-json", "empty", "no-messages", "no-model", "not-an-object", "background", "contents-not-a-list"],
)
def test_an_uncacheable_request_of_a_known_format_is_passed_through_as_bypass(case, body):
    core = make_core()
    flow = core.exchange("POST", case.json_path, {"x-metrion-cache": "true"})
    result = run(flow, (ReadRequest, body), (Forward, upstream(False)))
    assert result.steps[1] == Forward(STRIP)  # no Lookup, no ReadBody, no Write
    outcome = result.outcome
    assert isinstance(outcome, PassThrough)
    assert outcome.tags == [("x-metrion-cache", BYPASS)]
    record = outcome.record
    assert (record.status, record.wire_format, record.key, record.http_status) == (BYPASS, case.name, "", 200)
    assert record.input_tokens is None


# -- hits ------------------------------------------------------------------------------------------


@each_format
@both_modes
def test_a_stored_entry_of_this_key_and_mode_is_a_hit_after_one_lookup(case, stream):
    core = make_core()
    req = Req(case, stream)
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, stored(case, stream)))
    assert result.steps[1] == Lookup(case.storage_key(stream))
    answer = result.outcome
    assert isinstance(answer, Answer)
    reply = answer.reply
    assert (reply.status, reply.stream, reply.kind) == (200, stream, "hit")
    assert list(reply.chunks) == case.chunks(stream)  # a stream replays the same chunk boundaries
    assert reply.headers == [
        *(SSE_HEADERS if stream else JSON_HEADERS),
        ("request-id", "r1"),
        ("x-metrion-cache", HIT),
        ("x-metrion-cache-key", case.key),
        ("age", "42"),  # the injected wall clock minus the entry's stored_at
    ]


@each_format
def test_a_hit_spends_nothing_and_saves_the_stored_usage_and_provider_time(case):
    core = make_core()
    req = Req(case)
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, stored(case, False, provider_seconds=2.75)))
    record = result.outcome.record
    assert record.status == HIT
    assert (record.input_tokens, record.output_tokens, record.cost_usd) == (0, 0, 0.0)
    assert (record.saved_input_tokens, record.saved_output_tokens) == case.usage
    assert record.saved_seconds == 2.75
    assert (record.key, record.wire_format, record.model, record.stream) == (case.key, case.name, case.model, False)
    assert (record.http_status, record.provider, record.at) == (200, case.format.provider, WALL)


def test_a_hit_of_an_entry_stored_in_the_future_has_age_zero():
    # Processes sharing a store do not share a clock.
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, stored(ANTHROPIC, False, age=-30)))
    assert header(result.outcome.reply.headers, "age") == "0"


def test_prices_and_provider_come_from_the_injected_pricing():
    core = CacheCore(Settings(), clock=FakeClock(), new_token=lambda: TOKEN, pricing=FakePricing())
    req = Req(ANTHROPIC)
    hit = run(req.flow(core), (ReadRequest, req.body), (Lookup, stored(ANTHROPIC, False))).outcome.record
    assert hit.saved_usd == pytest.approx(12 / 1000 + 3 * 2 / 1000) and hit.cost_usd == 0.0
    assert hit.provider == "billed-anthropic"
    miss = run(req.flow(core), *cold(req), *stored_after_miss(ANTHROPIC)).outcome.record
    assert miss.cost_usd == pytest.approx(12 / 1000 + 3 * 2 / 1000) and miss.saved_usd is None


@both_modes
def test_an_entry_of_another_key_under_this_storage_key_is_never_served(stream):
    core = make_core()
    req = Req(ANTHROPIC, stream)
    foreign = stored(ANTHROPIC, stream, key=OTHER_KEY)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, foreign),
        (Lookup, stored(ANTHROPIC, not stream, key=OTHER_KEY)),  # nor converted from the other mode
        (Acquire, True),
        (Lookup, foreign),
        (Lookup, None),  # nor in the other mode
        (Forward, upstream(stream, status=500)),
        (Release, None),
    )
    assert isinstance(result.outcome, PassThrough)


@both_modes
def test_an_entry_of_the_other_mode_under_this_storage_key_is_not_served_as_it_is(stream):
    core = make_core()
    req = Req(ANTHROPIC, stream)
    misplaced = stored(ANTHROPIC, not stream)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, misplaced),
        (Lookup, None),
        (Acquire, True),
        (Lookup, misplaced),
        (Lookup, None),  # nor in the other mode
        (Forward, upstream(stream, status=500)),
        (Release, None),
    )
    assert isinstance(result.outcome, PassThrough)


def _damaged(kind: str) -> object:
    value = stored(ANTHROPIC, False)
    middle = len(value) // 2
    if kind == "flipped-byte":
        return value[:middle] + bytes([value[middle] ^ 1]) + value[middle + 1 :]
    if kind == "truncated":
        return value[:-10]
    if kind == "unknown-version":
        body = value[:-4].replace(b'"v":1', b'"v":2', 1)
        return body + zlib.crc32(body).to_bytes(4, "big")  # a valid checksum over an unknown version
    if kind == "not-bytes":
        return value.decode("latin-1")
    return {"garbage": b"<html>502 Bad Gateway</html>", "empty": b""}[kind]


@pytest.mark.parametrize("kind", ["flipped-byte", "truncated", "unknown-version", "not-bytes", "garbage", "empty"])
def test_a_damaged_stored_value_is_a_miss_and_is_overwritten(kind):
    core = make_core()
    req = Req(ANTHROPIC)
    damaged = _damaged(kind)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, damaged),
        (Lookup, None),
        (Acquire, True),
        (Lookup, damaged),
        (Lookup, None),  # nor in the other mode
        *stored_after_miss(ANTHROPIC),
    )
    assert isinstance(result.outcome, Rebuilt) and result.outcome.record.status == MISS
    assert result.steps[-2] == Write(ANTHROPIC.storage_key(False), ANY, WEEK)


def test_a_remembered_entry_is_recognised_only_by_its_exact_bytes():
    core = CacheCore(Settings(), clock=FakeClock(), new_token=lambda: TOKEN, entries=RecentEntries())
    req = Req(ANTHROPIC)
    value = stored(ANTHROPIC, False)
    assert isinstance(run(req.flow(core), (ReadRequest, req.body), (Lookup, value)).outcome, Answer)
    # Same length and same stored checksum as the remembered value, one byte changed inside.
    middle = len(value) // 2
    forged = value[:middle] + bytes([value[middle] ^ 1]) + value[middle + 1 :]
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, forged),
        (Lookup, None),
        (Acquire, True),
        (Lookup, forged),
        (Lookup, None),  # nor in the other mode
        (Forward, upstream(False, status=500)),
        (Release, None),
    )
    assert isinstance(result.outcome, PassThrough)


def test_a_long_stored_stream_is_replayed_without_copying_its_chunks_first():
    # 2,000 chunks copied before the first is sent cost its first event 0.3 ms (issue 15): a hit
    # hands the entry's lazily cut chunks on as they are, each cut out when it is replayed.
    events = [sse("content_block_delta", {"type": "content_block_delta", "index": 0, "n": n}) for n in range(2000)]
    chunks = [ANTHROPIC.stream_answer[0], *events, *ANTHROPIC.stream_answer[1:]]
    value = stored(ANTHROPIC, True, chunks=chunks)
    req = Req(ANTHROPIC, stream=True)
    reply = run(req.flow(make_core()), (ReadRequest, req.body), (Lookup, value)).outcome.reply
    assert type(reply.chunks) is Chunks and len(reply.chunks) == len(chunks)
    assert list(reply.chunks) == chunks


# -- one key, two shapes ------------------------------------------------------------------------------


@each_format
@both_modes
def test_a_miss_is_answered_from_the_other_mode_converted(case, stream):
    core = make_core()
    # OpenAI's stream carries the usage chunk only when asked for.
    extra = {"stream_options": {"include_usage": True}} if case is OPENAI_CHAT and stream else {}
    req = Req(case, stream, extra=extra)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, stored(case, not stream, provider_seconds=3.0)),
    )
    assert [step.storage_key for step in result.steps[1:]] == [case.storage_key(stream), case.storage_key(not stream)]
    answer = result.outcome
    assert isinstance(answer, Answer)
    reply = answer.reply
    assert (reply.status, reply.stream) == (200, stream)
    content_type = "text/event-stream; charset=utf-8" if stream else "application/json"
    assert header(reply.headers, "content-type") == content_type
    assert [value for name, value in reply.headers if name == "content-type"] == [content_type]
    assert header(reply.headers, "x-metrion-cache") == HIT
    assert header(reply.headers, "x-metrion-cache-key") == case.key
    assert (header(reply.headers, "age"), header(reply.headers, "request-id")) == ("42", "r1")
    chunks = list(reply.chunks)
    if stream:  # a whole stream of the provider's events
        watcher = case.format.stream_watcher()
        for chunk in chunks:
            watcher.feed(chunk)
        watcher.close()
        assert not watcher.failed and (watcher.ended or not case.format.has_stream_terminator)
    else:
        assert case.format.storable_body(b"".join(chunks))
    usage = case.format.usage(chunks, stream)
    assert (usage.input_tokens, usage.output_tokens) == case.usage
    record = answer.record
    assert (record.status, record.stream, record.saved_seconds) == (HIT, stream, 3.0)
    assert (record.saved_input_tokens, record.saved_output_tokens) == case.usage


@pytest.mark.parametrize("include_usage", [False, True])
def test_an_openai_stream_made_from_a_stored_answer_has_a_usage_chunk_only_when_asked(include_usage):
    core = make_core()
    req = Req(OPENAI_CHAT, True, extra={"stream_options": {"include_usage": include_usage}})
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, None), (Lookup, stored(OPENAI_CHAT, False)))
    assert result.steps[1] == Lookup(OPENAI_CHAT.storage_key(True))  # the option is not in the key
    usage = OPENAI_CHAT.format.usage(list(result.outcome.reply.chunks), True)
    assert (usage is not None) is include_usage


def test_an_answer_the_format_cannot_convert_is_a_miss_and_the_answer_is_stored_in_the_requested_mode():
    core = make_core()
    odd = {**ANTHROPIC.json_answer, "content": [{"type": "text", "text": "4"}, "not a block"]}
    req = Req(ANTHROPIC, True)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, stored(ANTHROPIC, False, chunks=[json.dumps(odd).encode()])),
        (Acquire, True),
        (Lookup, None),
        (Lookup, None),  # nor in the other mode
        (Forward, upstream(True)),
    )
    tee = result.outcome
    assert isinstance(tee, Tee)
    for chunk in ANTHROPIC.stream_answer:
        tee.recorder.feed(chunk)
    assert core.end_stream(tee, reached_eof=True).write.storage_key == ANTHROPIC.storage_key(True)


def test_a_store_failure_on_the_other_mode_is_a_miss():
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, TimeoutError("store timed out")),
        (Acquire, True),
        (Lookup, None),
        (Lookup, None),  # nor in the other mode
        *stored_after_miss(ANTHROPIC),
    )
    assert isinstance(result.outcome, Rebuilt)


def test_a_format_that_cannot_convert_is_never_looked_up_in_the_other_mode():
    core = make_core()
    plan = plan_prompt(core.settings, XAI_GRPC, "grok-4", [{"role": "user", "content": "2+2?"}], stream=False)
    result = run(
        core.serve(plan, MONOTONIC),
        (Lookup, None),
        (Acquire, True),
        (Lookup, None),
        (Forward, (500, [])),
        (Release, None),
    )
    assert result.types() == [Lookup, Acquire, Lookup, Forward, Release]


def test_serve_refuses_an_invalid_plan_without_any_io():
    core = make_core()
    plan = plan_prompt(core.settings, XAI_GRPC, "grok-4", [{"role": "user", "content": "hi"}], False, "sometimes")
    result = run(core.serve(plan, MONOTONIC))
    assert result.steps == []
    assert (result.outcome.reply.status, result.outcome.reply.kind) == (400, "invalid")
    assert result.outcome.reply.message.startswith("metrion cache:")
    assert result.outcome.record.status == ERROR


# -- single flight ------------------------------------------------------------------------------------


def test_a_miss_takes_the_lock_looks_again_then_forwards_stores_and_releases():
    core = make_core()
    req = Req(OPENAI_CHAT, headers={"authorization": "Bearer sk-test"})
    body = OPENAI_CHAT.answer_bytes()
    result = run(
        req.flow(core),
        *cold(req),
        (Forward, upstream(False, ("x-request-id", "req_1"))),
        (ReadBody, body),
        (Write, True),
        (Release, None),
    )
    key, lock = OPENAI_CHAT.storage_key(False), lock_of(OPENAI_CHAT)
    assert result.steps[1:] == [
        Lookup(key),
        Lookup(OPENAI_CHAT.storage_key(True)),
        # The lock expires after single_flight_wait + 1 s; what is looked up again may be read with it.
        Acquire(lock, TOKEN, 31_000, (key, OPENAI_CHAT.storage_key(True))),
        Lookup(key),  # another caller may have stored it between the first look and the lock
        Lookup(OPENAI_CHAT.storage_key(True)),  # in either mode
        Forward(STRIP),
        ReadBody(),
        Write(key, ANY, WEEK),
        Release(lock, TOKEN),
    ]
    rebuilt = result.outcome
    assert isinstance(rebuilt, Rebuilt)
    assert (rebuilt.status, rebuilt.body) == (200, body)
    assert rebuilt.headers == [
        ("content-type", "application/json"),
        ("x-request-id", "req_1"),
        ("x-metrion-cache", MISS),
        ("x-metrion-cache-key", OPENAI_CHAT.key),
    ]
    assert (rebuilt.record.status, rebuilt.record.http_status) == (MISS, 200)
    assert (rebuilt.record.input_tokens, rebuilt.record.output_tokens) == OPENAI_CHAT.usage
    entry = Entry.decode(result.steps[8].value)
    assert (entry.key, entry.model, entry.wire_format) == (OPENAI_CHAT.key, OPENAI_CHAT.model, "openai_chat")
    assert (entry.status, entry.stream, entry.chunks, entry.ttl, entry.stored_at) == (200, False, [body], WEEK, WALL)
    assert entry.headers == [("content-type", "application/json"), ("x-request-id", "req_1")]
    assert entry.extra == {"usage": {"input_tokens": 20, "output_tokens": 1}}


@pytest.mark.parametrize(("wait", "ttl_ms"), [(30.0, 31_000), (2.5, 3_500), (0.25, 1_250)])
def test_the_lock_expires_one_second_after_the_wait(wait, ttl_ms):
    core = make_core(single_flight_wait=wait)
    req = Req(ANTHROPIC)
    result = run(req.flow(core), *cold(req), *stored_after_miss(ANTHROPIC))
    look = (ANTHROPIC.storage_key(False), ANTHROPIC.storage_key(True))
    assert result.steps[3] == Acquire(lock_of(ANTHROPIC), TOKEN, ttl_ms, look)


def test_an_entry_stored_between_the_first_look_and_the_lock_is_served_and_the_lock_given_back():
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, None),
        (Acquire, True),
        (Lookup, stored(ANTHROPIC, False)),
        (Release, None),
    )
    assert result.steps[-1] == Release(lock_of(ANTHROPIC), TOKEN)
    assert isinstance(result.outcome, Answer) and result.outcome.record.status == HIT


def test_a_refused_lock_waits_until_the_deadline_and_serves_the_entry_that_appears():
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, None),
        (Acquire, False),
        (WaitFor, stored(ANTHROPIC, False)),
    )
    # The deadline is on the injected monotonic clock.
    assert result.steps[-1] == WaitFor(ANTHROPIC.storage_key(False), lock_of(ANTHROPIC), MONOTONIC + 30.0)
    assert isinstance(result.outcome, Answer) and result.outcome.record.status == HIT


def test_the_waiters_of_a_leader_that_gave_up_all_ask_the_provider_at_once():
    """The lock is gone and nothing is stored (the leader failed): look once in both modes, then go,
    without taking the lock, so no waiter waits for another's failure (issue 14, item 4)."""
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, None),
        (Acquire, False),
        (WaitFor, None),  # the lock is gone, no entry: the leader failed
        (Lookup, None),
        (Lookup, None),
        (Forward, upstream(False)),
        (ReadBody, ANTHROPIC.answer_bytes()),
        (Write, True),
    )
    assert isinstance(result.outcome, Rebuilt)
    assert Release not in result.types()  # it never held the lock


def test_a_waiter_of_the_other_mode_is_answered_by_converting_the_leaders_entry():
    """A streamed and a non-streamed duplicate share one lock; the waiter converts the leader's answer (item 5)."""
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, None),
        (Acquire, False),
        (WaitFor, None),  # the streamed leader stored its answer and gave the lock back
        (Lookup, None),
        (Lookup, stored(ANTHROPIC, True)),
    )
    assert result.steps[4] == WaitFor(ANTHROPIC.storage_key(False), lock_of(ANTHROPIC), MONOTONIC + 30.0)
    assert result.steps[6] == Lookup(ANTHROPIC.storage_key(True))
    assert isinstance(result.outcome, Answer) and result.outcome.record.status == HIT


def test_a_lock_held_by_this_thread_or_task_is_never_waited_for():
    """The driver answers HELD_HERE: ask the provider at once, without the lock and without waiting (item 3)."""
    core = make_core()
    req = Req(ANTHROPIC, True)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, None),
        (Acquire, HELD_HERE),
        (Forward, upstream(True)),
    )
    assert isinstance(result.outcome, Tee) and result.outcome.release is None
    assert WaitFor not in result.types()


def test_a_waiter_past_the_deadline_asks_the_provider_without_a_lock():
    clock = FakeClock()
    core = make_core(clock)
    req = Req(ANTHROPIC)

    def wait_it_out(step: WaitFor) -> None:
        clock.mono = step.deadline
        return None

    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, None),
        (Acquire, False),
        (WaitFor, wait_it_out),
        (Forward, upstream(False)),
        (ReadBody, ANTHROPIC.answer_bytes()),
        (Write, True),
    )
    assert isinstance(result.outcome, Rebuilt)
    assert Release not in result.types()  # it never held the lock


def test_a_wrong_entry_appearing_while_waiting_is_not_served():
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, None),
        (Acquire, False),
        (WaitFor, stored(ANTHROPIC, False, key=OTHER_KEY)),
        (Acquire, False),
        (WaitFor, stored(ANTHROPIC, True)),  # the other mode under this key is not it either
        (Acquire, False),
        (WaitFor, stored(ANTHROPIC, False)),
    )
    assert isinstance(result.outcome, Answer) and result.outcome.record.status == HIT


def test_a_store_failure_on_the_first_lookup_skips_the_other_mode_and_single_flight():
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, ConnectionRefusedError("store down")),
        (Forward, upstream(False)),
        (ReadBody, ANTHROPIC.answer_bytes()),
        (Write, False),  # still tried: the store may be back
    )
    assert isinstance(result.outcome, Rebuilt) and result.outcome.record.status == MISS
    assert result.types() == [ReadRequest, Lookup, Forward, ReadBody, Write]


def test_single_flight_wait_zero_never_locks():
    core = make_core(single_flight_wait=0)
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, None),
        (Lookup, None),
        (Forward, upstream(False)),
        (ReadBody, ANTHROPIC.answer_bytes()),
        (Write, True),
    )
    assert isinstance(result.outcome, Rebuilt)


def test_the_lock_is_given_back_when_the_provider_fails():
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(req.flow(core), *cold(req), (Forward, upstream(False, status=529)), (Release, None))
    assert result.steps[-1] == Release(lock_of(ANTHROPIC), TOKEN)
    assert isinstance(result.outcome, PassThrough)


def test_the_lock_is_given_back_when_the_answer_is_not_worth_storing():
    core = make_core()
    req = Req(ANTHROPIC)
    html = (200, [("content-type", "text/html")])
    result = run(req.flow(core), *cold(req), (Forward, html), (ReadBody, b"<html>oops</html>"), (Release, None))
    assert Write not in result.types()
    assert isinstance(result.outcome, Rebuilt)


def test_a_streamed_miss_hands_its_lock_to_the_stream():
    core = make_core()
    req = Req(ANTHROPIC, True)
    result = run(req.flow(core), *cold(req), (Forward, upstream(True)))
    assert Release not in result.types()
    assert result.outcome.release == Release(lock_of(ANTHROPIC, True), TOKEN)


# -- modes and request headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "value"), [("true", "refresh"), ("refresh", None), ("off", "refresh"), ("true", " Refresh ")]
)
def test_refresh_calls_the_provider_without_reading_and_replaces_the_entry(mode, value):
    core = make_core(mode=mode)
    req = Req(ANTHROPIC, headers={} if value is None else {"x-metrion-cache": value})
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Forward, upstream(False)),
        (ReadBody, ANTHROPIC.answer_bytes()),
        (Write, True),
    )
    assert result.steps[1] == Forward(STRIP)
    assert result.steps[3] == Write(ANTHROPIC.storage_key(False), ANY, WEEK)
    assert header(result.outcome.headers, "x-metrion-cache") == REFRESH
    assert result.outcome.record.status == REFRESH


@pytest.mark.parametrize(
    ("mode", "value"), [("true", "false"), ("true", "FALSE"), ("refresh", "false"), ("off", None), ("replay", "false")]
)
def test_bypass_forwards_without_reading_or_storing(mode, value):
    core = make_core(mode=mode)
    req = Req(ANTHROPIC, headers={} if value is None else {"x-metrion-cache": value})
    result = run(req.flow(core), (ReadRequest, req.body), (Forward, upstream(False)))
    assert result.steps[1] == Forward(STRIP)
    outcome = result.outcome
    assert isinstance(outcome, PassThrough)
    assert outcome.tags == [("x-metrion-cache", BYPASS), ("x-metrion-cache-key", ANTHROPIC.key)]
    assert (outcome.record.status, outcome.record.http_status) == (BYPASS, 200)


def test_a_true_header_in_an_off_session_reads_and_writes():
    core = make_core(mode="off")
    req = Req(ANTHROPIC, headers={"x-metrion-cache": "true"})
    hit = run(req.flow(core), (ReadRequest, req.body), (Lookup, stored(ANTHROPIC, False)))
    assert hit.outcome.record.status == HIT
    miss = run(req.flow(core), *cold(req), *stored_after_miss(ANTHROPIC))
    assert miss.outcome.record.status == MISS and Write in miss.types()


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        (None, 7200),
        ("max-age=60", 60),
        ("no-cache, max-age=3600", 3600),
        ('max-age="120"', 120),
        ("no-store", 7200),  # only max-age means something to this cache
        ("max-age=999999999999", 365 * 24 * 3600),
    ],
)
def test_max_age_sets_the_entrys_ttl_capped_at_365_days(cache_control, ttl):
    core = make_core(ttl=7200)
    req = Req(GEMINI, headers={} if cache_control is None else {"cache-control": cache_control})
    result = run(req.flow(core), *cold(req), *stored_after_miss(GEMINI))
    write = result.steps[-2]
    assert write.ttl == ttl and Entry.decode(write.value).ttl == ttl


def test_max_age_zero_stores_nothing_and_takes_no_lock():
    core = make_core()
    req = Req(ANTHROPIC, headers={"cache-control": "max-age=0"})
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, None), (Lookup, None), (Forward, upstream(False)))
    outcome = result.outcome
    assert isinstance(outcome, PassThrough)  # the answer is not even read through the cache
    assert outcome.tags == [("x-metrion-cache", MISS), ("x-metrion-cache-key", ANTHROPIC.key)]
    assert result.steps[-1] == Forward(STRIP)


def test_max_age_zero_still_serves_a_stored_answer():
    core = make_core()
    req = Req(ANTHROPIC, headers={"cache-control": "max-age=0"})
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, stored(ANTHROPIC, False)))
    assert result.outcome.record.status == HIT


@each_format
@pytest.mark.parametrize(
    "headers",
    [
        {"x-metrion-cache": "yes"},
        {"x-metrion-cache": ""},
        {"cache-control": "max-age=abc"},
        {"cache-control": "max-age=-1"},
        {"cache-control": "max-age=1.5"},
    ],
    ids=["mode-yes", "mode-empty", "max-age-abc", "max-age-negative", "max-age-fraction"],
)
@pytest.mark.parametrize("mode", ["true", "replay"])
def test_an_invalid_directive_is_a_400_in_the_providers_error_shape_and_nothing_is_sent(case, headers, mode):
    core = make_core(mode=mode)
    req = Req(case, True, headers=headers)
    result = run(req.flow(core), (ReadRequest, req.body))
    answer = result.outcome
    assert isinstance(answer, Answer)
    reply = answer.reply
    assert (reply.status, reply.kind, reply.stream) == (400, "invalid", False)
    assert header(reply.headers, "content-type") == "application/json"
    assert header(reply.headers, "x-should-retry") == "false"
    assert header(reply.headers, "x-metrion-cache") == ERROR
    assert header(reply.headers, "x-metrion-cache-key") == case.key
    message = error_message(case, b"".join(reply.chunks), 400)
    assert message.startswith("metrion cache:") and message == reply.message
    assert (answer.record.status, answer.record.http_status) == (ERROR, 400)


# -- replay ------------------------------------------------------------------------------------------


@each_format
@both_modes
def test_a_replay_miss_is_a_400_naming_model_and_key_and_nothing_is_sent(case, stream):
    # A 400, not the 504 it used to be: litellm and dspy reported that as a timeout, and llama-index
    # and dspy retried it (see REPLAY_REFUSAL_STATUS).
    core = make_core(mode="replay")
    req = Req(case, stream)
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, None), (Lookup, None))
    answer = result.outcome
    reply = answer.reply
    assert (reply.status, reply.kind) == (400, "replay_miss")
    assert header(reply.headers, "x-should-retry") == "false"
    assert header(reply.headers, "x-metrion-cache-key") == case.key
    message = error_message(case, b"".join(reply.chunks), 400)
    assert message.startswith("metrion cache:") and case.model in message and case.key in message
    assert (answer.record.status, answer.record.http_status) == (ERROR, 400)


@each_format
def test_a_replay_store_failure_is_a_400_store_down(case):
    core = make_core(mode="replay")
    req = Req(case)
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, ConnectionRefusedError("refused")))
    reply = result.outcome.reply
    assert (reply.status, reply.kind) == (400, "store_down")
    assert "ConnectionRefusedError" in error_message(case, b"".join(reply.chunks), 400)
    assert result.outcome.record.status == ERROR


@both_modes
def test_replay_serves_a_stored_answer_in_either_mode(stream):
    core = make_core(mode="replay")
    req = Req(OPENAI_CHAT, stream)
    own = run(req.flow(core), (ReadRequest, req.body), (Lookup, stored(OPENAI_CHAT, stream)))
    assert own.outcome.record.status == HIT
    other = run(req.flow(core), (ReadRequest, req.body), (Lookup, None), (Lookup, stored(OPENAI_CHAT, not stream)))
    assert other.outcome.record.status == HIT and other.outcome.reply.stream is stream


@pytest.mark.parametrize("value", ["true", "refresh"])
def test_replay_stays_read_only_whatever_the_header_asks(value):
    core = make_core(mode="replay")
    req = Req(ANTHROPIC, headers={"x-metrion-cache": value})
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, None), (Lookup, None))
    assert result.outcome.reply.kind == "replay_miss"


# -- what is stored ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [201, 204, 299])
def test_any_2xx_json_answer_is_stored(status):
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(
        req.flow(core),
        *cold(req),
        (Forward, upstream(False, status=status)),
        (ReadBody, ANTHROPIC.answer_bytes()),
        (Write, True),
        (Release, None),
    )
    assert Entry.decode(result.steps[-2].value).status == status


@pytest.mark.parametrize("status", [301, 400, 401, 404, 429, 500, 503, 529])
@both_modes
def test_a_non_2xx_answer_is_passed_through_and_never_stored(status, stream):
    core = make_core()
    req = Req(ANTHROPIC, stream)
    result = run(req.flow(core), *cold(req), (Forward, upstream(stream, status=status)), (Release, None))
    outcome = result.outcome
    assert isinstance(outcome, PassThrough)  # not read, not recorded
    assert outcome.tags == [("x-metrion-cache", MISS), ("x-metrion-cache-key", ANTHROPIC.key)]
    assert (outcome.record.status, outcome.record.http_status, outcome.record.input_tokens) == (MISS, status, None)


@pytest.mark.parametrize(
    "body",
    [b"<html><body>502 Bad Gateway</body></html>", b'{"id": "msg_01", "type": "mess', b"[]", b"null", b""],
    ids=["html", "truncated", "array", "null", "empty"],
)
def test_a_200_answer_that_is_not_a_whole_json_object_is_passed_on_but_not_stored(body):
    core = make_core()
    req = Req(ANTHROPIC)
    result = run(req.flow(core), *cold(req), (Forward, upstream(False)), (ReadBody, body), (Release, None))
    rebuilt = result.outcome
    assert isinstance(rebuilt, Rebuilt) and Write not in result.types()
    assert (rebuilt.status, rebuilt.body) == (200, body)
    assert (rebuilt.record.status, rebuilt.record.input_tokens) == (MISS, None)


ERROR_BODIES_WITH_200 = {
    # OpenRouter: the upstream provider failed, the gateway still answers 200.
    "openrouter": (
        OPENAI_CHAT,
        {"error": {"message": "Provider returned error", "code": 502, "metadata": {"provider_name": "Groq"}}},
    ),
    # vLLM and Mistral: an error as an object of type "error".
    "vllm": (
        OPENAI_CHAT,
        {
            "object": "error",
            "message": "max_tokens is too large",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
    ),
    "plain-string": (OPENAI_CHAT, {"error": "upstream timed out"}),
    "anthropic-shape": (
        ANTHROPIC,
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    ),
    "gemini-shape": (
        GEMINI,
        {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}},
    ),
}


@pytest.mark.parametrize("name", sorted(ERROR_BODIES_WITH_200))
def test_a_200_answer_whose_body_is_an_error_object_is_passed_on_but_not_stored(name):
    # As inside a stream, where the same error object makes the stream not storable.
    case, error = ERROR_BODIES_WITH_200[name]
    body = json.dumps(error).encode()
    core = make_core()
    req = Req(case)
    result = run(req.flow(core), *cold(req), (Forward, upstream(False)), (ReadBody, body), (Release, None))
    rebuilt = result.outcome
    assert isinstance(rebuilt, Rebuilt) and Write not in result.types()
    assert (rebuilt.status, rebuilt.body) == (200, body)


def test_a_responses_answer_with_error_null_is_stored():
    case = CASES["openai_responses"]
    body = json.dumps({**case.json_answer, "error": None, "incomplete_details": None}).encode()
    core = make_core()
    req = Req(case)
    result = run(
        req.flow(core), *cold(req), (Forward, upstream(False)), (ReadBody, body), (Write, True), (Release, None)
    )
    assert Write in result.types()


def test_an_answer_over_max_entry_bytes_is_passed_on_but_not_stored():
    body = ANTHROPIC.answer_bytes()
    for cap, written in ((len(body) - 1, False), (len(body), True)):
        core = make_core(max_entry_bytes=cap)
        req = Req(ANTHROPIC)
        answers = [(Forward, upstream(False)), (ReadBody, body)] + ([(Write, True)] if written else [])
        result = run(req.flow(core), *cold(req), *answers, (Release, None))
        assert (Write in result.types()) is written
        assert result.outcome.body == body


def test_the_entry_keeps_the_providers_headers_but_not_framing_cookies_or_cache_tags():
    core = make_core()
    req = Req(ANTHROPIC)
    sent = [
        ("Content-Type", "application/json"),
        ("Content-Length", "321"),
        ("Content-Encoding", "gzip"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "keep-alive"),
        ("Set-Cookie", "session=1"),
        ("Age", "5"),
        ("request-id", "req_1"),
        ("anthropic-ratelimit-requests-remaining", "99"),
    ]
    result = run(req.flow(core), *cold(req), (Forward, (200, sent)), *stored_after_miss(ANTHROPIC)[1:])
    entry = Entry.decode(result.steps[-2].value)
    assert entry.headers == [
        ("Content-Type", "application/json"),
        ("request-id", "req_1"),
        ("anthropic-ratelimit-requests-remaining", "99"),
    ]
    # The caller of the miss gets the body decoded and re-framed by the cache.
    names = [name.lower() for name, _ in result.outcome.headers]
    assert not {"content-length", "content-encoding", "transfer-encoding"} & set(names)


@both_modes
def test_a_miss_carries_only_the_caches_own_tags(stream):
    core = make_core()
    req = Req(ANTHROPIC, stream)
    theirs = (("x-metrion-cache", HIT), ("x-metrion-cache-key", OTHER_KEY))
    result = run(
        req.flow(core),
        *cold(req),
        (Forward, upstream(stream, *theirs)),
        *([] if stream else stored_after_miss(ANTHROPIC)[1:]),
    )
    headers = result.outcome.headers
    assert [value for name, value in headers if name == "x-metrion-cache"] == [MISS]
    assert [value for name, value in headers if name == "x-metrion-cache-key"] == [ANTHROPIC.key]


def test_no_request_header_or_query_parameter_reaches_the_store():
    core = make_core()
    secrets = {"x-goog-api-key": "AIza-secret-1", "authorization": "Bearer sk-secret-2", "x-api-key": "sk-secret-3"}
    req = Req(GEMINI, headers=secrets, query=b"key=AIza-secret-4")
    result = run(req.flow(core), *cold(req), *stored_after_miss(GEMINI))
    write = result.steps[-2]
    for secret in (b"secret-1", b"secret-2", b"secret-3", b"secret-4", b"x-goog-api-key", b"authorization"):
        assert secret not in write.value and secret.decode() not in write.storage_key


@each_format
def test_a_miss_records_the_tokens_its_answer_reports(case):
    core = make_core()
    req = Req(case)
    record = run(req.flow(core), *cold(req), *stored_after_miss(case)).outcome.record
    assert (record.status, record.http_status, record.stream) == (MISS, 200, False)
    assert (record.input_tokens, record.output_tokens) == case.usage
    assert (record.cost_usd, record.saved_input_tokens, record.saved_seconds) == (None, 0, 0.0)  # no price table


def test_the_entry_says_when_it_was_stored_and_how_long_the_provider_took():
    clock = FakeClock()
    core = make_core(clock)
    req = Req(ANTHROPIC)

    def after(seconds: float, answer: object):
        def respond(step: object) -> object:
            clock.advance(seconds)
            return answer

        return respond

    result = run(
        req.flow(core),
        *cold(req),
        (Forward, after(2.0, upstream(False))),
        (ReadBody, after(0.5, ANTHROPIC.answer_bytes())),
        (Write, True),
        (Release, None),
    )
    entry = Entry.decode(result.steps[-2].value)
    assert (entry.stored_at, entry.provider_seconds) == (WALL + 2.5, 2.5)
    clock.advance(10)
    hit = run(req.flow(core), (ReadRequest, req.body), (Lookup, result.steps[-2].value)).outcome
    assert header(hit.reply.headers, "age") == "10"
    assert hit.record.saved_seconds == 2.5  # what the hit saved is what the miss took


@each_format
def test_what_a_miss_stores_the_next_identical_request_gets_back(case):
    core = make_core()
    req = Req(case)
    miss = run(req.flow(core), *cold(req), *stored_after_miss(case))
    hit = run(req.flow(core), (ReadRequest, req.body), (Lookup, miss.steps[-2].value))
    assert hit.outcome.reply.chunks == [miss.outcome.body]
    assert hit.outcome.reply.headers[:-3] == miss.outcome.headers[:-2]  # the provider's headers, then the tags


# -- credential scope -------------------------------------------------------------------------------------


def test_in_credential_scope_the_other_mode_is_looked_up_in_the_same_scope():
    core = make_core(scope="credential")
    req = Req(ANTHROPIC, True, headers={"x-api-key": "sk-ant-1"})
    written_there = lambda step: stored(ANTHROPIC, False, written_for=step.storage_key)  # noqa: E731
    result = run(req.flow(core), (ReadRequest, req.body), (Lookup, None), (Lookup, written_there))
    own, other = result.steps[1].storage_key, result.steps[2].storage_key
    scope = own.removeprefix(ANTHROPIC.storage_key(True))
    assert scope.startswith(":cred-") and "sk-ant-1" not in scope
    assert other == ANTHROPIC.storage_key(False) + scope
    assert isinstance(result.outcome, Answer)


# -- an entry is checked against what it was written for (issue 14, item 9) -----------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    "written_for",
    [
        "other:anthropic_messages:{variant}:{key}",  # another namespace's entry, copied here
        "metrion:anthropic_messages:{variant}:{key}:cred-0123456789abcdef0123456789abcdef",  # another scope's
        "metrion:openai_chat:{variant}:{key}",  # another format's
        "",  # written by a version that did not record it
    ],
    ids=["namespace", "scope", "format", "unrecorded"],
)
def test_an_entry_written_for_another_storage_key_is_a_miss(stream, written_for):
    core = make_core()
    req = Req(ANTHROPIC, stream)
    variant = "stream" if stream else "json"
    where = written_for.format(variant=variant, key=ANTHROPIC.key)
    other_where = written_for.format(variant="json" if stream else "stream", key=ANTHROPIC.key)
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, stored(ANTHROPIC, stream, written_for=where)),
        (Lookup, stored(ANTHROPIC, not stream, written_for=other_where)),  # nor converted from the other mode
        (Acquire, True),
        (Lookup, None),
        (Lookup, None),
        (Forward, upstream(stream, status=500)),
        (Release, None),
    )
    assert isinstance(result.outcome, PassThrough) and result.outcome.record.status == MISS


def test_an_entry_of_another_format_under_this_storage_key_is_a_miss():
    """Written under this very storage key (tampered), but saying it is an OpenAI answer: not served."""
    core = make_core()
    req = Req(ANTHROPIC)
    value = stored(ANTHROPIC, False)
    entry = Entry.decode(value)
    forged = Entry(**{**entry.__dict__, "wire_format": "openai_chat"}).encode()
    result = run(
        req.flow(core),
        (ReadRequest, req.body),
        (Lookup, forged),
        (Lookup, None),
        (Acquire, True),
        (Lookup, forged),
        (Lookup, None),
        (Forward, upstream(False, status=500)),
        (Release, None),
    )
    assert isinstance(result.outcome, PassThrough)
