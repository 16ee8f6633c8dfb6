"""The call ledger kept in the store, so that savings add up across processes and machines.

Records are buffered in memory and written in batches (one store value of JSON
lines per batch, never pickle) under ``_ledger:{namespace}:{time}-{pid}-{random}``,
each expiring after the retention (default 30 days). The request path only appends
to a list: a full batch is written by the ledger's own thread (one per process, a
daemon), since a write can wait seconds on a store (SQLite's busy timeout, a Redis
that does not answer) and a request, or an event loop, must not. Whatever is left
is written by :meth:`StoredLedger.flush`: when a ``cache()`` block ends, on
``disable()`` and at interpreter exit; when a test or a notebook cell ends, the ledger thread
writes it within ``WRITE_EVERY`` (``flush(wait=False)``). Sessions of one process on the same
store and namespace share one :class:`StoredLedger` (:func:`shared_sink`), so the records of a
test suite's many sessions (one per test) fill the same batches. The ledger is bounded: at most
``MAX_BATCHES`` batches of ``BATCH_SIZE`` records per namespace, oldest dropped first.
A write that fails keeps its records for a later one (at most ``MAX_PENDING`` per
session; beyond that new records are counted in ``dropped``), and never fails a request.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import sys
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
MAX_PENDING = 64 * BATCH_SIZE  # per session, while the store fails: a few MB at most
WRITE_EVERY = 1.0  # seconds between the ledger thread's looks for batches to write or to retry
RETRY_AT_MOST = 30.0  # seconds: the longest wait between two tries of a store that keeps failing
_TRIM_EVERY = 64  # batches written by this process between two checks of the bound

_open: weakref.WeakSet[StoredLedger] = weakref.WeakSet()
_open_lock = threading.Lock()  # the ledger thread lists _open while requests open sessions


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
        # Each record with its JSON line, encoded by the caller that adds it (3 us): encoding a batch of
        # 256 on the ledger thread held the GIL for 0.8 ms at a time, which the requests of a busy loop
        # waited for (their p99; benchmarks/README.md, issue 15).
        self.pending: list[tuple[CallRecord, str]] = []
        self.dropped = 0  # records never written: beyond MAX_PENDING while the store failed
        self._lock = threading.Lock()  # guards pending
        self._writing = threading.Lock()  # one writer at a time: the ledger thread or flush()
        self._written = 0
        self._failures = 0  # writes failed in a row
        self._retry_at = 0.0  # the ledger thread leaves a failing store alone until then
        self._wanted = False  # everything pending should be written, not only full batches
        # The key of a write that failed: it may have reached the store all the same (a Redis
        # timeout after the SET), so the retry of the same records overwrites it, never adds to it.
        # (its first record, its key, how many records it held)
        self._unsure: tuple[tuple[CallRecord, str], str, int] | None = None
        with _open_lock:
            _open.add(self)

    def add(self, record: CallRecord) -> None:
        if not self.retention or not record.key:
            return  # no ledger, or a call that never became an LLM request (kept out of the totals)
        line = _line(vars(record))
        with self._lock:
            if len(self.pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self.pending.append((record, line))
            full = len(self.pending) % BATCH_SIZE == 0
        if full:
            _thread.wake()

    def unwritten(self) -> list[dict[str, Any]]:
        """The records not yet in the store, as :func:`read_records` gives them (a live dashboard adds them)."""
        with self._lock:
            pending = list(self.pending)
        return [{**vars(record), "namespace": self.namespace} for record, _ in pending]

    def replace(self, old: CallRecord, new: CallRecord) -> None:
        line = _line(vars(new))
        with self._lock:
            for index in range(len(self.pending) - 1, -1, -1):
                if self.pending[index][0] is old:
                    self.pending[index] = (new, line)
                    return

    def flush(self, wait: bool = True) -> int:
        """Write every pending record now, in batches; return how many were written.

        On a thread that runs an event loop the write is handed to the ledger thread (it can
        wait seconds on the store) and 0 is returned. Records a failed write kept are tried
        again by the ledger thread. ``wait=False`` leaves the write to the ledger thread's next
        look (within ``WRITE_EVERY``), so that the records of the blocks that end meanwhile (each
        test of a suite) go in one batch, not one each, and no block waits on the store.
        """
        if wait and not _on_event_loop():
            return self._write(everything=True)
        self._wanted = True
        _thread.wake(now=wait)  # an event loop's flush: at once; wait=False: at the next look
        return 0

    def _write(self, everything: bool) -> int:
        written = 0
        with self._writing:
            if everything:
                self._wanted = False  # before the write: a flush asked for meanwhile is not lost
            while True:
                with self._lock:
                    count = min(len(self.pending), BATCH_SIZE)
                    # Only this method removes records, and only from the front (under _writing):
                    # the first ``count`` stay the batch while it is written.
                    batch = self.pending[:count]
                if not batch or (count < BATCH_SIZE and not everything):
                    break
                done = self._write_batch(batch)
                if not done:
                    self._failures += 1
                    self._retry_at = time.monotonic() + min(RETRY_AT_MOST, WRITE_EVERY * 2 ** (self._failures - 1))
                    self._wanted = self._wanted or everything
                    _thread.wake()  # make sure there is a thread to try again
                    return written
                with self._lock:
                    del self.pending[:done]
                written += done
            self._failures = 0
        return written

    def _write_batch(self, batch: list[tuple[CallRecord, str]]) -> int:
        """Write the batch's first records as one stored batch; return how many (0: none, try again)."""
        if self._allow is not None and not self._allow():
            return 0
        if self._unsure is not None and self._unsure[0] is batch[0]:
            # A write that may have landed: the same records again under the same key, so none is
            # counted twice. Only those: a record added since is newer than the key's time stamp,
            # which readers trust to skip whole batches older than a period (batch_written_at).
            _, key, size = self._unsure
            batch = batch[:size]
        else:
            key = f"{PREFIX}{self.namespace}:{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.store.set(key, _encode(batch), self.retention)
        except Exception:  # noqa: BLE001 - the ledger must never fail a caller
            self._unsure = (batch[0], key, len(batch))
            return 0
        self._unsure = None
        self._written += 1
        if self._written % _TRIM_EVERY == 0:
            try:
                trim(self.store, self.namespace)
            except Exception:  # noqa: BLE001, S110 - the batch is written; the next check trims
                pass
        return len(batch)

    def _write_in_background(self) -> None:
        if not self.pending or time.monotonic() < self._retry_at:
            return
        self._write(everything=self._wanted)

    def _forget_parent(self) -> None:
        """After fork(), in the child: the parent writes its own records; locks may have been held."""
        self._lock, self._writing = threading.Lock(), threading.Lock()
        self.pending = []
        self._failures, self._retry_at, self._wanted, self._unsure = 0, 0.0, False, None


