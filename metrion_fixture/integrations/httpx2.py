"""Cache transports for httpx2, which anthropic 2.x and openai 3.x use: ``CacheTransport``, ``AsyncCacheTransport``.

client = httpx2.Client(transport=CacheTransport(httpx2.HTTPTransport(), url="redis://localhost"))
"""

import httpx2 as _httpx

from .httpx_common import build_transports

_built = build_transports(_httpx)
CacheTransport = _built.CacheTransport
AsyncCacheTransport = _built.AsyncCacheTransport

__all__ = ["AsyncCacheTransport", "CacheTransport"]
