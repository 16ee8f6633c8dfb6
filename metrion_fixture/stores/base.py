"""The one small interface every store implements: bytes in, bytes out, with a TTL.

A store knows nothing of entries, formats or HTTP. The engine hands it an opaque
value (an encoded entry) under a storage key; the value must be written whole
(a reader sees the old value, the new one, or nothing, never a part), and it
expires ``ttl_seconds`` after the write.
"""

from __future__ import annotations

import abc
import threading
import time


class Store(abc.ABC):
    """A key-value store with expiry, sync and async.

    ``url`` is the URL the store was opened with, with any password masked, for
    display. Implementations may raise any exception on I/O failure: the engine
    treats every exception from a store as "the cache is down" and degrades to
    no cache, so stores must not swallow errors to look healthy.
    """

    url: str

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None if absent or expired."""

    @abc.abstractmethod
    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        """Store ``value`` atomically under ``key``, replacing any old value."""

    @abc.abstractmethod
    def ttl(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or None if it does not exist."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete exactly ``key`` (never a longer key it is a prefix of); True if it was live."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix``; return how many."""

    @abc.abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every live key that starts with ``prefix`` (for tools, not the hot path)."""

    # Single-flight locks: one caller computes an entry while the others wait for it. A lock
    # expires by itself, so a holder that dies never blocks anyone for longer than ``ttl_ms``.
    # The defaults hold locks in this process only (right for memory://); shared stores override
    # them so that processes sharing the store also share the locks.
    def acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        """Take the lock ``key`` for ``token`` unless someone holds it; True if taken."""
        now = time.monotonic()
        with _local_locks_guard:
            locks = _local_locks.setdefault(id(self), {})
            held = locks.get(key)
            if held is not None and held[1] > now:
                return False
            locks[key] = (token, now + ttl_ms / 1000)
            return True

    def release(self, key: str, token: str) -> None:
        """Release the lock ``key`` if ``token`` still holds it (an expired, re-taken lock is left alone)."""
        with _local_locks_guard:
            locks = _local_locks.get(id(self), {})
            held = locks.get(key)
            if held is not None and held[0] == token:
                del locks[key]

    def acquire_and_get(
        self, key: str, token: str, ttl_ms: int, keys: tuple[str, ...]
    ) -> tuple[bool, list[bytes | None]]:
        """:meth:`acquire`, then, if taken, :meth:`get` of each of ``keys`` (read after the lock is held).

        A networked store does both in one round trip.
        """
        if not self.acquire(key, token, ttl_ms):
            return False, []
        return True, [self.get(each) for each in keys]

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        """:meth:`get` of each of ``keys``; a networked store reads them in one round trip."""
        return [self.get(key) for key in keys]

    def warm(self, keys: list[str]) -> int:
        """Read ``keys`` ahead of their first use into this process's memory, if the store keeps one
        that saves a round trip per read (Redis's near cache); returns how many were kept."""
        return 0

    def locked(self, key: str) -> bool:
        """Whether someone holds the lock ``key`` now."""
        with _local_locks_guard:
            held = _local_locks.get(id(self), {}).get(key)
            return held is not None and held[1] > time.monotonic()

    # The async twins call the blocking methods on the loop's thread: right only for a store that
    # never waits (memory://). A store that can (on a lock, on the network) overrides them, so that
    # an event loop never stops for it.
    async def aacquire(self, key: str, token: str, ttl_ms: int) -> bool:
        return self.acquire(key, token, ttl_ms)

    async def aacquire_and_get(
        self, key: str, token: str, ttl_ms: int, keys: tuple[str, ...]
    ) -> tuple[bool, list[bytes | None]]:
        if not await self.aacquire(key, token, ttl_ms):
            return False, []
        return True, [await self.aget(each) for each in keys]

    async def arelease(self, key: str, token: str) -> None:
        self.release(key, token)

    async def alocked(self, key: str) -> bool:
        return self.locked(key)

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(self, key: str, value: bytes, ttl_seconds: int) -> None:
        self.set(key, value, ttl_seconds)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

    async def aclose(self) -> None:
        """``close`` from async code, where clients bound to the running loop can close cleanly."""
        self.close()


# In-process locks of the stores that do not share them (keyed by store id; stores live as long as the process).
_local_locks: dict[int, dict[str, tuple[str, float]]] = {}
_local_locks_guard = threading.Lock()
