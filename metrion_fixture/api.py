"""The library API: turn the cache on for every httpx / httpx2 client in the process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .core.breaker import DEFAULT_COOLDOWN_SECONDS
from .session import DEFAULT_SINGLE_FLIGHT_WAIT, CacheSession, pop_scoped, push_scoped, set_enabled
from .transports import patching


def enable(
    url: str | None = None,
    *,
    mode: str = "true",
    ttl: int | str | None = None,
    namespace: str | None = None,
    max_entry_bytes: int | None = None,
    store_cooldown: float = DEFAULT_COOLDOWN_SECONDS,
    scope: str | None = None,
    single_flight_wait: float = DEFAULT_SINGLE_FLIGHT_WAIT,
) -> CacheSession:
    """Cache every LLM request of this process until :func:`disable`.

    Calling it again replaces the session (the patch stays installed once).
    Options are checked at once: a bad one raises :class:`MetrionCacheError`.
    """
    session = CacheSession(
        url,
        mode=mode,
        ttl=ttl,
        namespace=namespace,
        max_entry_bytes=max_entry_bytes,
        store_cooldown=store_cooldown,
        scope=scope,
        single_flight_wait=single_flight_wait,
    )
    if set_enabled(session) is None:
        patching.install()
    return session


def disable() -> None:
    """Undo :func:`enable`. ``cache()`` blocks still open keep their sessions."""
    previous = set_enabled(None)
    if previous is not None:
        patching.uninstall()
        previous.flush_ledger()


@contextmanager
def cache(
    url: str | None = None,
    *,
    mode: str = "true",
    ttl: int | str | None = None,
    namespace: str | None = None,
    max_entry_bytes: int | None = None,
    session: CacheSession | None = None,
    store_cooldown: float = DEFAULT_COOLDOWN_SECONDS,
    scope: str | None = None,
    single_flight_wait: float = DEFAULT_SINGLE_FLIGHT_WAIT,
) -> Iterator[CacheSession]:
    """Cache LLM requests inside the block; nestable, and restores what was active before."""
    if session is None:
        session = CacheSession(
            url,
            mode=mode,
            ttl=ttl,
            namespace=namespace,
            max_entry_bytes=max_entry_bytes,
            store_cooldown=store_cooldown,
            scope=scope,
            single_flight_wait=single_flight_wait,
        )
    patching.install()
    push_scoped(session)
    try:
        yield session
    finally:
        pop_scoped(session)
        patching.uninstall()
        session.flush_ledger()
