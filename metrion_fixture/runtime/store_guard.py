"""What every store call of a request shares, sync or async: the circuit breaker, the counters, one warning.

A failing store is reported once, counted, and survived: the request goes on without the
cache. After a failure the breaker skips the store for a cool-down, so a dead store costs
one timeout per period, not one per request.
"""

from __future__ import annotations

import logging
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
