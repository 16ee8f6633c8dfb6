"""metrion-fixture: an LLM proxy's response cache inside your own process."""

from .api import cache, disable, enable
from .core.key import cache_key
from .core.stats import CallRecord, Stats
from .errors import MetrionCacheError
from .session import CacheSession

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
