"""Cache transports for httpx2 (what anthropic 2.x, openai 3.x and friends use): ``CacheTransport`` and ``AsyncCacheTransport``.

    client = httpx2.Client(transport=CacheTransport(httpx2.HTTPTransport(), url="redis://localhost"))
"""

import httpx2 as _httpx

from .shell import build_transports

_built = build_transports(_httpx)
CacheTransport = _built.CacheTransport
AsyncCacheTransport = _built.AsyncCacheTransport

__all__ = ["AsyncCacheTransport", "CacheTransport"]
