"""metrion-fixture: an LLM proxy's response cache inside your own process."""

from .api import cache, disable, enable
from .core.key import cache_key
from .core.stats import CallRecord, Stats
from .errors import MetrionCacheError
from .runtime.session import CacheSession

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


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext metrion_fixture``: register the ``%metrion_cache`` magics."""
    from .integrations.ipython import load_ipython_extension as load  # IPython is imported only here

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext metrion_fixture``: remove the magics and turn the cache off."""
    from .integrations.ipython import unload_ipython_extension as unload

    unload(ipython)
