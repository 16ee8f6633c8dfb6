"""Kept for users who import it here: see :mod:`metrion_fixture.integrations.httpx`."""

from ..integrations.httpx import AsyncCacheTransport, CacheTransport

__all__ = ["AsyncCacheTransport", "CacheTransport"]
