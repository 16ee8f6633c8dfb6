"""One request's path through the cache, written once for sync and async shells.

:func:`exchange` is a generator that yields the I/O it needs (read the request
body, look in the store, call the provider, read its body, write the store) and
returns what the response should be. A shell performs each step with its own
I/O (blocking or awaited) and sends the result back in. All decisions stay here
and in :mod:`.engine`, so the sync and async paths cannot drift apart.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..formats import Usage, wire_format_for
from ..reporting.prices import cost_usd, price_source, provider_of
from .directives import MODE_HEADER
from .engine import (
    ERROR,
    HIT,
    Plan,
    Recorder,
    Reply,
    converted_reply,
    decode_hit,
    decoded_headers,
    hit_reply,
    is_event_stream,
    other_variant_key,
    plan_request,
    replay_miss_reply,
    store_down_reply,
    tag_headers,
    wants_recording,
)
from .stats import CallRecord

if TYPE_CHECKING:
    from ..runtime.session import CacheSession


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


# Single flight: one caller asks the provider, identical concurrent requests wait for its entry.
class Acquire(NamedTuple):
    key: str  # take this lock for ``token`` (expiring after ttl_ms); answer: True if taken
    token: str
    ttl_ms: int


class WaitFor(NamedTuple):
    storage_key: str  # poll until this entry exists, the lock is gone, or the deadline (time.monotonic());
    lock_key: str  # answer: the stored bytes, or None
    deadline: float


class Release(NamedTuple):
    key: str  # release the lock if ``token`` still holds it; answer: None
    token: str


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
    release: Release | None = None  # perform it once the stream is over (after writing the entry)


Step = ReadRequest | Lookup | Forward | ReadBody | Write | Acquire | WaitFor | Release
LOCK_SUFFIX = ":lock"
Outcome = Answer | PassThrough | Rebuilt | Tee

READ_REQUEST = ReadRequest()
READ_BODY = ReadBody()


def exchange(
    session: CacheSession, method: str, path: str, headers: Mapping[str, str], query: bytes | str = b""
) -> Generator[Step, Any, Outcome]:
    started = time.perf_counter()
    wire_format = wire_format_for(method, path)
    if wire_format is None:
        # Not an LLM call: untouched and unrecorded, only our own header removed.
        yield Forward((MODE_HEADER,))
        return PassThrough([])

    body = yield READ_REQUEST
    plan = plan_request(session.settings, wire_format, path, headers, body, query)
    if plan.error is not None:
        return _answer(session, plan, plan.error, started)

    lock: Release | None = None  # the single-flight lock this request holds while it calls the provider

    if plan.read:
        found = yield Lookup(plan.storage_key)
        store_down = isinstance(found, BaseException)
        if store_down and plan.read_only:
            return _answer(session, plan, store_down_reply(plan, found), started)
        entry = own_entry(plan, found)
        if entry is not None:
            return _hit(session, plan, entry, started)
        if not store_down:
            # One key, two shapes: the answer stored in the other mode, converted. A second read
            # only on a miss of the first, so a hit of the requested mode stays one read.
            other = yield Lookup(other_variant_key(plan, session.settings.namespace))
            entry = None if isinstance(other, BaseException) else decode_hit(other)
            converted = None if entry is None else converted_reply(plan, entry)
            if converted is not None:
                assert entry is not None
                _record(session, plan, HIT, converted.status, started, saved=entry.provider_seconds, stored=entry.extra)
                return Answer(converted)
        if plan.read_only:
            return _answer(session, plan, replay_miss_reply(plan), started)
        if may_wait(session, plan, found):
            turn = yield from take_turn(session, plan)
            if isinstance(turn, Release):
                lock = turn
            elif turn is not None:
                return _hit(session, plan, turn, started)

    status, upstream_headers = yield Forward(plan.strip)
    if not wants_recording(plan, status):
        if lock is not None:
            yield lock
        _record(session, plan, plan.outcome, status, started)
        return PassThrough(tag_headers(plan))

    recorder = Recorder(plan, status, upstream_headers, session.settings.max_entry_bytes, started)
    response_headers = decoded_headers(upstream_headers) + tag_headers(plan)
    if is_event_stream(upstream_headers):
        record = _record(session, plan, plan.outcome, status, started)
        # A stream's tokens are known at its end: the record is completed then.
        recorder.on_usage = lambda usage: session.ledger.amend(record, **usage_fields(plan, usage))
        return Tee(recorder, response_headers, lock)

    body = yield READ_BODY
    value = recorder.finish_body(body, time.perf_counter())
    if value is not None:
        yield Write(plan.storage_key, value, plan.write_ttl)
    if lock is not None:
        yield lock
    _record(session, plan, plan.outcome, status, started, usage=recorder.usage)
    return Rebuilt(status, response_headers, body)


def may_wait(session: CacheSession, plan: Plan, found: Any) -> bool:
    """Whether a miss should take its turn (single flight) before asking the provider."""
    return not isinstance(found, BaseException) and plan.write_ttl > 0 and session.single_flight_wait > 0


def take_turn(session: CacheSession, plan: Plan) -> Generator[Step, Any, Any]:
    """Become the one caller that asks the provider for this key, or wait for that caller's entry.

    Returns the lock to release once the answer is stored (this caller asks the provider),
    the entry (it appeared meanwhile: a hit for the caller to record and replay), or None
    (waited until the deadline, or the store cannot lock: ask the provider without a lock).
    A holder that fails releases the lock and one waiter takes over; one that dies leaves a
    lock that expires.
    """
    lock_key = plan.storage_key + LOCK_SUFFIX
    token = uuid.uuid4().hex
    wait = session.single_flight_wait
    deadline = time.monotonic() + wait
    while True:
        if (yield Acquire(lock_key, token, int(wait * 1000) + 1000)):
            # Another caller may have stored the entry between our first look and our lock.
            entry = own_entry(plan, (yield Lookup(plan.storage_key)))
            if entry is None:
                return Release(lock_key, token)
            yield Release(lock_key, token)
            return entry
        entry = own_entry(plan, (yield WaitFor(plan.storage_key, lock_key, deadline)))
        if entry is not None:
            return entry
        if time.monotonic() >= deadline:
            return None


_T = TypeVar("_T")


def run_store_steps(session: CacheSession, steps: Generator[Step, Any, _T]) -> _T:
    """Perform a generator's store steps (Lookup, Acquire, WaitFor, Release), blocking.

    For callers that are not HTTP shells (the gRPC interceptors); the shells perform these
    steps in their own loops, together with the HTTP ones.
    """
    answer: Any = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        answer = _store_call(session, step, asynchronous=False)


async def arun_store_steps(session: CacheSession, steps: Generator[Step, Any, _T]) -> _T:
    """:func:`run_store_steps`, awaited."""
    answer: Any = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        answer = await _store_call(session, step, asynchronous=True)


# Each store step: the session method that performs it, blocking and awaited.
_STORE_CALLS = {
    Lookup: ("read", "aread"),
    Acquire: ("acquire", "aacquire"),
    WaitFor: ("wait_for", "await_for"),
    Release: ("release", "arelease"),
}


def _store_call(session: CacheSession, step: Step, asynchronous: bool) -> Any:
    names = _STORE_CALLS.get(type(step))
    if names is None:
        raise TypeError(f"not a store step: {step!r}")
    return getattr(session, names[asynchronous])(*step)


def own_entry(plan: Plan, found: Any) -> Any:
    """The entry in a store's answer, if it is whole and is this request's (not another key's or mode's)."""
    entry = decode_hit(found) if isinstance(found, bytes) else None
    return entry if entry is not None and entry.key == plan.key and entry.stream == plan.stream else None


def _hit(session: CacheSession, plan: Plan, entry: Any, started: float) -> Answer:
    reply = hit_reply(plan, entry)
    _record(session, plan, HIT, reply.status, started, saved=entry.provider_seconds, stored=entry.extra)
    return Answer(reply)


def _answer(session: CacheSession, plan: Plan, reply: Reply, started: float) -> Answer:
    _record(session, plan, ERROR, reply.status, started)
    return Answer(reply)


def usage_fields(plan: Plan, usage: Usage | None) -> dict[str, Any]:
    """The tokens and dollars a provider answer cost, for its call record."""
    if usage is None:
        return {}
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cost_usd": cost_usd(plan.model, usage),
    }


_NOTHING_SPENT = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}


def saved_fields(plan: Plan, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A hit spends nothing, and saves what the stored answer cost (its usage is kept in the entry)."""
    usage = stored.get("usage")
    if not isinstance(usage, dict):
        return _NOTHING_SPENT
    try:
        # On the hit path: the same answer is usually hit again, so its figures are remembered.
        return _saved(plan.model, tuple(sorted(usage.items())), price_source())
    except TypeError:  # unhashable values in a damaged entry
        return _NOTHING_SPENT


@lru_cache(maxsize=4096)
def _saved(model: str, usage_items: tuple[tuple[str, Any], ...], source: str) -> dict[str, Any]:
    usage = Usage.from_dict(dict(usage_items))
    if usage is None:
        return _NOTHING_SPENT
    return {
        **_NOTHING_SPENT,
        "saved_input_tokens": usage.input_tokens,
        "saved_output_tokens": usage.output_tokens,
        "saved_usd": cost_usd(model, usage),
    }


def _record(
    session: CacheSession,
    plan: Plan,
    outcome: str,
    status: int,
    started: float,
    saved: float = 0.0,
    usage: Usage | None = None,
    stored: Mapping[str, Any] | None = None,
) -> CallRecord:
    assert plan.wire_format is not None
    spent = saved_fields(plan, stored) if stored is not None else usage_fields(plan, usage)
    return session.ledger.record(
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
            provider=provider_of(plan.model, plan.wire_format.provider),
            **spent,
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
            elif isinstance(step, Acquire):
                answer = True  # an import asks no provider: nothing to wait for
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
