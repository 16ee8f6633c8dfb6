# Generated from metrion_fixture/runtime/_async/store_calls.py by .ci/unasync.py: edit that file, not this one.
"""The store calls of a request, blocking, each through the session's circuit breaker."""

from __future__ import annotations

import time

from ..store_guard import FIRST_POLL, LAST_POLL, StoreGuard


class StoreCalls(StoreGuard):
    def read(self, storage_key: str) -> bytes | None | BaseException:
        """The stored value, None if absent, or the exception (returned, never raised) if the store failed."""
        if not self.breaker.allow():
            return self.skipped("read")
        try:
            value = self.store.get(storage_key)
        except Exception as error:  # noqa: BLE001 - any store failure means "no cache", never a failed request
            self.failed("read", error)
            return error
        self.breaker.succeeded()
        return value

    def write(self, storage_key: str, value: bytes, ttl: int) -> bool:
        """Store an entry; False (counted, never raised) if the store failed or was skipped."""
        if not self.breaker.allow():
            self.skipped("write")
            return False
        try:
            self.store.set(storage_key, value, ttl)
        except Exception as error:  # noqa: BLE001
            self.failed("write", error)
            return False
        self.breaker.succeeded()
        self._count("stored")
        return True

    # Single-flight locks. A lock that cannot be taken because the store fails means "go ahead
    # without it" (True): coordination is an optimisation, never a reason to fail or to wait.
    def acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        if self.breaker.state == "open":
            return True
        try:
            return self.store.acquire(key, token, ttl_ms)
        except Exception as error:  # noqa: BLE001
            self.failed("lock", error)
            return True

    def release(self, key: str, token: str) -> None:
        try:
            self.store.release(key, token)
        except Exception as error:  # noqa: BLE001 - the lock expires by itself
            self.failed("unlock", error)

    def wait_for(self, storage_key: str, lock_key: str, deadline: float) -> bytes | None:
        """Poll for the entry another caller is producing: it, or None once its lock is gone or at the deadline.

        ``deadline`` is on the core's monotonic clock.
        """
        delay = FIRST_POLL
        while True:
            value = self.read(storage_key)
            if value is not None or self.monotonic() >= deadline:
                return value if isinstance(value, bytes) else None
            try:
                if not self.store.locked(lock_key):
                    return None
            except Exception as error:  # noqa: BLE001
                self.failed("lock", error)
                return None
            time.sleep(min(delay, max(0.0, deadline - self.monotonic())))
            delay = min(delay * 2, LAST_POLL)
