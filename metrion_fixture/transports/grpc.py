"""Kept for users who import it here: see :mod:`metrion_fixture.integrations.grpc`."""

from ..integrations.grpc import (
    AsyncUnaryStreamCacheInterceptor,
    AsyncUnaryUnaryCacheInterceptor,
    CacheInterceptor,
    aio_interceptors,
    intercept_channel,
)

__all__ = [
    "AsyncUnaryStreamCacheInterceptor",
    "AsyncUnaryUnaryCacheInterceptor",
    "CacheInterceptor",
    "aio_interceptors",
    "intercept_channel",
]
