"""The one small interface every store implements: bytes in, bytes out, with a TTL.

A store knows nothing of entries, formats or HTTP. The engine hands it an opaque
value (an encoded entry) under a storage key; the value must be written whole
(a reader sees the old value, the new one, or nothing, never a part), and it
expires ``ttl_seconds`` after the write.
"""

from __future__ import annotations

import abc


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
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix``; return how many."""

    @abc.abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every live key that starts with ``prefix`` (for tools, not the hot path)."""

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(self, key: str, value: bytes, ttl_seconds: int) -> None:
        self.set(key, value, ttl_seconds)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

    async def aclose(self) -> None:
        """``close`` from async code, where clients bound to the running loop can close cleanly."""
        self.close()
