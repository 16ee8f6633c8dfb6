"""Kept for users who import it here: see :mod:`metrion_fixture.runtime.session`."""

from .runtime.session import CacheSession

__all__ = ["CacheSession"]
