"""Cache transports for httpx: ``CacheTransport`` and ``AsyncCacheTransport``.

client = httpx.Client(transport=CacheTransport(httpx.HTTPTransport(), url="redis://localhost"))
"""

import httpx as _httpx

from .httpx_common import build_transports

_built = build_transports(_httpx)
CacheTransport = _built.CacheTransport
AsyncCacheTransport = _built.AsyncCacheTransport

__all__ = ["AsyncCacheTransport", "CacheTransport"]
