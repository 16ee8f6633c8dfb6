"""What a session did: counters and a bounded list of per-request records."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .records import BYPASS, ERROR, HIT, MISS, REFRESH, CallRecord

__all__ = ["CallRecord", "Ledger", "Stats"]  # CallRecord is re-exported: it used to live here

DEFAULT_MAX_RECORDS = 10_000


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    refreshes: int = 0
    bypassed: int = 0
    errors: int = 0  # answers the cache gave itself as errors (bad header, replay miss)
    store_errors: int = 0  # store reads or writes that failed; the request went on without cache
    store_skipped: int = 0  # of those, the ones skipped while the store's circuit breaker was open
    stored: int = 0  # entries written
    # The provider time of the stored answers hits served, summed over calls. Calls that ran at the same
    # time (threads, tasks) overlap, so this can exceed the wall-clock time saved: compare wall time.
    saved_seconds: float = 0.0
    input_tokens: int = 0  # spent: what the provider reported for the answers it gave
    output_tokens: int = 0
    cost_usd: float = 0.0  # of the calls whose model has a price
    saved_input_tokens: int = 0  # what hits did not spend
    saved_output_tokens: int = 0
    saved_usd: float = 0.0
    unpriced: int = 0  # calls with tokens but no price for their model: "cost unknown", not in the dollars

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
        self.sink: Any = None  # the ledger in the store (runtime.ledger.StoredLedger), fed by the session

    def record(self, record: CallRecord) -> CallRecord:
        with self._lock:
            counter = _COUNTER[record.status]
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            self.stats.saved_seconds += record.saved_seconds
            self._add_usage(record, 1)
            self.calls.append(record)
        return record

    def amend(self, record: CallRecord, amended: CallRecord) -> CallRecord:
        """Put ``amended`` in the place of ``record``: a stream's record, completed at its end (tokens and cost)."""
        with self._lock:
            self._add_usage(record, -1)
            self._add_usage(amended, 1)
            for index in range(len(self.calls) - 1, -1, -1):  # recent: found near the end
                if self.calls[index] is record:
                    self.calls[index] = amended
                    break
        return amended

    def _add_usage(self, record: CallRecord, sign: int) -> None:
        stats = self.stats
        stats.input_tokens += sign * (record.input_tokens or 0)
        stats.output_tokens += sign * (record.output_tokens or 0)
        stats.cost_usd += sign * (record.cost_usd or 0.0)
        stats.saved_input_tokens += sign * record.saved_input_tokens
        stats.saved_output_tokens += sign * record.saved_output_tokens
        stats.saved_usd += sign * (record.saved_usd or 0.0)
        if record.cost_usd is None and record.input_tokens is not None:
            stats.unpriced += sign
        elif record.saved_usd is None and record.saved_input_tokens:
            stats.unpriced += sign

    def count(self, counter: str) -> None:
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
