"""A circuit breaker for the store: a dead store costs one timeout per cool-down, not one per request.

Closed, every store call goes through. After a failure the breaker opens: for
``cooldown`` seconds store calls are skipped at once (the request goes on
without the cache, or gets the replay refusal). When the cool-down is over, the next
call probes the store (half-open) while others keep skipping for another period;
a success closes the breaker, a failure opens it again. No I/O here: the clock
is injected so tests can move time without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEFAULT_COOLDOWN_SECONDS = 10.0


class StoreSkipped(ConnectionError):
    """Raised in place of a store call the open breaker skipped; names the failure that opened it."""


class CircuitBreaker:
    """Thread-safe; shared by the sync and async paths of a session (and its ``with_mode`` copies)."""

    def __init__(self, cooldown: float = DEFAULT_COOLDOWN_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(cooldown, bool) or not isinstance(cooldown, (int, float)) or cooldown < 0:
            raise ValueError(f"invalid store cool-down {cooldown!r}; use a number of seconds >= 0")
        self.cooldown = float(cooldown)
        self.clock = clock
        self._lock = threading.Lock()
        self._open_until: float | None = None
        self.last_error: BaseException | None = None
        self.attempts = 0  # store calls let through (approximate under threads)
        self.failures = 0  # of those, the ones that failed
        self.skipped = 0  # store calls not made because the breaker was open

    @property
    def state(self) -> str:
        with self._lock:
            if self._open_until is None:
                return "closed"
            return "open" if self.clock() < self._open_until else "half-open"

    def allow(self) -> bool:
        """Whether to call the store now; False means skip it (and count it)."""
        if self._open_until is None:  # closed: the hot path takes no lock (the counter is for diagnostics)
            self.attempts += 1
            return True
        with self._lock:
            if self._open_until is not None:
                now = self.clock()
                if now < self._open_until:
                    self.skipped += 1
                    return False
                # Half-open: this call probes; the others skip until it reports or another period ends.
                self._open_until = now + self.cooldown
            self.attempts += 1
            return True

    def succeeded(self) -> None:
        if self._open_until is None:
            return
        with self._lock:
            self._open_until = None

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = error
            self._open_until = self.clock() + self.cooldown

    def skipped_error(self) -> StoreSkipped:
        last = self.last_error
        cause = f"{type(last).__name__}: {last}" if last is not None else "an earlier failure"
        return StoreSkipped(
            f"store skipped for up to {self.cooldown:g} s after it failed ({cause}); it is tried again after that"
        )
