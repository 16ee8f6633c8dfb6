"""One request's path through the cache, as a state machine with no I/O.

:meth:`CacheCore.exchange` is a generator: each value it yields is the next state, a step
of I/O it needs (read the request body, look in the store, call the provider, read its
body, write the store, take or give back a single-flight lock), and what it returns is the
final state: the answer, with the call record to publish. A driver
(:mod:`metrion_fixture.runtime`) performs each step with blocking or awaited I/O and sends
the result back in. Everything it knows comes in as plain data: the settings, the request,
the store's answers, the provider's status and bytes; the clock, the token source and the
memos are injected. So every adapter (httpx, httpx2, gRPC, the cassette importer) shares
every decision, and the rules can be tested with made-up inputs (``tests/core``).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from ..formats import Usage, wire_format_for
from .directives import MODE_HEADER
from .engine import (
    ERROR,
    HIT,
    Plan,
    PlanMemo,
    Recorder,
    Reply,
    Settings,
    converted_reply,
    decode_hit,
    decoded_headers,
    hit_reply,
    lock_key,
    other_variant_key,
    plan_request,
    read_usage,
    replay_miss_reply,
    store_down_reply,
    tag_headers,
    wants_recording,
)
from .entry import Entry, RecentEntries
from .records import CallRecord, Status

LOCK_SUFFIX = ":lock"
# The answer to an Acquire when the lock is already held by this very thread or task (a second
# identical stream opened before the first was read): waiting would be waiting for itself.
HELD_HERE = "held-here"


class Clock(Protocol):
    def wall(self) -> float:
        """Seconds since the epoch: when an entry was stored, a call made."""

    def monotonic(self) -> float:
        """A clock that never goes back: latencies and deadlines."""


class SystemClock:
    # Looked up on each call, not bound once: tests move time by patching the time module.
    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.perf_counter()


SYSTEM_CLOCK: Clock = SystemClock()


class Pricing(Protocol):
    """Who bills a model and what an answer cost (the runtime injects the price table)."""

    def provider_of(self, model: str, default: str = "") -> str: ...

    def cost_usd(self, model: str, usage: Usage | None) -> float | None: ...


class NoPrices:
    """Pricing for a core without a price table: the format's provider, dollars unknown."""

    @staticmethod
    def provider_of(model: str, default: str = "") -> str:
        return default

    @staticmethod
    def cost_usd(model: str, usage: Usage | None) -> float | None:
        return None


NO_PRICES: Pricing = NoPrices()


# -- the steps a driver performs (the states that need I/O) -----------------------------------


class ReadRequest(NamedTuple):
    """Answer: the request body, bytes."""


class Lookup(NamedTuple):
    """Answer: the stored bytes, None (absent), or the exception the store raised."""

    storage_key: str


class Forward(NamedTuple):
    """Remove these request headers, then call the provider. Answer: (status, headers)."""

    strip: tuple[str, ...]


class ReadBody(NamedTuple):
    """Answer: the provider's whole body, decoded."""


class Write(NamedTuple):
    """Store an entry. Answer: True if stored."""

    storage_key: str
    value: bytes
    ttl: int


class Acquire(NamedTuple):
    """Take the single-flight lock ``key`` for ``token`` (expiring after ``ttl_ms``).

    Answer: True if taken, False if another caller holds it, :data:`HELD_HERE` if the thread or
    task asking already holds it (the driver knows which locks it holds).

    ``look``: the storage keys the flow looks up next if the lock is taken. A driver may read them
    in the same round trip, right after taking the lock, and answer those Lookups from what it read.
    """

    key: str
    token: str
    ttl_ms: int
    look: tuple[str, ...] = ()


class WaitFor(NamedTuple):
    """Poll until the entry exists, the lock is gone, or ``deadline`` (the core's monotonic clock).

    Answer: the stored bytes, or None.
    """

    storage_key: str
    lock_key: str
    deadline: float


class Release(NamedTuple):
    """Give back the lock ``key`` if ``token`` still holds it. Answer: None."""

    key: str
    token: str


Step = ReadRequest | Lookup | Forward | ReadBody | Write | Acquire | WaitFor | Release
READ_REQUEST = ReadRequest()
READ_BODY = ReadBody()


# -- the final states ---------------------------------------------------------------------------


