"""Recorded streams their caller dropped: neither read to the end nor closed.

A recorded stream holds its request's single-flight lock until it ends, and every identical
request waits for that lock. A caller that drops the response (an exception between two chunks, a
generator left unfinished, a gRPC call that has no close hook) would make them wait until the lock
expires (``single_flight_wait`` + 1 s). So each stream wrapper registers :func:`end_when_dropped`:
once the wrapper is garbage-collected, the stream is ended as a close would end it (stored only
if its terminator had arrived, its call record completed, its lock given back).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from ._sync.driver import end_stream

if TYPE_CHECKING:
    from ..core.flow import Tee
    from .session import CacheSession


def end_when_dropped(stream: object, session: CacheSession, tee: Tee) -> weakref.finalize[Any, Any]:
    """End ``tee`` once ``stream`` is garbage-collected; the wrapper calls ``.detach()`` on the
    result when the stream ends by itself. ``tee`` and ``session`` must not refer to ``stream``."""
    return weakref.finalize(stream, _end_dropped, session, tee)


def _end_dropped(session: CacheSession, tee: Tee) -> None:
    # A finalizer runs wherever the last reference went: maybe on an event loop's thread, maybe
    # inside a store call of this very session. The store calls (a write, a release: up to one
    # store timeout) run on a thread of their own.
    try:
        threading.Thread(
            target=end_stream, args=(session, tee, False), name="metrion-stream-dropped", daemon=True
        ).start()
    except RuntimeError:  # the interpreter is shutting down and starts no thread: end it here
        end_stream(session, tee, False)
