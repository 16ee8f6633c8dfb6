"""One module per library or protocol the cache sits in (see ARCHITECTURE.md)."""

from __future__ import annotations

import logging

log = logging.getLogger("metrion_fixture")
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` as a warning the first time only: what a library's version keeps from the cache."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
