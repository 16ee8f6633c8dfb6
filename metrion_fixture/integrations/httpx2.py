"""Cache transports for httpx2, which anthropic 2.x, openai 3.x, google-genai 3.x and mistralai 3.x use.

client = httpx2.Client(transport=CacheTransport(httpx2.HTTPTransport(), url="redis://localhost"))
"""

from __future__ import annotations

import httpx2

from .httpx_common import AsyncCacheTransportBase, Library, SyncCacheTransportBase

LIBRARY = Library(httpx2)


class CacheTransport(SyncCacheTransportBase, httpx2.BaseTransport):
    __doc__ = SyncCacheTransportBase.__doc__
    library = LIBRARY


class AsyncCacheTransport(AsyncCacheTransportBase, httpx2.AsyncBaseTransport):
    __doc__ = AsyncCacheTransportBase.__doc__
    library = LIBRARY


__all__ = ["AsyncCacheTransport", "CacheTransport"]
