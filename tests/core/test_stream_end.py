"""A streamed miss: the flow ends in a ``Tee``, the driver feeds the recorder, ``CacheCore.end_stream`` decides.

Only a stream whose provider's final state arrived (Anthropic's message_delta with a stop_reason,
OpenAI's finish chunk and the usage chunk when asked for, Responses' response.completed, a
finishReason for each Gemini candidate) is stored, never a stream without it, however its body
ended; the
body), carried no error event and stayed under the size cap is stored, chunk for chunk.
"""

from __future__ import annotations

import pytest
from corekit import (
    ANTHROPIC,
    CASES,
    GEMINI,
    OPENAI_CHAT,
    TOKEN,
    WALL,
    Case,
    FakeClock,
    Req,
    cold,
    header,
    make_core,
    run,
    sse,
    upstream,
)

from metrion_fixture.core.entry import Entry
from metrion_fixture.core.flow import CacheCore, Forward, Lookup, ReadBody, ReadRequest, Release, StreamEnd, Tee, Write
from metrion_fixture.core.records import HIT, MISS

each_format = pytest.mark.parametrize("case", CASES.values(), ids=CASES)
with_terminator = pytest.mark.parametrize("case", [c for c in CASES.values() if c.terminator], ids=lambda c: c.name)
WEEK = 7 * 24 * 3600


def start(core: CacheCore, case: Case, *extra_headers: tuple[str, str], **req: object) -> Tee:
    """A streamed miss up to the moment its stream starts: the Tee."""
    request = Req(case, True, **req)
    result = run(request.flow(core), *cold(request), (Forward, upstream(True, *extra_headers)))
    assert isinstance(result.outcome, Tee)
    return result.outcome


def feed(tee: Tee, chunks: list[bytes]) -> None:
    for chunk in chunks:
        tee.recorder.feed(chunk)


@each_format
def test_a_streamed_answer_becomes_a_tee_tagged_miss_and_is_not_read_by_the_core(case):
    core = make_core()
    tee = start(core, case, ("x-request-id", "r9"), ("content-length", "999"))
    assert tee.headers == [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("x-request-id", "r9"),
        ("x-metrion-cache", MISS),
        ("x-metrion-cache-key", case.key),
    ]
    assert (tee.record.status, tee.record.stream, tee.record.input_tokens) == (MISS, True, None)  # not known yet
    assert tee.release == Release(case.storage_key(False) + ":lock", TOKEN)  # one lock for both modes
    assert tee.recorder.chunks == []


@each_format
def test_a_complete_stream_is_stored_chunk_for_chunk_with_its_usage(case):
    core = make_core()
    tee = start(core, case)
    feed(tee, case.stream_answer)
    end = core.end_stream(tee, reached_eof=True)
    assert end.write == Write(case.storage_key(True), end.write.value, WEEK)
    entry = Entry.decode(end.write.value)
    assert (entry.key, entry.stream, entry.status, entry.stored_at) == (case.key, True, 200, WALL)
    assert list(entry.chunks) == case.stream_answer  # the same boundaries, for a hit to replay
    assert entry.extra == {"usage": {"input_tokens": case.usage[0], "output_tokens": case.usage[1]}}
    record = end.record
    assert (record.status, record.stream) == (MISS, True)
    assert (record.input_tokens, record.output_tokens) == case.usage
    assert record.key == tee.record.key


def test_a_stream_is_stored_at_most_once():
    core = make_core()
    tee = start(core, ANTHROPIC)
    feed(tee, ANTHROPIC.stream_answer)
    assert core.end_stream(tee, reached_eof=True).write is not None
    assert core.end_stream(tee, reached_eof=True) == StreamEnd(None, None)
    assert core.end_stream(tee, reached_eof=False) == StreamEnd(None, None)


@with_terminator
def test_a_stream_the_caller_closed_after_its_terminator_is_stored(case):
    # The OpenAI SDK closes the response as soon as it reads [DONE].
    core = make_core()
    tee = start(core, case)
    feed(tee, case.stream_answer)
    assert core.end_stream(tee, reached_eof=False).write is not None