class Answer(NamedTuple):
    """The cache answers by itself: a hit, or an error of its own."""

    reply: Reply
    record: CallRecord


class PassThrough(NamedTuple):
    """The provider's response as it is, plus these headers; ``record`` is None for traffic that is not an LLM call."""

    tags: list[tuple[str, str]]
    record: CallRecord | None


class Rebuilt(NamedTuple):
    """The provider's non-streamed answer, already read whole (and stored if it was worth it)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    record: CallRecord


@dataclass(eq=False)
class Tee:
    """Stream the provider's answer to the caller while recording it; :meth:`CacheCore.end_stream` at its end.

    ``record`` is published when the stream starts; its tokens are known only at the end, when
    the driver publishes the completed record in its place (and keeps it here).
    """

    recorder: Recorder
    headers: list[tuple[str, str]]
    release: Release | None  # the single-flight lock, given back once the entry is written
    record: CallRecord


Outcome = Answer | PassThrough | Rebuilt | Tee


class Converted(NamedTuple):
    """An answer found stored in the other mode, converted to the requested one."""

    reply: Reply
    entry: Entry


class StreamEnd(NamedTuple):
    """What to do once a recorded stream is over: store it (or not), and its completed call record."""

    write: Write | None
    record: CallRecord | None  # replaces the one published when the stream started; None: keep it


# -- the core -----------------------------------------------------------------------------------


class CacheCore:
    """The cache's rules for one set of settings; holds no session, store or ledger.

    ``plans`` and ``entries`` remember recent plans and decoded entries (the runtime shares
    one of each per process); ``clock``, ``new_token`` and ``pricing`` are injected so tests
    can fix them. ``source`` names where the calls come from in their records: the runtime sets
    it when that changes (a new test, a new cell), never per call.
    """

    __slots__ = ("settings", "clock", "plans", "entries", "new_token", "pricing", "source")

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        plans: PlanMemo | None = None,
        entries: RecentEntries | None = None,
        new_token: Callable[[], str] = lambda: uuid.uuid4().hex,
        pricing: Pricing = NO_PRICES,
        source: str = "",
    ) -> None:
        self.settings, self.clock, self.plans, self.entries = settings, clock, plans, entries
        self.new_token, self.pricing, self.source = new_token, pricing, source

    def with_settings(self, settings: Settings) -> CacheCore:
        return CacheCore(
            settings,
            clock=self.clock,
            plans=self.plans,
            entries=self.entries,
            new_token=self.new_token,
            pricing=self.pricing,
            source=self.source,
        )

    def exchange(
        self, method: str, path: str, headers: Mapping[str, str], query: bytes | str = b""
    ) -> Generator[Step, Any, Outcome]:
        """An HTTP request's path: pass it through untouched unless it is an LLM call of a known format.

        ``headers`` is looked up by lower-case name: give a case-insensitive mapping (httpx's
        ``Headers``) or lower-case the names, or a credential header would be missed.
        """
        started = self.clock.monotonic()
        wire_format = wire_format_for(method, path)
        if wire_format is None:
            # Not an LLM call: untouched and unrecorded, only our own header removed.
            yield Forward((MODE_HEADER,))
            return PassThrough([], None)
        body = yield READ_REQUEST
        plan = plan_request(self.settings, wire_format, path, headers, body, query, self.plans)
        return (yield from self.serve(plan, started))

    def serve(self, plan: Plan, started: float) -> Generator[Step, Any, Outcome]:
        """A planned request's path (gRPC calls start here, their prompt read by the adapter)."""
        wire_format = plan.wire_format
        assert wire_format is not None
        if plan.error is not None:
            return self._refuse(plan, plan.error, started)
        lock: Release | None = None  # the single-flight lock this request holds while it calls the provider

        if plan.read:
            found = yield Lookup(plan.storage_key)
            store_down = isinstance(found, BaseException)
            if store_down and plan.read_only:
                return self._refuse(plan, store_down_reply(plan, found), started)
            entry = self.own_entry(plan, found)
            if entry is not None:
                return self._hit(plan, entry, started)
            if not store_down:
                # One key, two shapes: the answer stored in the other mode, converted. A second read
                # only on a miss of the first, so a hit of the requested mode stays one read.
                converted = yield from self._other_mode(plan)
                if converted is not None:
                    return Answer(
                        converted.reply, self._call(plan, HIT, converted.reply.status, started, hit=converted.entry)
                    )
            if plan.read_only:
                return self._refuse(plan, replay_miss_reply(plan), started)
            if self.may_wait(plan, found):
                turn = yield from self.take_turn(plan)
                if isinstance(turn, Release):
                    lock = turn
                elif isinstance(turn, Converted):
                    return Answer(turn.reply, self._call(plan, HIT, turn.reply.status, started, hit=turn.entry))
                elif turn is not None:
                    return self._hit(plan, turn, started)

        status, upstream_headers = yield Forward(plan.strip)
        if not wants_recording(plan, status):
            if lock is not None:
                yield lock
            return PassThrough(tag_headers(plan), self._call(plan, plan.outcome, status, started))

        recorder = Recorder(plan, status, upstream_headers, self.settings.max_entry_bytes, started)
        response_headers = decoded_headers(upstream_headers) + tag_headers(plan)
        if wire_format.is_stream_answer(plan.stream, upstream_headers):
            return Tee(recorder, response_headers, lock, self._call(plan, plan.outcome, status, started))

        body = yield READ_BODY
        usage = None
        if recorder.body_storable(body):
            usage = read_usage(wire_format, [body], False)
            value = recorder.entry(
                [body], stream=False, usage=usage, now=self.clock.wall(), now_monotonic=self.clock.monotonic()
            )
            yield Write(plan.storage_key, value, plan.write_ttl)
        if lock is not None:
            yield lock
        return Rebuilt(status, response_headers, body, self._call(plan, plan.outcome, status, started, spent=usage))

    def end_stream(self, tee: Tee, reached_eof: bool) -> StreamEnd:
        """A recorded stream is over (``reached_eof``: it ran to its end; else the caller closed it)."""
        recorder = tee.recorder
        if not recorder.stream_complete(reached_eof):
            return StreamEnd(None, None)
        plan = recorder.plan
        assert plan.wire_format is not None
        chunks = recorder.stream_chunks()
        usage = read_usage(plan.wire_format, chunks, True)
        value = recorder.entry(
            chunks, stream=True, usage=usage, now=self.clock.wall(), now_monotonic=self.clock.monotonic()
        )
        record = tee.record
        if usage is not None:
            record = dataclasses.replace(
                record,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost_usd=self.pricing.cost_usd(plan.model, usage),
            )
        return StreamEnd(Write(plan.storage_key, value, plan.write_ttl), record)

    def may_wait(self, plan: Plan, found: Any) -> bool:
        """Whether a miss should take its turn (single flight) before asking the provider."""
        return not isinstance(found, BaseException) and plan.write_ttl > 0 and self.settings.single_flight_wait > 0

    def take_turn(self, plan: Plan) -> Generator[Step, Any, Release | Entry | Converted | None]:
        """Become the one caller that asks the provider for this key, or wait for that caller's entry.

        The lock covers the key, not the stored mode (:func:`lock_key`): a streamed and a
        non-streamed duplicate wait for each other, and the waiter converts the other's answer.
        Returns the lock to release once the answer is stored (this caller asks the provider),
        the entry or the other mode's answer converted (it appeared meanwhile: a hit), or None:
        ask the provider without a lock, because this thread or task holds the lock itself
        (never wait for oneself), the deadline passed, the store cannot lock, or the leader
        gave the lock back without an answer (it failed: every waiter learns it at the same
        moment and they all go to the provider at once, none waits for another's failure).
        A leader that dies leaves a lock that expires, with the same effect.
        """
        lock = lock_key(plan, self.settings.namespace, plan.storage_key)
        token = self.new_token()
        wait = self.settings.single_flight_wait
        deadline = self.clock.monotonic() + wait
        assert plan.wire_format is not None
        # What _look_again reads once the lock is taken: a driver may read it in the same round trip.
        look: tuple[str, ...] = (plan.storage_key,)
        if plan.wire_format.converts_modes:
            look += (other_variant_key(plan, self.settings.namespace),)
        while True:
            taken = yield Acquire(lock, token, int(wait * 1000) + 1000, look)
            if taken == HELD_HERE:
                return None
            if taken:
                # Another caller may have stored the answer between our first look and our lock.
                found = yield from self._look_again(plan)
                if found is None:
                    return Release(lock, token)
                yield Release(lock, token)
                return found
            waited = yield WaitFor(plan.storage_key, lock, deadline)
            entry = self.own_entry(plan, waited)
            if entry is not None:
                return entry
            if self.clock.monotonic() >= deadline:
                return None
            if waited is None:
                # The lock is gone: the leader's answer is stored (in either mode), or it failed.
                return (yield from self._look_again(plan))
            # A value that is not this request's answer (damaged, another key's): keep waiting.

    def _look_again(self, plan: Plan) -> Generator[Step, Any, Entry | Converted | None]:
        """The answer in the requested mode, else the other mode's converted; None if neither is there."""
        entry = self.own_entry(plan, (yield Lookup(plan.storage_key)))
        if entry is not None:
            return entry
        return (yield from self._other_mode(plan))

    def _other_mode(self, plan: Plan) -> Generator[Step, Any, Converted | None]:
        """The answer stored in the other mode, converted to the requested one, or None (absent or not convertible)."""
        assert plan.wire_format is not None
        if not plan.wire_format.converts_modes:
            return None
        other = yield Lookup(other_variant_key(plan, self.settings.namespace))
        entry = None if isinstance(other, BaseException) else decode_hit(other, self.entries)
        if entry is None:
            return None
        converted = converted_reply(plan, entry, self.clock.wall(), self.settings.namespace)
        return None if converted is None else Converted(converted, entry)

    def own_entry(self, plan: Plan, found: Any) -> Entry | None:
        """The entry in a store's answer, if it is whole and is this request's.

        Not another key's or mode's, and written for this very storage key: the same namespace,
        wire format and scope (an entry copied or moved under another storage key is a miss).
        """
        entry = decode_hit(found, self.entries) if isinstance(found, bytes) else None
        if entry is None or entry.key != plan.key or entry.stream != plan.stream:
            return None
        assert plan.wire_format is not None
        if entry.storage_key != plan.storage_key or entry.wire_format != plan.wire_format.name:
            return None
        return entry

    def hit(self, plan: Plan, entry: Entry, started: float) -> Answer:
        """The answer for an entry found in the store."""
        return self._hit(plan, entry, started)

    def _hit(self, plan: Plan, entry: Entry, started: float) -> Answer:
        reply = hit_reply(plan, entry, self.clock.wall())
        return Answer(reply, self._call(plan, HIT, reply.status, started, hit=entry))

    def _refuse(self, plan: Plan, reply: Reply, started: float) -> Answer:
        return Answer(reply, self._call(plan, ERROR, reply.status, started, refusal=reply.kind))

    def _call(
        self,
        plan: Plan,
        status: Status,
        http_status: int,
        started: float,
        *,
        hit: Entry | None = None,
        spent: Usage | None = None,
        refusal: str = "",
    ) -> CallRecord:
        assert plan.wire_format is not None
        pricing, model = self.pricing, plan.model
        if hit is not None:
            # A hit spends nothing, and saves what the stored answer cost (its usage is kept in the entry).
            saved = Usage.from_dict(hit.extra.get("usage"))
            spending: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
            if saved is not None:
                spending["saved_input_tokens"] = saved.input_tokens
                spending["saved_output_tokens"] = saved.output_tokens
                spending["saved_usd"] = pricing.cost_usd(model, saved)
        else:
            spending = {}
            if spent is not None:
                spending = {
                    "input_tokens": spent.input_tokens,
                    "output_tokens": spent.output_tokens,
                    "cost_usd": pricing.cost_usd(model, spent),
                }
        record = CallRecord(
            key=plan.key,
            wire_format=plan.wire_format.name,
            model=model,
            status=status,
            stream=plan.stream,
            latency=self.clock.monotonic() - started,
            http_status=http_status,
            saved_seconds=hit.provider_seconds if hit is not None else 0.0,
            at=self.clock.wall(),
            provider=pricing.provider_of(model, plan.wire_format.provider),
            source=self.source,
            preview=plan.preview,
            refusal=refusal,
            **spending,
        )
        return record


__all__ = [
    "Acquire",
    "Answer",
    "CacheCore",
    "Clock",
    "Forward",
    "Lookup",
    "Outcome",
    "PassThrough",
    "Pricing",
    "ReadBody",
    "ReadRequest",
    "Rebuilt",
    "Release",
    "Step",
    "StreamEnd",
    "SystemClock",
    "Tee",
    "WaitFor",
    "Write",
]
