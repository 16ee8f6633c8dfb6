"""What every store call of a request shares, sync or async: the circuit breaker, the counters, one warning.

A failing store is reported once, counted, and survived: the request goes on without the
cache. After a failure the breaker skips the store for a cool-down, so a dead store costs
one timeout per period, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

from ..core.breaker import CircuitBreaker
from ..stores.base import Store

log = logging.getLogger("metrion_fixture")
FIRST_POLL, LAST_POLL = 0.005, 0.1  # seconds between looks while waiting for another caller's entry


class StoreGuard:
    def __init__(
        self, store: Store, breaker: CircuitBreaker, count: Callable[[str], None], monotonic: Callable[[], float]
    ) -> None:
        self.store, self.breaker, self._count, self.monotonic = store, breaker, count, monotonic
        self._warned = False

    def skipped(self, action: str) -> BaseException:
        error = self.breaker.skipped_error()
        self._count("store_skipped")
        self.failed(action, error, tried=False)
        return error

    def failed(self, action: str, error: BaseException, *, tried: bool = True) -> None:
        if tried:
            self.breaker.failed(error)
        self._count("store_errors")
        if not self._warned:
            self._warned = True
            log.warning(
                "metrion cache: could not %s the store %s (%s: %s); requests go to the provider without "
                "the cache; the store is skipped for %g s after each failure, and further failures are only "
                "counted in stats.store_errors",
                action,
                self.store.url,
                type(error).__name__,
                error,
                self.breaker.cooldown,
            )


def current_holder() -> object:
    """Who is asking: the running asyncio task, else the thread."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running in this thread
        task = None
    return task if task is not None else threading.get_ident()


class HeldLocks:
    """The single-flight locks this process holds, and which thread or task took each one.

    Single flight must never wait for itself: a thread (or task) that opens two identical
    streams before reading the first holds the lock the second would wait for. The driver asks
    :meth:`held_here` before taking a lock. A lock is forgotten when it is given back (by
    whoever gives it back: a stream may end in another thread) or when it expires.
    """

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self._held: dict[str, dict[str, tuple[object, float]]] = {}  # lock key -> token -> (holder, expiry)
        self._lock = threading.Lock()

    def held_here(self, key: str) -> bool:
        holders = self._held.get(key)
        if not holders:
            return False
        me, now = current_holder(), self._monotonic()
        with self._lock:
            return any(holder == me and now < expiry for holder, expiry in holders.values())

    def took(self, key: str, token: str, ttl_ms: int) -> None:
        with self._lock:
            self._held.setdefault(key, {})[token] = (current_holder(), self._monotonic() + ttl_ms / 1000)

    def gave_back(self, key: str, token: str) -> None:
        with self._lock:
            holders = self._held.get(key)
            if holders is not None:
                holders.pop(token, None)
                if not holders:
                    del self._held[key]

    def forget_all(self) -> None:
        self._lock = threading.Lock()
        self._held = {}


HELD_LOCKS = HeldLocks(time.monotonic)  # one per process: every session, sync and async
# A forked child holds none of its parent's locks (its main thread may even have the parent's id).
os.register_at_fork(after_in_child=HELD_LOCKS.forget_all)
