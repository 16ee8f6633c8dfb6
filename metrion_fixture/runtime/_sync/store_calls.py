# Generated from metrion_fixture/runtime/_async/store_calls.py by .ci/unasync.py: edit that file, not this one.
"""The store calls of a request, blocking, each through the session's circuit breaker."""

from __future__ import annotations

import time

from ...core.flow import HELD_HERE
from ..store_guard import FIRST_POLL, HELD_LOCKS, LAST_POLL, StoreGuard


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
    # Each lock call asks the breaker like every other store call, so a store that hangs costs
    # a request one timeout at most: after it, every later call of the request is skipped.
    def acquire(self, key: str, token: str, ttl_ms: int) -> bool | str:
        """True if taken (or the store cannot lock), False if held by another caller, HELD_HERE if by this one."""
        if HELD_LOCKS.held_here(key):
            return HELD_HERE
        if not self.breaker.allow():
            self.skipped("lock")
            return True
        try:
            taken = self.store.acquire(key, token, ttl_ms)
        except Exception as error:  # noqa: BLE001
            self.failed("lock", error)
            return True
        self.breaker.succeeded()
        if taken:
            HELD_LOCKS.took(key, token, ttl_ms)
        return taken

    def acquire_and_read(
        self, key: str, token: str, ttl_ms: int, look: tuple[str, ...] = ()
    ) -> tuple[bool | str, dict[str, bytes | None]]:
        """:meth:`acquire`, and once it is taken, the values of ``look`` read right after it (one round trip).

        Nothing is read when the lock is not taken or the store fails: the caller then reads as usual.
        """
        if not look or HELD_LOCKS.held_here(key) or not self.breaker.allow():
            return self.acquire(key, token, ttl_ms), {}
        try:
            taken, values = self.store.acquire_and_get(key, token, ttl_ms, look)
        except Exception as error:  # noqa: BLE001
            self.failed("lock", error)
            return True, {}
        self.breaker.succeeded()
        if not taken:
            return False, {}
        HELD_LOCKS.took(key, token, ttl_ms)
        return True, dict(zip(look, values, strict=True))

    def release(self, key: str, token: str) -> None:
        HELD_LOCKS.gave_back(key, token)
        if not self.breaker.allow():
            self.skipped("unlock")  # the lock expires by itself
            return
        try:
            self.store.release(key, token)
        except Exception as error:  # noqa: BLE001 - the lock expires by itself
            self.failed("unlock", error)
            return
        self.breaker.succeeded()

    def wait_for(self, storage_key: str, lock_key: str, deadline: float) -> bytes | None:
        """Poll for the entry another caller is producing: it, or None once its lock is gone or at the deadline.

        ``deadline`` is on the core's monotonic clock. A failed or skipped store call ends the
        wait at once (None): the caller goes to the provider.
        """
        delay = FIRST_POLL
        while True:
            value = self.read(storage_key)
            if isinstance(value, BaseException):
                return None
            if value is not None or self.monotonic() >= deadline:
                return value
            if not self.breaker.allow():
                self.skipped("lock")
                return None
            try:
                locked = self.store.locked(lock_key)
            except Exception as error:  # noqa: BLE001
                self.failed("lock", error)
                return None
            self.breaker.succeeded()
            if not locked:
                return None
            time.sleep(min(delay, max(0.0, deadline - self.monotonic())))
            delay = min(delay * 2, LAST_POLL)
