"""An in-process store: a dict guarded by a lock, for tests and one-off notebooks."""

from __future__ import annotations

import threading
import time

from metrion_fixture.stores.base import Store

# Expired entries are only dropped when read, so sweep now and then to bound memory.
_SWEEP_EVERY = 1000


class MemoryStore(Store):
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._data: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self._sets = 0

    def _live(self, key: str, now: float) -> tuple[bytes, float] | None:
        item = self._data.get(key)
        if item is not None and item[1] <= now:
            del self._data[key]
            return None
        return item

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._live(key, time.time())
        return None if item is None else item[0]

    def set(self, key: str, value: bytes, ttl_seconds: int) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds!r}")
        value = bytes(value)  # a caller's bytearray must not change what is stored
        now = time.time()
        with self._lock:
            self._data[key] = (value, now + ttl_seconds)
            self._sets += 1
            if self._sets % _SWEEP_EVERY == 0:
                self._data = {k: v for k, v in self._data.items() if v[1] > now}

    def ttl(self, key: str) -> float | None:
        now = time.time()
        with self._lock:
            item = self._live(key, now)
        return None if item is None else item[1] - now

    def delete(self, key: str) -> bool:
        with self._lock:
            item = self._data.pop(key, None)
        return item is not None and item[1] > time.time()

    def delete_prefix(self, prefix: str) -> int:
        now = time.time()
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            live = 0
            for k in doomed:
                live += self._data.pop(k)[1] > now
        return live

    def keys(self, prefix: str) -> list[str]:
        now = time.time()
        with self._lock:
            return sorted(k for k, (_, exp) in self._data.items() if exp > now and k.startswith(prefix))
