"""The library API: turn the cache on for every httpx / httpx2 client in the process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .core.breaker import DEFAULT_COOLDOWN_SECONDS
from .runtime.activation import (
    enter_context_block,
    enter_process_block,
    exit_context_block,
    exit_process_block,
    set_enabled,
)
from .runtime.session import DEFAULT_SINGLE_FLIGHT_WAIT, CacheSession
from .integrations import patching


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
    """Cache LLM requests made inside the block by this thread or task (and the tasks it starts).

    Nestable, and restores what was active before. A sibling task or another thread is not
    covered: see :mod:`metrion_fixture.runtime.activation`.
    """
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
    token = enter_context_block(session)
    try:
        yield session
    finally:
        exit_context_block(token)
        patching.uninstall()
        session.flush_ledger()


@contextmanager
def covering_process(session: CacheSession) -> Iterator[CacheSession]:
    """Cache every thread's LLM requests while the block runs: a pytest test, a notebook cell."""
    patching.install()
    enter_process_block(session)
    try:
        yield session
    finally:
        exit_process_block(session)
        patching.uninstall()
        session.flush_ledger()