@each_format
def test_a_stream_the_caller_closed_after_its_final_state_is_stored_ending_as_the_providers_do(case):
    # litellm closes an Anthropic stream after message_delta and never reads message_stop: the
    # answer is whole, and the stored stream gets the trailer the caller did not wait for.
    core = make_core()
    tee = start(core, case)
    feed(tee, case.stream_answer[: case.final_state])
    end = core.end_stream(tee, reached_eof=False)
    assert end.write is not None
    trailer = {"anthropic_messages": [ANTHROPIC.terminator], "openai_chat": [OPENAI_CHAT.terminator]}
    expected = case.stream_answer[: case.final_state] + trailer.get(case.name, [])
    assert list(Entry.decode(end.write.value).chunks) == expected


@each_format
def test_a_stream_the_caller_closed_before_its_final_state_is_not_stored(case):
    core = make_core()
    tee = start(core, case)
    feed(tee, case.stream_answer[: case.final_state - 1])
    assert core.end_stream(tee, reached_eof=False).write is None


@each_format
def test_a_stream_whose_body_ended_cleanly_without_its_final_state_is_not_stored(case):
    # Anthropic's message_stop, OpenAI's [DONE] or a clean end of a Gemini body prove nothing by themselves.
    core = make_core()
    tee = start(core, case)
    feed(tee, [*case.stream_answer[: case.final_state - 1], *case.stream_answer[case.final_state :]])
    assert core.end_stream(tee, reached_eof=True) == StreamEnd(None, None)


def test_an_anthropic_message_delta_without_a_stop_reason_is_not_the_final_state():
    core = make_core()
    tee = start(core, ANTHROPIC)
    interim = sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {}})
    feed(tee, [*ANTHROPIC.stream_answer[:5], interim])
    assert core.end_stream(tee, reached_eof=False).write is None


def test_a_trailer_the_caller_left_unfinished_is_replaced_by_a_whole_one():
    core = make_core()
    tee = start(core, ANTHROPIC)
    half = ANTHROPIC.terminator[:15]
    feed(tee, [*ANTHROPIC.stream_answer[:5], ANTHROPIC.stream_answer[5] + half])
    end = core.end_stream(tee, reached_eof=False)
    chunks = list(Entry.decode(end.write.value).chunks)
    assert chunks == [*ANTHROPIC.stream_answer[:6], ANTHROPIC.terminator]


def test_an_openai_stream_that_asked_for_usage_is_complete_only_with_its_usage_chunk():
    usage_asked = {"stream_options": {"include_usage": True}}
    core = make_core()
    tee = start(core, OPENAI_CHAT, extra=usage_asked)
    feed(tee, OPENAI_CHAT.stream_answer[:3])  # the finish chunk, then the caller leaves
    assert core.end_stream(tee, reached_eof=False).write is None
    core = make_core()
    tee = start(core, OPENAI_CHAT, extra=usage_asked)
    feed(tee, OPENAI_CHAT.stream_answer[:4])
    end = core.end_stream(tee, reached_eof=False)
    assert list(Entry.decode(end.write.value).chunks) == OPENAI_CHAT.stream_answer  # [DONE] added
    core = make_core()
    tee = start(core, OPENAI_CHAT, extra=usage_asked)
    feed(tee, [*OPENAI_CHAT.stream_answer[:3], OPENAI_CHAT.terminator])  # [DONE] without the usage
    assert core.end_stream(tee, reached_eof=True).write is None


def test_an_openai_stream_of_several_choices_is_complete_when_each_has_finished():
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini"}

    def choice(index: int, delta: dict, finish: str | None = None) -> bytes:
        return sse(None, {**chunk, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})

    first = [choice(0, {"role": "assistant", "content": "4"}), choice(0, {}, "stop")]
    second = [choice(1, {"role": "assistant", "content": "four"}), choice(1, {}, "stop")]
    core = make_core()
    tee = start(core, OPENAI_CHAT, extra={"n": 2})
    feed(tee, [*first, second[0]])
    assert core.end_stream(tee, reached_eof=False).write is None
    core = make_core()
    tee = start(core, OPENAI_CHAT, extra={"n": 2})
    feed(tee, [*first, *second, OPENAI_CHAT.terminator])
    assert core.end_stream(tee, reached_eof=False).write is not None


def test_a_gemini_stream_is_complete_at_its_finish_reason_or_a_blocked_prompt():
    core = make_core()
    tee = start(core, GEMINI)
    feed(tee, GEMINI.stream_answer[:1])
    assert core.end_stream(tee, reached_eof=True).write is None  # a clean end, no finishReason
    blocked = sse(
        None,
        {
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
            "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
            "modelVersion": "gemini-2.0-flash",
        },
        crlf=True,
    )
    core = make_core()
    tee = start(core, GEMINI)
    feed(tee, [blocked])
    assert core.end_stream(tee, reached_eof=True).write is not None


