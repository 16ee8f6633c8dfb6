"""Values a process read lately from a shared store, kept in its memory.

A hit read again in the same process (a test suite or a notebook asking the same
question twice) then costs a dict lookup instead of a round trip to Redis or a
SQLite query. The store that owns a near cache keeps it coherent: it drops what
changed before it serves anything from here (Redis tells it through client
tracking, SQLite through ``PRAGMA data_version``). This class is only the bounded
map; it is not thread-safe, its owner locks it or keeps one per thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# A value this large is rare and cheap to read relative to its size; it would evict many small ones.
DEFAULT_MAX_VALUE_BYTES = 4 * 1024 * 1024


class NearCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> None:
        self.max_bytes, self.max_value_bytes = max_bytes, min(max_value_bytes, max_bytes)
        self._values: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str, now: float) -> bytes | None:
        """The value kept for ``key`` if it has not expired by ``now`` (wall-clock seconds)."""
        found = self._values.get(key)
        if found is None:
            return None
        if found[1] <= now:
            self.discard(key)
            return None
        self._values.move_to_end(key)  # least recently used goes first
        return found[0]

    def put(self, key: str, value: bytes, expires_at: float = math.inf) -> None:
        self.discard(key)
        if len(value) > self.max_value_bytes:
            return
        self._values[key] = (value, expires_at)
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            _, (oldest, _) = self._values.popitem(last=False)
            self._bytes -= len(oldest)

    def discard(self, key: str) -> None:
        found = self._values.pop(key, None)
        if found is not None:
            self._bytes -= len(found[0])

    def clear(self) -> None:
        self._values.clear()
        self._bytes = 0
