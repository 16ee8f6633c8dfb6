"""What a session did: counters and a bounded list of per-request records."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .engine import BYPASS, ERROR, HIT, MISS, REFRESH

DEFAULT_MAX_RECORDS = 10_000


@dataclass(frozen=True)
class CallRecord:
    """One request that reached the cache."""

    key: str
    wire_format: str
    model: str
    status: str  # HIT, MISS, REFRESH, BYPASS or ERROR
    stream: bool
    latency: float  # seconds until the response (its headers, for streams) reached the caller
    http_status: int
    saved_seconds: float = 0.0  # on a hit: how long the provider took for the stored answer
    at: float = 0.0  # wall-clock time of the request


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    refreshes: int = 0
    bypassed: int = 0
    errors: int = 0  # answers the cache gave itself as errors (bad header, replay miss)
    store_errors: int = 0  # store reads or writes that failed; the request went on without cache
    stored: int = 0  # entries written
    saved_seconds: float = 0.0

    @property
    def requests(self) -> int:
        return self.hits + self.misses + self.refreshes + self.bypassed + self.errors

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "requests": self.requests}


_COUNTER = {HIT: "hits", MISS: "misses", REFRESH: "refreshes", BYPASS: "bypassed", ERROR: "errors"}


@dataclass
class Ledger:
    """Thread-safe counters plus the most recent records, bounded for long batch jobs."""

    max_records: int = DEFAULT_MAX_RECORDS
    stats: Stats = field(default_factory=Stats)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: deque[CallRecord] = deque(maxlen=self.max_records)

    def record(self, record: CallRecord) -> None:
        with self._lock:
            counter = _COUNTER[record.status]
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            self.stats.saved_seconds += record.saved_seconds
            self.calls.append(record)

    def count(self, counter: str) -> None:
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
