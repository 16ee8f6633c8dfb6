"""A cache session: settings, a store, and what happened. The transports serve the active one."""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.breaker import CircuitBreaker
from ..core.engine import PlanMemo, Settings
from ..core.entry import RecentEntries
from ..core.flow import CacheCore, Outcome, Tee
from ..core.options import (  # noqa: F401 - importable from here, as before
    DEFAULT_SINGLE_FLIGHT_WAIT,
    URL_ENV,
    CacheOptions,
    check_on_call,
    options_from_arguments,
)
from ..core.stats import CallRecord, Ledger, Stats
from ..reporting import prices
from ..stores import default_store_url, open_store
from ..stores.base import Store
from . import sources
from ._async.store_calls import AsyncStoreCalls
from ._sync.store_calls import StoreCalls
from .ledger import shared_sink

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..core.options import CacheOptionValues

# Shared by every session of the process: sessions are cheap (one per test, per cell), and the
# same request again is the case a cache exists for.
_RECENT_PLANS = PlanMemo()
_RECENT_ENTRIES = RecentEntries()


class CacheSession:
    """The cache as one caller configured it.

    ``url`` picks the store (``redis://``, ``rediss://``, ``unix://``, ``sqlite:///PATH``,
    ``memory://``); without one, ``METRION_CACHE_URL``, else the embedded SQLite file
    ``.metrion_cache/cache.sqlite3`` under the current directory. ``mode`` is the
    default for requests without an ``x-metrion-cache`` header: ``true``, ``refresh``,
    ``off`` or ``replay``. ``scope="credential"`` (or ``METRION_CACHE_SCOPE=credential``)
    keeps entries private to the API key that paid for them; the default, ``shared``,
    shares them within the namespace. Bad options raise :class:`MetrionCacheError` here, at once.
    """

    def __init__(
        self,
        url: str | None = None,
        /,
        *,
        options: CacheOptions | None = None,
        on_call: Callable[[CallRecord], object] | None = None,
        **overrides: Unpack[CacheOptionValues],
    ) -> None:
        """Options as keyword arguments, or ``options`` (a :class:`CacheOptions`) with keyword overrides.

        Without ``options``, what the arguments leave out comes from the environment, then the defaults.
        ``on_call`` is called with each call's record once it is counted (for a progress bar): on the
        thread that made the call, so it must be quick and thread-safe; what it raises is warned
        about once, never passed to the caller.
        """
        self.on_call = check_on_call(on_call)
        self._on_call_failed = False
        self.started = time.monotonic()  # for wall_seconds
        # ``url`` is positional-only so that ``url=`` lands in ``overrides`` too: both spellings keep working.
        self.options = options_from_arguments(url, options, overrides, os.environ)
        chosen = self.options
        self.settings = Settings.from_options(chosen)
        self.store: Store = open_store(chosen.url or default_store_url())
        self.ledger = Ledger(max_records=chosen.max_records)
        # After a store failure, skip the store for ``store_cooldown`` seconds: one timeout per period.
        self.breaker = CircuitBreaker(chosen.store_cooldown)
        # Calls are also kept in the store (batched, expiring) so `metrion-cache stats` sees every process.
        breaker = self.breaker
        self.ledger.sink = shared_sink(
            self.store,
            chosen.namespace,
            chosen.ledger_retention,
            # Only while the store is healthy, and without counting as a store call of a request.
            allow=lambda: breaker.state == "closed",
        )
        self._start_runtime()
        if chosen.source is None:
            self.core.source = sources.detect()
            sources.follow(self)
        else:
            self.core.source = chosen.source

    @property
    def source(self) -> str:
        """Where this session's calls come from: the ``source`` option, else the test, cell or script."""
        return self.core.source

    @property
    def wall_seconds(self) -> float:
        """Wall-clock seconds since this session was made: what ``stats.saved_seconds`` compares with."""
        return time.monotonic() - self.started

    @property
    def single_flight_wait(self) -> float:
        """How long a request waits for an identical one already asking the provider (0: never waits)."""
        return self.settings.single_flight_wait

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def stats(self) -> Stats:
        return self.ledger.stats

    @property
    def calls(self) -> list[CallRecord]:
        """The most recent requests, oldest first (bounded by ``max_records``)."""
        return list(self.ledger.calls)

    def with_mode(self, mode: str) -> CacheSession:
        """This session in another mode: the same store, namespace, TTL, stats and records."""
        other = copy.copy(self)
        other.options = self.options.replace(mode=mode)
        other.settings = Settings.from_options(other.options)
        other.core = self.core.with_settings(other.settings)
        return other

    def flush_ledger(self, wait: bool = True) -> int:
        """Write the calls not yet in the store's ledger now; return how many were written.

        Also done when a ``cache()`` block ends and at exit. On a thread that runs an event loop
        (a notebook cell, async code) the write can wait seconds on the store, so it is handed
        to the ledger's own thread and this returns 0 at once: the records reach the store
        shortly after, not before this returns. ``wait=False`` does that on any thread, and the
        ledger thread writes them with whatever else is pending within a second (the end of each
        test or cell: one batch for many of them, none waiting on the store). The sessions of a
        process on the same store and namespace share their pending records: this writes them all.
        """
        return self.ledger.sink.flush(wait) if self.ledger.sink is not None else 0

    def clear(self) -> int:
        """Delete this namespace's entries from the store; return how many."""
        return self.store.delete_prefix(f"{self.settings.namespace}:")

    def _start_runtime(self) -> None:
        self.core = CacheCore(self.settings, plans=_RECENT_PLANS, entries=_RECENT_ENTRIES, pricing=prices)
        self._wire_store_calls()

    def _wire_store_calls(self) -> None:
        # One breaker and one set of counters for the sync and async calls of this session.
        guard = (self._store, self._breaker, self.ledger.count, self.core.clock.monotonic)
        self.store_calls = StoreCalls(*guard)
        self.async_store_calls = AsyncStoreCalls(*guard)

    # The store and the breaker can be swapped on a live session (tests do): the calls follow.
    @property
    def store(self) -> Store:
        return self._store

    @store.setter
    def store(self, store: Store) -> None:
        self._store = store
        if hasattr(self, "store_calls"):
            self._wire_store_calls()

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    @breaker.setter
    def breaker(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        if hasattr(self, "store_calls"):
            self._wire_store_calls()

    def publish(self, record: CallRecord, replaces: CallRecord | None = None, *, final: bool = True) -> CallRecord:
        """Count a call and keep its record (in place of ``replaces``: a stream's, completed at its end).

        ``on_call`` hears of each call once, with its final record: a stream from the provider is
        published with ``final=False`` when it starts (its tokens are not known yet), then again
        completed at its end, or handed to :meth:`tell` if it ends without a completed record.
        """
        sink = self.ledger.sink
        if replaces is None:
            self.ledger.record(record)
            if sink is not None:
                sink.add(record)
        else:
            self.ledger.amend(replaces, record)
            if sink is not None:
                sink.replace(replaces, record)
        if final:
            self.tell(record)
        return record

    def tell(self, record: CallRecord) -> None:
        """Give ``on_call`` a call's final record (already counted)."""
        if self.on_call is not None:
            self._tell(record)

    def _tell(self, record: CallRecord) -> None:
        assert self.on_call is not None
        try:
            self.on_call(record)
        except Exception as error:  # noqa: BLE001 - a progress bar must never fail a request
            if not self._on_call_failed:
                self._on_call_failed = True
                warnings.warn(
                    f"metrion cache: on_call raised {type(error).__name__}: {error}; the call went on "
                    "(warned once per session)",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def publish_outcome(self, outcome: Outcome) -> Outcome:
        """Publish the call record of a request's final state; returns the state."""
        if outcome.record is not None:
            self.publish(outcome.record, final=not isinstance(outcome, Tee))
        return outcome

    def __repr__(self) -> str:
        return f"CacheSession(url={self.url!r}, mode={self.mode!r}, namespace={self.settings.namespace!r})"