# vars(), not dataclasses.asdict(): a record holds only flat values, and asdict's deep copy cost more
# per record than the rest of a hit. One encoder for every line: json.dumps builds one per call.
_line = json.JSONEncoder(separators=(",", ":")).encode


def _encode(batch: list[tuple[CallRecord, str]]) -> bytes:
    return "\n".join(line for _, line in batch).encode()


class _LedgerThread:
    """The process's one writer of ledger batches: started on first need, again in a forked child."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._started: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def wake(self, now: bool = True) -> None:
        """Start the thread if it is not running; ``now``: have it look at once, not at its next tick."""
        if self._started is None:
            with self._start_lock:
                if self._started is None:
                    # A daemon: a process that is done never waits for it; atexit flushes what is left.
                    thread = threading.Thread(target=self._run, name="metrion-ledger", daemon=True)
                    thread.start()
                    self._started = thread
        if now:
            self._event.set()

    def _run(self) -> None:
        while True:
            self._event.wait(WRITE_EVERY)
            self._event.clear()
            _write_all()  # a function of its own: no ledger stays referenced while this thread waits


# The sink of each (store, namespace, retention) of this process: see shared_sink.
_shared: dict[tuple[int, str, int], weakref.ReferenceType[StoredLedger]] = {}
_shared_lock = threading.Lock()


def shared_sink(store: Store, namespace: str, retention: int, allow: Callable[[], bool] | None = None) -> StoredLedger:
    """The process's sink for ``store`` and ``namespace``, made on first use.

    A test suite opens a session per test: one sink each would write a batch per test (a round trip
    per test, and ``MAX_BATCHES`` would then keep a few thousand tests of history instead of about
    a million calls). ``allow`` replaces the sink's: the latest session's circuit breaker says
    whether the store is worth a write.
    """
    key = (id(store), namespace, retention)
    with _shared_lock:
        # Dead entries are dropped here, not by a weakref callback: a sink can die in a garbage
        # collection that runs while this very lock is held, and the callback would deadlock on it.
        for dead in [each for each, ref in _shared.items() if ref() is None]:
            del _shared[dead]
        found = _shared.get(key)
        sink = found() if found is not None else None
        if sink is None:  # (a live sink keeps its store alive, so its id names no other store)
            sink = StoredLedger(store, namespace, retention, allow)
            _shared[key] = weakref.ref(sink)
        sink._allow = allow
        return sink


def _write_all() -> None:
    with _open_lock:
        ledgers = list(_open)
    for ledger in ledgers:
        try:
            ledger._write_in_background()
        except Exception:  # noqa: BLE001, S110 - nothing may stop the ledger thread; records stay pending
            pass


_thread = _LedgerThread()


def _after_fork_in_child() -> None:
    global _thread, _open_lock, _shared_lock
    # Only the forking thread exists in the child: the ledger thread and any lock it held are gone.
    _thread, _open_lock, _shared_lock = _LedgerThread(), threading.Lock(), threading.Lock()
    for ledger in list(_open):
        ledger._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    sniffio = sys.modules.get("sniffio")  # trio, and anything else that tells sniffio it runs
    if sniffio is not None:
        try:
            sniffio.current_async_library()
            return True
        except Exception:  # noqa: BLE001 - AsyncLibraryNotFoundError: a plain thread
            pass
    return False


def trim(store: Store, namespace: str, keep: int = MAX_BATCHES) -> int:
    """Drop the oldest batches beyond ``keep``; return how many were dropped."""
    keys = sorted(store.keys(f"{PREFIX}{namespace}:"))
    extra = keys[: max(0, len(keys) - keep)]
    for key in extra:
        store.delete(key)
    return len(extra)


def flush_all() -> None:
    with _open_lock:
        ledgers = list(_open)
    for ledger in ledgers:
        ledger.flush()


atexit.register(flush_all)


def read_records(store: Store, namespace: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
    """Every stored record (of one namespace, or all), oldest first, as dicts with a ``namespace`` field."""
    prefix = PREFIX if namespace is None else f"{PREFIX}{namespace}:"
    records = []
    for key in store.keys(prefix):
        if since is not None and batch_written_at(key) < since:
            continue  # every record of a batch is older than the batch
        records += [record for record in read_batch(store, key) if since is None or record.get("at", 0) >= since]
    records.sort(key=lambda record: record.get("at", 0))
    return records


def read_batch(store: Store, key: str) -> list[dict[str, Any]]:
    """The records of one ledger batch, as dicts with a ``namespace`` field (damaged lines are skipped)."""
    space = key[len(PREFIX) :].rpartition(":")[0]
    records = []
    for line in _lines(store.get(key)):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append({**record, "namespace": space})
    return records


def batch_written_at(key: str) -> float:
    """When a batch was written (its key says, in the writer's clock, as its records' ``at``).

    A key that does not say is taken as written now: its records are read, never skipped.
    """
    stamp = key.rpartition(":")[2].partition("-")[0]
    return int(stamp) / 1e9 if stamp.isdigit() else float("inf")


def _lines(value: bytes | None) -> Iterable[str]:
    return value.decode("utf-8", "replace").splitlines() if value else ()
