"""A streamed miss: the flow ends in a ``Tee``, the driver feeds the recorder, ``CacheCore.end_stream`` decides.

Only a stream that ended cleanly (its format's terminator, or for Gemini the clean end of the
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
    upstream,
)

from metrion_fixture.core.entry import Entry
from metrion_fixture.core.flow import CacheCore, Forward, Lookup, ReadRequest, Release, StreamEnd, Tee, Write
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
def test_a_stream_the_caller_closed_before_its_end_is_not_stored(case):
    core = make_core()
    tee = start(core, case)
    feed(tee, case.stream_answer[:-1])
    assert core.end_stream(tee, reached_eof=False).write is None


def test_a_gemini_stream_closed_by_the_caller_is_not_stored_even_with_every_event():
    # Gemini has no end event: only the clean end of the body says the answer is whole.
    core = make_core()
    tee = start(core, GEMINI)
    feed(tee, GEMINI.stream_answer)
    assert core.end_stream(tee, reached_eof=False).write is None


@with_terminator
def test_a_stream_whose_body_ended_without_its_terminator_is_not_stored(case):
    core = make_core()
    tee = start(core, case)
    feed(tee, case.stream_answer[:-1])
    assert core.end_stream(tee, reached_eof=True) == StreamEnd(None, None)


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
