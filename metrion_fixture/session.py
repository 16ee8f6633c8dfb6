"""A cache session: settings, a store, and what happened. The transports serve the active one."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading

from .core.directives import check_session_mode
from .core.engine import Settings
from .core.stats import DEFAULT_MAX_RECORDS, CallRecord, Ledger, Stats
from .stores import default_store_url, open_store
from .stores.base import Store

URL_ENV = "METRION_CACHE_URL"
log = logging.getLogger("metrion_fixture")


class CacheSession:
    """The cache as one caller configured it.

    ``url`` picks the store (``redis://``, ``rediss://``, ``unix://``, ``sqlite:///PATH``,
    ``memory://``); without one, ``METRION_CACHE_URL``, else the embedded SQLite file
    ``.metrion_cache/cache.sqlite3`` under the current directory. ``mode`` is the
    default for requests without an ``x-metrion-cache`` header: ``true``, ``refresh``,
    ``off`` or ``replay``. Bad options raise :class:`MetrionCacheError` here, at once.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        mode: str = "true",
        ttl: int | str | None = None,
        namespace: str | None = None,
        max_entry_bytes: int | None = None,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self.settings = Settings.build(mode=mode, ttl=ttl, namespace=namespace, max_entry_bytes=max_entry_bytes)
        self.store: Store = open_store(url or os.environ.get(URL_ENV) or default_store_url())
        self.ledger = Ledger(max_records=max_records)
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

    def clear(self) -> int:
        """Delete this namespace's entries from the store; return how many."""
        return self.store.delete_prefix(f"{self.settings.namespace}:")

    # Store I/O for the transports: a failing store is reported, counted and survived.
    def read(self, storage_key: str) -> bytes | None | BaseException:
        try:
            return self.store.get(storage_key)
        except Exception as error:  # noqa: BLE001 - any store failure means "no cache", never a failed request
            self._store_failed("read", error)
            return error

    async def aread(self, storage_key: str) -> bytes | None | BaseException:
        try:
            return await self.store.aget(storage_key)
        except Exception as error:  # noqa: BLE001
            self._store_failed("read", error)
            return error

    def write(self, storage_key: str, value: bytes, ttl: int) -> bool:
        """Store an entry; False (counted, never raised) if the store failed."""
        try:
            self.store.set(storage_key, value, ttl)
        except Exception as error:  # noqa: BLE001
            self._store_failed("write", error)
            return False
        self.ledger.count("stored")
        return True

    async def awrite(self, storage_key: str, value: bytes, ttl: int) -> bool:
        try:
            await self.store.aset(storage_key, value, ttl)
        except Exception as error:  # noqa: BLE001
            self._store_failed("write", error)
            return False
        self.ledger.count("stored")
        return True

    def _store_failed(self, action: str, error: Exception) -> None:
        self.ledger.count("store_errors")
        if not self._warned:
            self._warned = True
            log.warning(
                "metrion cache: could not %s the store %s (%s: %s); requests go to the provider without "
                "the cache, and further failures are only counted in stats.store_errors",
                action,
                self.url,
                type(error).__name__,
                error,
            )

    def __repr__(self) -> str:
        return f"CacheSession(url={self.url!r}, mode={self.mode!r}, namespace={self.settings.namespace!r})"


# The session the patched clients serve: the innermost ``cache()`` block, else ``enable()``'s.
_lock = threading.Lock()
_enabled: CacheSession | None = None
_scoped: list[CacheSession] = []


def active_session() -> CacheSession | None:
    scoped = _scoped
    return scoped[-1] if scoped else _enabled


def enabled_session() -> CacheSession | None:
    """The session :func:`~metrion_fixture.enable` set, whatever ``cache()`` blocks are open."""
    return _enabled


def set_enabled(session: CacheSession | None) -> CacheSession | None:
    global _enabled
    with _lock:
        previous, _enabled = _enabled, session
    return previous


def push_scoped(session: CacheSession) -> None:
    with _lock:
        _scoped.append(session)


def pop_scoped(session: CacheSession) -> None:
    with _lock:
        # Blocks can end out of order across threads; remove this one, whatever its place.
        for index in range(len(_scoped) - 1, -1, -1):
            if _scoped[index] is session:
                del _scoped[index]
                break
