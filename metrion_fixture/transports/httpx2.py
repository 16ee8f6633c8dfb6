"""Kept for users who import it here: see :mod:`metrion_fixture.integrations.httpx2`."""

from ..integrations.httpx2 import AsyncCacheTransport, CacheTransport

__all__ = ["AsyncCacheTransport", "CacheTransport"]
