"""The one line a batch script prints on stderr at exit: what the cache did for the sessions ``enable()`` made.

``enable(report=False)`` or ``METRION_CACHE_REPORT=0`` leaves a session out. The pytest plugin and the
notebook magic have reports of their own, so a pytest run prints none and ``%metrion_cache on`` asks
for none.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import fields
from typing import TYPE_CHECKING, TextIO

from ..core.stats import Stats

if TYPE_CHECKING:
    from ..runtime.session import CacheSession

_lock = threading.Lock()
_sessions: list[CacheSession] = []
_started: float | None = None  # monotonic: the first enable() with a report
_quiet = False
_registered = False


def watch(session: CacheSession) -> None:
    """Count ``session`` in the line printed at exit (its calls, and the wall time since the first one watched)."""
    global _started, _registered
    with _lock:
        if _started is None:
            _started = session.started
        if all(session.ledger is not other.ledger for other in _sessions):
            _sessions.append(session)
        if not _registered:
            _registered = True
            atexit.register(print_summary)


def silence() -> None:
    """No line at exit: the process has a report of its own (a pytest run)."""
    global _quiet
    _quiet = True


def combined(each: Iterable[Stats]) -> Stats:
    """The sum of several sessions' stats (a Stats shared by two sessions counts once)."""
    total = Stats()
    for stats in {id(stats): stats for stats in each}.values():
        for field in fields(Stats):
            setattr(total, field.name, getattr(total, field.name) + getattr(stats, field.name))
    return total


def summary_line(stats: Stats, wall_seconds: float) -> str:
    """``metrion cache: 40 calls, 32 from cache, 8 from the provider; saved ...; ... wall time 10.3 s``.

    ``saved_seconds`` is the provider time of every answer served from the cache, added up call by
    call: with calls on 8 threads it can be about eight times the wall-clock time they saved, so
    the wall time is printed beside it.
    """
    # Not at import: the pytest plugin imports this module at every start-up (tests/test_startup.py).
    from .reports import duration, money, plural

    if not stats.requests:
        return f"metrion cache: no LLM calls reached the cache (wall time {duration(wall_seconds)})"
    from_provider = stats.misses + stats.refreshes + stats.bypassed
    counts = [plural(stats.requests, "call"), f"{stats.hits} from cache", f"{from_provider} from the provider"]
    if stats.errors:
        counts.append(f"{stats.errors} refused by the cache")
    parts = [", ".join(counts)]
    saved_tokens = stats.saved_input_tokens + stats.saved_output_tokens
    if saved_tokens:
        price = f" ({money(stats.saved_usd)})" if stats.saved_usd else " (no price for their model)"
        parts.append(f"saved {plural(saved_tokens, 'token')}{price}")
    parts.append(
        f"provider time saved {duration(stats.saved_seconds)} (summed over calls, which overlap when "
        f"concurrent), wall time {duration(wall_seconds)}"
    )
    return "metrion cache: " + "; ".join(parts)


def print_summary(file: TextIO | None = None) -> None:
    """Print the line for the sessions watched, unless silenced (run at exit)."""
    with _lock:
        sessions, started = list(_sessions), _started
    if _quiet or not sessions or started is None:
        return
    line = summary_line(combined(session.stats for session in sessions), time.monotonic() - started)
    try:
        print(line, file=file or sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed (a daemon): nothing to tell
        pass