@each_format
def test_a_stream_with_an_error_event_is_not_stored(case):
    core = make_core()
    tee = start(core, case)
    feed(tee, [*case.stream_answer[:1], case.error_event, *case.stream_answer[1:]])
    assert core.end_stream(tee, reached_eof=True).write is None


@with_terminator
def test_a_stream_with_events_after_its_terminator_is_not_stored(case):
    core = make_core()
    tee = start(core, case)
    feed(tee, [*case.stream_answer, case.stream_answer[1]])
    assert core.end_stream(tee, reached_eof=True).write is None


def test_a_gemini_stream_whose_body_ended_inside_an_event_is_not_stored():
    core = make_core()
    tee = start(core, GEMINI)
    last = GEMINI.stream_answer[-1]
    feed(tee, [*GEMINI.stream_answer[:-1], last[: len(last) // 2]])
    assert core.end_stream(tee, reached_eof=True).write is None


@each_format
def test_a_stream_over_max_entry_bytes_is_not_stored(case):
    size = sum(len(chunk) for chunk in case.stream_answer)
    for cap, stored in ((size - 1, False), (size, True)):
        core = make_core(max_entry_bytes=cap)
        tee = start(core, case)
        feed(tee, case.stream_answer)
        assert (core.end_stream(tee, reached_eof=True).write is not None) is stored


def test_an_abandoned_stream_is_not_stored():
    # The driver abandons the recording when the provider's stream raised.
    core = make_core()
    tee = start(core, OPENAI_CHAT)
    feed(tee, OPENAI_CHAT.stream_answer[:2])
    tee.recorder.abandon()
    feed(tee, OPENAI_CHAT.stream_answer[2:])
    assert core.end_stream(tee, reached_eof=True).write is None


def test_a_stored_stream_is_replayed_by_the_next_identical_request():
    clock = FakeClock()
    core = make_core(clock)
    tee = start(core, OPENAI_CHAT)
    chunks = [b"".join(OPENAI_CHAT.stream_answer[:2]), *OPENAI_CHAT.stream_answer[2:]]  # as the network cut them
    feed(tee, chunks)
    value = core.end_stream(tee, reached_eof=True).write.value
    clock.advance(5)
    req = Req(OPENAI_CHAT, True)
    answer = run(req.flow(core), (ReadRequest, req.body), (Lookup, value)).outcome
    assert (answer.record.status, answer.reply.stream) == (HIT, True)
    assert list(answer.reply.chunks) == chunks
    assert header(answer.reply.headers, "age") == "5"


@pytest.mark.parametrize("label", ["application/json", "application/json; charset=utf-8", "text/plain", None])
@each_format
def test_a_stream_labelled_json_is_passed_on_as_a_stream_and_stored_when_complete(case, label):
    # Seen in real recordings: a gateway labels the event stream application/json. Buffering it
    # whole would give the caller every chunk at the end; it is a Tee like any stream.
    core = make_core()
    request = Req(case, True)
    headers = [] if label is None else [("content-type", label)]
    result = run(request.flow(core), *cold(request), (Forward, (200, headers)))
    tee = result.outcome
    assert isinstance(tee, Tee)
    feed(tee, case.stream_answer)
    end = core.end_stream(tee, reached_eof=True)
    assert list(Entry.decode(end.write.value).chunks) == case.stream_answer


def test_a_json_answer_to_a_streamed_request_is_passed_on_but_not_stored():
    core = make_core()
    request = Req(OPENAI_CHAT, True)
    result = run(request.flow(core), *cold(request), (Forward, (200, [("content-type", "application/json")])))
    tee = result.outcome
    feed(tee, [OPENAI_CHAT.answer_bytes()])
    assert core.end_stream(tee, reached_eof=True).write is None


def test_a_non_streamed_request_answered_with_json_is_read_whole():
    core = make_core()
    request = Req(OPENAI_CHAT, False)
    result = run(
        request.flow(core),
        *cold(request),
        (Forward, (200, [("content-type", "application/json")])),
        (ReadBody, OPENAI_CHAT.answer_bytes()),
        (Write, True),
        (Release, None),
    )
    assert Write in result.types()
