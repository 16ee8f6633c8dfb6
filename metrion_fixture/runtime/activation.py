"""Which session serves a request: the innermost ``cache()`` block of this context, else a
process-wide block (a pytest test, a notebook cell), else ``enable()``'s session.

``cache()`` blocks live in a :class:`~contextvars.ContextVar`: a block covers the thread or
asyncio task that entered it and the tasks it creates (asyncio copies the context into a new
task), never a sibling task or another thread. A thread pool started inside a block does not
see it (threads start with an empty context) unless the work is submitted through
``contextvars.copy_context().run``. ``enable()`` and the process-wide blocks of the pytest
plugin and the cell magic cover every thread, since a test or a cell owns the process while
it runs.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import CacheSession

_lock = threading.Lock()
_enabled: CacheSession | None = None
_process_blocks: list[CacheSession] = []
_context_blocks: ContextVar[tuple[CacheSession, ...]] = ContextVar("metrion_cache_blocks", default=())


def active_session() -> CacheSession | None:
    blocks = _context_blocks.get()
    if blocks:
        return blocks[-1]
    process_blocks = _process_blocks
    return process_blocks[-1] if process_blocks else _enabled


def enabled_session() -> CacheSession | None:
    """The session ``enable()`` set, whatever blocks are open."""
    return _enabled


def set_enabled(session: CacheSession | None) -> CacheSession | None:
    global _enabled
    with _lock:
        previous, _enabled = _enabled, session
    return previous


def enter_context_block(session: CacheSession) -> object:
    """Cover this context (thread or task, and the tasks it starts) until :func:`exit_context_block` (token)."""
    return _context_blocks.set((*_context_blocks.get(), session))


def exit_context_block(token: object) -> None:
    try:
        _context_blocks.reset(token)  # type: ignore[arg-type]
    except ValueError:
        # Left in another context than it was entered in (a generator resumed elsewhere):
        # drop the innermost block of this context instead.
        blocks = _context_blocks.get()
        _context_blocks.set(blocks[:-1])


def enter_process_block(session: CacheSession) -> None:
    """Cover every thread of the process (a pytest test, a notebook cell) until :func:`exit_process_block`."""
    with _lock:
        _process_blocks.append(session)


def exit_process_block(session: CacheSession) -> None:
    with _lock:
        # Blocks can end out of order across threads; remove this one, whatever its place.
        for index in range(len(_process_blocks) - 1, -1, -1):
            if _process_blocks[index] is session:
                del _process_blocks[index]
                break
