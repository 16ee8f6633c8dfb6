"""The call ledger kept in the store, so that savings add up across processes and machines.

Records are buffered in memory and written in batches (one store value of JSON
lines per batch, never pickle) under ``_ledger:{namespace}:{time}-{pid}-{random}``,
each expiring after the retention (default 30 days). A batch is written when it
is full, when a ``cache()`` block ends, on ``disable()`` and at interpreter exit,
so the request path itself only appends to a list. The ledger is bounded: at most
``MAX_BATCHES`` batches of ``BATCH_SIZE`` records per namespace, oldest dropped first.
A store that fails loses the batch (counted in ``dropped``), never a request.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from ..core.directives import check_ttl
from ..core.stats import CallRecord
from ..stores.base import Store

PREFIX = "_ledger:"
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600
RETENTION_ENV = "METRION_CACHE_LEDGER_RETENTION"  # a duration ("30d", "12h", seconds), or 0 to keep no ledger
BATCH_SIZE = 256
MAX_BATCHES = 4096  # per namespace: about a million calls
_TRIM_EVERY = 64  # batches written by this process between two checks of the bound

_open: weakref.WeakSet[StoredLedger] = weakref.WeakSet()


def retention_seconds(value: int | str | None = None) -> int:
    """The ledger retention in seconds: the option, else ``METRION_CACHE_LEDGER_RETENTION``, else 30 days; 0 = off."""
    if value is None:
        value = os.environ.get(RETENTION_ENV)
    if value is None or value == "":
        return DEFAULT_RETENTION_SECONDS
    if value in (0, "0"):
        return 0
    return check_ttl(value)


class StoredLedger:
    """The records of one session, on their way to the store."""

    def __init__(self, store: Store, namespace: str, retention: int, allow: Callable[[], bool] | None = None) -> None:
        self.store, self.namespace, self.retention = store, namespace, retention
        self._allow = allow  # the session's circuit breaker: a store known to be down is not waited on
        self.pending: list[CallRecord] = []
        self.dropped = 0  # records lost to a failing store
        self._lock = threading.Lock()
        self._written = 0
        _open.add(self)

    def add(self, record: CallRecord) -> None:
        if not self.retention or not record.key:
            return  # no ledger, or a call that never became an LLM request (kept out of the totals)
        with self._lock:
            self.pending.append(record)
            full = len(self.pending) >= BATCH_SIZE
        if full:
            self.flush()

    def replace(self, old: CallRecord, new: CallRecord) -> None:
        with self._lock:
            for index in range(len(self.pending) - 1, -1, -1):
                if self.pending[index] is old:
                    self.pending[index] = new
                    return

    def flush(self) -> int:
        """Write the pending records as one batch; return how many were written."""
        with self._lock:
            batch, self.pending = self.pending, []
        if not batch:
            return 0
        if self._allow is not None and not self._allow():
            self.dropped += len(batch)
            return 0
        # vars(), not dataclasses.asdict(): a record holds only flat values, and asdict's deep copy
        # cost more per record than the rest of a hit.
        value = "\n".join(json.dumps(vars(r), separators=(",", ":")) for r in batch).encode()
        key = f"{PREFIX}{self.namespace}:{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.store.set(key, value, self.retention)
            self._written += 1
            if self._written % _TRIM_EVERY == 0:
                trim(self.store, self.namespace)
        except Exception:  # noqa: BLE001 - the ledger must never fail a caller
            self.dropped += len(batch)
            return 0
        return len(batch)


def trim(store: Store, namespace: str, keep: int = MAX_BATCHES) -> int:
    """Drop the oldest batches beyond ``keep``; return how many were dropped."""
    keys = sorted(store.keys(f"{PREFIX}{namespace}:"))
    extra = keys[: max(0, len(keys) - keep)]
    for key in extra:
        store.delete_prefix(key)
    return len(extra)


def flush_all() -> None:
    for ledger in list(_open):
        ledger.flush()


atexit.register(flush_all)


def read_records(store: Store, namespace: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
    """Every stored record (of one namespace, or all), oldest first, as dicts with a ``namespace`` field."""
    prefix = PREFIX if namespace is None else f"{PREFIX}{namespace}:"
    records = []
    for key in store.keys(prefix):
        space = key[len(PREFIX) :].rpartition(":")[0]
        value = store.get(key)
        for line in _lines(value):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (since is None or record.get("at", 0) >= since):
                records.append({**record, "namespace": space})
    records.sort(key=lambda record: record.get("at", 0))
    return records


def _lines(value: bytes | None) -> Iterable[str]:
    return value.decode("utf-8", "replace").splitlines() if value else ()
