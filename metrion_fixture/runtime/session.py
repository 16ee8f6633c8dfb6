"""A cache session: settings, a store, and what happened. The transports serve the active one."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from ..core.breaker import CircuitBreaker
from ..core.directives import check_session_mode
from ..core.engine import Settings
from ..core.options import DEFAULT_SINGLE_FLIGHT_WAIT, URL_ENV  # noqa: F401 - importable from here, as before
from ..core.options import CacheOptions, options_from_arguments
from ..core.stats import CallRecord, Ledger, Stats
from .ledger import StoredLedger
from ..stores import default_store_url, open_store
from ..stores.base import Store

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..core.options import CacheOptionValues

_FIRST_POLL, _LAST_POLL = 0.005, 0.1  # seconds between looks while waiting for another caller's entry
log = logging.getLogger("metrion_fixture")


class CacheSession:
    """The cache as one caller configured it.

    ``url`` picks the store (``redis://``, ``rediss://``, ``unix://``, ``sqlite:///PATH``,
    ``memory://``); without one, ``METRION_CACHE_URL``, else the embedded SQLite file
    ``.metrion_cache/cache.sqlite3`` under the current directory. ``mode`` is the
    default for requests without an ``x-metrion-cache`` header: ``true``, ``refresh``,
    ``off`` or ``replay``. ``scope="credential"`` (or ``METRION_CACHE_SCOPE=credential``)
    keeps entries private to the API key that paid for them; the default, ``shared``,
    shares them within the namespace. Bad options raise :class:`MetrionCacheError` here, at once.
    """

    def __init__(
        self,
        url: str | None = None,
        /,
        *,
        options: CacheOptions | None = None,
        **overrides: Unpack[CacheOptionValues],
    ) -> None:
        """Options as keyword arguments, or ``options`` (a :class:`CacheOptions`) with keyword overrides.

        Without ``options``, what the arguments leave out comes from the environment, then the defaults.
        """
        # ``url`` is positional-only so that ``url=`` lands in ``overrides`` too: both spellings keep working.
        self.options = options_from_arguments(url, options, overrides, os.environ)
        chosen = self.options
        self.settings = Settings(
            mode=chosen.mode,
            ttl=chosen.ttl,
            namespace=chosen.namespace,
            max_entry_bytes=chosen.max_entry_bytes,
            scope=chosen.scope,
        )
        self.store: Store = open_store(chosen.url or default_store_url())
        self.ledger = Ledger(max_records=chosen.max_records)
        # After a store failure, skip the store for ``store_cooldown`` seconds: one timeout per period.
        self.breaker = CircuitBreaker(chosen.store_cooldown)
        # Calls are also kept in the store (batched, expiring) so `metrion-cache stats` sees every process.
        self.ledger.sink = StoredLedger(
            self.store,
            chosen.namespace,
            chosen.ledger_retention,
            # Only while the store is healthy, and without counting as a store call of a request.
            allow=lambda: self.breaker.state == "closed",
        )
        self.single_flight_wait = chosen.single_flight_wait
        self._warned = False

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def stats(self) -> Stats:
        return self.ledger.stats

    @property
    def calls(self) -> list[CallRecord]:
        """The most recent requests, oldest first (bounded by ``max_records``)."""
        return list(self.ledger.calls)

    def with_mode(self, mode: str) -> CacheSession:
        """This session in another mode: the same store, namespace, TTL, stats and records."""
        other = copy.copy(self)
        other.settings = dataclasses.replace(self.settings, mode=check_session_mode(mode))
        return other

    def flush_ledger(self) -> int:
        """Write the calls not yet in the store's ledger (done when a ``cache()`` block ends and at exit)."""
        return self.ledger.sink.flush() if self.ledger.sink is not None else 0

    def clear(self) -> int:
        """Delete this namespace's entries from the store; return how many."""
        return self.store.delete_prefix(f"{self.settings.namespace}:")

    # Store I/O for the transports: a failing store is reported, counted and survived, and
    # after a failure the breaker skips it for a cool-down (a skipped call counts as a store error).
    def read(self, storage_key: str) -> bytes | None | BaseException:
        if not self.breaker.allow():
            return self._store_skipped("read")
        try:
            value = self.store.get(storage_key)
        except Exception as error:  # noqa: BLE001 - any store failure means "no cache", never a failed request
            self._store_failed("read", error)
            return error
        self.breaker.succeeded()
        return value

    async def aread(self, storage_key: str) -> bytes | None | BaseException:
        if not self.breaker.allow():
            return self._store_skipped("read")
        try:
            value = await self.store.aget(storage_key)
        except Exception as error:  # noqa: BLE001
            self._store_failed("read", error)
            return error
        self.breaker.succeeded()
        return value

    def write(self, storage_key: str, value: bytes, ttl: int) -> bool:
        """Store an entry; False (counted, never raised) if the store failed or was skipped."""
        if not self.breaker.allow():
            self._store_skipped("write")
            return False
        try:
            self.store.set(storage_key, value, ttl)
        except Exception as error:  # noqa: BLE001
            self._store_failed("write", error)
            return False
        self.breaker.succeeded()
        self.ledger.count("stored")
        return True

    async def awrite(self, storage_key: str, value: bytes, ttl: int) -> bool:
        if not self.breaker.allow():
            self._store_skipped("write")
            return False
        try:
            await self.store.aset(storage_key, value, ttl)
        except Exception as error:  # noqa: BLE001
            self._store_failed("write", error)
            return False
        self.breaker.succeeded()
        self.ledger.count("stored")
        return True

    # Single-flight locks. A lock that cannot be taken because the store fails means "go ahead
    # without it" (True): coordination is an optimisation, never a reason to fail or to wait.
    def acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        if self.breaker.state == "open":
            return True
        try:
            return self.store.acquire(key, token, ttl_ms)
        except Exception as error:  # noqa: BLE001
            self._store_failed("lock", error)
            return True

    async def aacquire(self, key: str, token: str, ttl_ms: int) -> bool:
        if self.breaker.state == "open":
            return True
        try:
            return await self.store.aacquire(key, token, ttl_ms)
        except Exception as error:  # noqa: BLE001
            self._store_failed("lock", error)
            return True

    def release(self, key: str, token: str) -> None:
        try:
            self.store.release(key, token)
        except Exception as error:  # noqa: BLE001 - the lock expires by itself
            self._store_failed("unlock", error)

    async def arelease(self, key: str, token: str) -> None:
        try:
            await self.store.arelease(key, token)
        except Exception as error:  # noqa: BLE001
            self._store_failed("unlock", error)

    def wait_for(self, storage_key: str, lock_key: str, deadline: float) -> bytes | None:
        """Poll for the entry another caller is producing: it, or None once its lock is gone or at the deadline."""
        delay = _FIRST_POLL
        while True:
            value = self.read(storage_key)
            if not _still_waiting(value, deadline):
                return value if isinstance(value, bytes) else None
            try:
                if not self.store.locked(lock_key):
                    return None
            except Exception as error:  # noqa: BLE001
                self._store_failed("lock", error)
                return None
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _LAST_POLL)

    async def await_for(self, storage_key: str, lock_key: str, deadline: float) -> bytes | None:
        delay = _FIRST_POLL
        while True:
            value = await self.aread(storage_key)
            if not _still_waiting(value, deadline):
                return value if isinstance(value, bytes) else None
            try:
                if not await self.store.alocked(lock_key):
                    return None
            except Exception as error:  # noqa: BLE001
                self._store_failed("lock", error)
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _LAST_POLL)

    def _store_skipped(self, action: str) -> BaseException:
        error = self.breaker.skipped_error()
        self.ledger.count("store_skipped")
        self._store_failed(action, error, tried=False)
        return error

    def _store_failed(self, action: str, error: Exception, *, tried: bool = True) -> None:
        if tried:
            self.breaker.failed(error)
        self.ledger.count("store_errors")
        if not self._warned:
            self._warned = True
            log.warning(
                "metrion cache: could not %s the store %s (%s: %s); requests go to the provider without "
                "the cache; the store is skipped for %g s after each failure, and further failures are only "
                "counted in stats.store_errors",
                action,
                self.url,
                type(error).__name__,
                error,
                self.breaker.cooldown,
            )

    def __repr__(self) -> str:
        return f"CacheSession(url={self.url!r}, mode={self.mode!r}, namespace={self.settings.namespace!r})"


def _still_waiting(value: bytes | None | BaseException, deadline: float) -> bool:
    return value is None and time.monotonic() < deadline
