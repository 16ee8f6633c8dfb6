"""The library API: turn the cache on for every httpx / httpx2 client in the process."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .core.options import CacheOptions, check_report
from .core.records import CallRecord
from .integrations import patching
from .reporting import run_summary
from .runtime.activation import (
    enter_context_block,
    enter_process_block,
    exit_context_block,
    exit_process_block,
    set_enabled,
)
from .runtime.session import CacheSession

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .core.options import CacheOptionValues


def enable(
    url: str | None = None,
    /,
    *,
    options: CacheOptions | None = None,
    report: bool | None = None,
    on_call: Callable[[CallRecord], object] | None = None,
    **overrides: Unpack[CacheOptionValues],
) -> CacheSession:
    """Cache every LLM request of this process until :func:`disable`.

    Takes the options of :class:`CacheSession` (``mode``, ``ttl``, ``namespace``, ...: see
    :class:`~metrion_fixture.core.options.CacheOptions`), or ``options`` made beforehand.
    Calling it again replaces the session (the patch stays installed once).
    Options are checked at once: a bad one raises :class:`MetrionCacheError`.

    At exit, one line on stderr says what the cache did (calls, hits, tokens and dollars saved,
    provider time saved beside the wall time) unless ``report=False`` or ``METRION_CACHE_REPORT=0``.
    ``on_call`` is called with each call's record, e.g. to move a progress bar.
    """
    wanted = check_report(report, os.environ)
    session = CacheSession(url, options=options, on_call=on_call, **overrides)
    if wanted:
        run_summary.watch(session)
    if set_enabled(session) is None:
        patching.install()
    return session


def disable() -> None:
    """Undo :func:`enable`. ``cache()`` blocks still open keep their sessions."""
    previous = set_enabled(None)
    if previous is not None:
        patching.uninstall()
        previous.flush_ledger()


@contextmanager
def cache(
    url: str | None = None,
    /,
    *,
    session: CacheSession | None = None,
    options: CacheOptions | None = None,
    on_call: Callable[[CallRecord], object] | None = None,
    **overrides: Unpack[CacheOptionValues],
) -> Iterator[CacheSession]:
    """Cache LLM requests made inside the block by this thread or task (and the tasks it starts).

    Takes the options of :func:`enable` (and ``on_call``), or a ``session`` already made. Nestable,
    and restores what was active before. A sibling task or another thread is not covered: see
    :mod:`metrion_fixture.runtime.activation`.
    """
    if session is None:
        session = CacheSession(url, options=options, on_call=on_call, **overrides)
    elif (
        url is not None
        or options is not None
        or on_call is not None
        or any(value is not None for value in overrides.values())
    ):
        raise TypeError("cache() takes a session or options for a new one, not both: the options would be ignored")
    patching.install()
    token = enter_context_block(session)
    try:
        yield session
    finally:
        exit_context_block(token)
        patching.uninstall()
        session.flush_ledger()


@contextmanager
def covering_process(session: CacheSession, *, ledger_now: bool = True) -> Iterator[CacheSession]:
    """Cache every thread's LLM requests while the block runs: a pytest test, a notebook cell.

    At its end the block's calls go to the store's ledger at once (a notebook kernel may be killed
    any time after its cell), or with ``ledger_now=False`` within a second, with those of the blocks
    that end meanwhile (a test suite's tests: one batch for many tests, none waiting on the store).
    """
    patching.install()
    enter_process_block(session)
    try:
        yield session
    finally:
        exit_process_block(session)
        patching.uninstall()
        session.flush_ledger(wait=ledger_now)
