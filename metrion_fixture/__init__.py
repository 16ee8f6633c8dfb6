"""metrion-fixture: an LLM proxy's response cache inside your own process."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import MetrionCacheError

if TYPE_CHECKING:
    from .api import cache, disable, enable
    from .core.key import cache_key
    from .core.stats import CallRecord, Stats
    from .runtime.session import CacheSession

# Imported on first use: every pytest start-up imports this package (the plugin's entry point),
# as does a notebook's first cell, and neither needs the runtime until a session is made.
_LAZY = {
    "CacheSession": ".runtime.session",
    "CallRecord": ".core.stats",
    "Stats": ".core.stats",
    "cache": ".api",
    "cache_key": ".core.key",
    "disable": ".api",
    "enable": ".api",
}

__all__ = [
    "CacheSession",
    "CallRecord",
    "MetrionCacheError",
    "Stats",
    "cache",
    "cache_key",
    "disable",
    "enable",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext metrion_fixture``: register the ``%metrion_cache`` magics."""
    from .integrations.ipython import load_ipython_extension as load  # IPython is imported only here

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext metrion_fixture``: remove the magics and turn the cache off."""
    from .integrations.ipython import unload_ipython_extension as unload

    unload(ipython)
