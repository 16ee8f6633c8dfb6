# Generated from metrion_fixture/runtime/_async/driver.py by .ci/unasync.py: edit that file, not this one.
"""The sync driver: performs the steps of the core's state machine with blocking I/O.

An adapter gives it the request's flow (:meth:`CacheCore.exchange` or :meth:`CacheCore.serve`)
and an :class:`Upstream` (how to read the request body, call the provider and read its
body with its own library); the session gives it the store calls and where call records go.
Every state is handled here, once: the adapters only translate their library's objects.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

from ...core.flow import (
    Acquire,
    Forward,
    Lookup,
    Outcome,
    ReadBody,
    ReadRequest,
    Release,
    Step,
    Tee,
    WaitFor,
    Write,
)

if TYPE_CHECKING:
    from ..session import CacheSession


class Upstream(Protocol):
    """The provider side of one request, in the adapter's HTTP (or gRPC) library."""

    def read_request(self) -> bytes: ...

    def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]: ...

    def read_body(self) -> bytes: ...


def drive(session: CacheSession, flow: Generator[Step, Any, Outcome], upstream: Upstream) -> Outcome:
    """Run one request's flow to its final state, publish its call record, and return the state.

    A single-flight lock taken on the way is given back if the provider call raises; once the
    flow returns, the flow (or, for a stream, :func:`end_stream`) gives it back.
    """
    calls = session.store_calls
    answer: Any = None
    held: Acquire | None = None
    # Values read with a lock (Acquire.look), for the Lookups that follow it: one round trip, not three.
    read_with_lock: dict[str, Any] = {}
    try:
        while True:
            try:
                step = flow.send(answer)
            except StopIteration as done:
                held = None
                return session.publish_outcome(done.value)
            if isinstance(step, Lookup):
                if step.storage_key in read_with_lock:
                    answer = read_with_lock.pop(step.storage_key)
                    continue
                answer = calls.read(step.storage_key)
                continue
            read_with_lock.clear()  # only for the Lookups right after the lock: never an older value
            if isinstance(step, ReadRequest):
                answer = upstream.read_request()
            elif isinstance(step, Forward):
                answer = upstream.forward(step.strip)
            elif isinstance(step, ReadBody):
                answer = upstream.read_body()
            elif isinstance(step, Write):
                answer = calls.write(*step)
            elif isinstance(step, Acquire):
                answer, read_with_lock = calls.acquire_and_read(*step)
                held = step if answer is True else None
            elif isinstance(step, WaitFor):
                answer = calls.wait_for(*step)
            elif isinstance(step, Release):
                calls.release(*step)
                held = answer = None
            else:
                unreachable(step)
    finally:
        if held is not None:
            calls.release(held.key, held.token)


def end_stream(session: CacheSession, tee: Tee, reached_eof: bool) -> None:
    """A recorded stream is over: store it if it is whole, complete its call record, give back its lock."""
    try:
        first_end = not tee.recorder.done  # a stream may be ended twice (closed, then collected)
        end = session.core.end_stream(tee, reached_eof)
        if end.write is not None:
            session.store_calls.write(*end.write)
        if end.record is not None:
            session.publish(end.record, replaces=tee.record)
            tee.record = end.record
        elif first_end:
            session.tell(tee.record)  # abandoned or broken: on_call still hears of it, once
    finally:
        release, tee.release = tee.release, None
        if release is not None:
            session.store_calls.release(*release)


def unreachable(step: NoReturn) -> NoReturn:
    raise TypeError(f"not a step of the cache's flow: {step!r}")
