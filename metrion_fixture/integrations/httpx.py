"""Cache transports for httpx, which hand-written code and older SDK releases use.

client = httpx.Client(transport=CacheTransport(httpx.HTTPTransport(), url="redis://localhost"))
"""

from __future__ import annotations

import httpx

from .httpx_common import AsyncCacheTransportBase, Library, SyncCacheTransportBase

LIBRARY = Library(httpx)


class CacheTransport(SyncCacheTransportBase, httpx.BaseTransport):
    __doc__ = SyncCacheTransportBase.__doc__
    library = LIBRARY


class AsyncCacheTransport(AsyncCacheTransportBase, httpx.AsyncBaseTransport):
    __doc__ = AsyncCacheTransportBase.__doc__
    library = LIBRARY


__all__ = ["AsyncCacheTransport", "CacheTransport"]
