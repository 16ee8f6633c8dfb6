"""One request's path through the cache, written once for sync and async shells.

:func:`exchange` is a generator that yields the I/O it needs (read the request
body, look in the store, call the provider, read its body, write the store) and
returns what the response should be. A shell performs each step with its own
I/O (blocking or awaited) and sends the result back in. All decisions stay here
and in :mod:`.engine`, so the sync and async paths cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from ..formats import wire_format_for
from .directives import MODE_HEADER
from .engine import (
    ERROR,
    HIT,
    Plan,
    Recorder,
    Reply,
    decode_hit,
    decoded_headers,
    hit_reply,
    is_event_stream,
    plan_request,
    replay_miss_reply,
    store_down_reply,
    tag_headers,
    wants_recording,
)
from .stats import CallRecord

if TYPE_CHECKING:
    from ..session import CacheSession


# The steps a shell performs.
class ReadRequest(NamedTuple):
    pass


class Lookup(NamedTuple):
    storage_key: str  # answer: bytes, None (absent) or the exception the store raised


class Forward(NamedTuple):
    strip: tuple[str, ...]  # remove these request headers, then call the provider; answer: (status, headers)


class ReadBody(NamedTuple):
    pass  # answer: the provider's body, decoded


class Write(NamedTuple):
    storage_key: str
    value: bytes
    ttl: int


# What the shell answers the caller with.
class Answer(NamedTuple):
    reply: Reply  # the cache answers by itself (hit, or an error)


class PassThrough(NamedTuple):
    tags: list[tuple[str, str]]  # the provider's response as it is, plus these headers


class Rebuilt(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Tee(NamedTuple):
    recorder: Recorder  # stream the provider's answer to the caller while recording it
    headers: list[tuple[str, str]]


Step = ReadRequest | Lookup | Forward | ReadBody | Write
Outcome = Answer | PassThrough | Rebuilt | Tee

READ_REQUEST = ReadRequest()
READ_BODY = ReadBody()


def exchange(
    session: CacheSession, method: str, path: str, headers: Mapping[str, str]
) -> Generator[Step, Any, Outcome]:
    started = time.perf_counter()
    wire_format = wire_format_for(method, path)
    if wire_format is None:
        # Not an LLM call: untouched and unrecorded, only our own header removed.
        yield Forward((MODE_HEADER,))
        return PassThrough([])

    body = yield READ_REQUEST
    plan = plan_request(session.settings, wire_format, path, headers, body)
    if plan.error is not None:
        return _answer(session, plan, plan.error, started)

    if plan.read:
        found = yield Lookup(plan.storage_key)
        if isinstance(found, BaseException):
            if plan.read_only:
                return _answer(session, plan, store_down_reply(plan, found), started)
            found = None
        entry = decode_hit(found)
        if entry is not None:
            reply = hit_reply(plan, entry)
            _record(session, plan, HIT, reply.status, started, saved=entry.provider_seconds)
            return Answer(reply)
        if plan.read_only:
            return _answer(session, plan, replay_miss_reply(plan), started)

    status, upstream_headers = yield Forward(plan.strip)
    if not wants_recording(plan, status):
        _record(session, plan, plan.outcome, status, started)
        return PassThrough(tag_headers(plan))

    recorder = Recorder(plan, status, upstream_headers, session.settings.max_entry_bytes, started)
    response_headers = decoded_headers(upstream_headers) + tag_headers(plan)
    if is_event_stream(upstream_headers):
        _record(session, plan, plan.outcome, status, started)
        return Tee(recorder, response_headers)

    body = yield READ_BODY
    value = recorder.finish_body(body, time.perf_counter())
    if value is not None:
        yield Write(plan.storage_key, value, plan.write_ttl)
    _record(session, plan, plan.outcome, status, started)
    return Rebuilt(status, response_headers, body)


def _answer(session: CacheSession, plan: Plan, reply: Reply, started: float) -> Answer:
    _record(session, plan, ERROR, reply.status, started)
    return Answer(reply)


def _record(session: CacheSession, plan: Plan, outcome: str, status: int, started: float, saved: float = 0.0) -> None:
    assert plan.wire_format is not None
    session.ledger.record(
        CallRecord(
            key=plan.key,
            wire_format=plan.wire_format.name,
            model=plan.model,
            status=outcome,
            stream=plan.stream,
            latency=time.perf_counter() - started,
            http_status=status,
            saved_seconds=saved,
            at=time.time(),
        )
    )


def import_recorded(
    session: CacheSession,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    status: int,
    response_headers: list[tuple[str, str]],
    response_body: bytes,
) -> bool:
    """Store a request/response pair recorded elsewhere (a vcrpy cassette, say); True if stored.

    It runs the same :func:`exchange` as a transport does, the recording standing in for
    the provider, so it is keyed, filtered and stored exactly as the live answer would
    have been. Give it a session in ``refresh`` mode to replace existing entries.
    """
    flow = exchange(session, method, path, {name.lower(): value for name, value in headers.items()})
    answer: Any = None
    stored = False
    try:
        while True:
            step = flow.send(answer)
            answer = None
            if isinstance(step, ReadRequest):
                answer = body
            elif isinstance(step, Lookup):
                answer = session.read(step.storage_key)
            elif isinstance(step, Forward):
                answer = (status, response_headers)
            elif isinstance(step, ReadBody):
                answer = response_body
            elif isinstance(step, Write):
                stored = session.write(*step)
    except StopIteration as done:
        outcome = done.value
    if isinstance(outcome, Tee):
        # Recordings keep a stream's body whole; store it an event per chunk, as a provider sends it.
        recorder = outcome.recorder
        for event in response_body.split(b"\n\n"):
            if event:
                recorder.feed(event + b"\n\n")
        value = recorder.finish_stream(True, time.perf_counter())
        if value is not None:
            stored = session.write(recorder.plan.storage_key, value, recorder.plan.write_ttl)
    return stored
