"""Routing every httpx / httpx2 client through the cache while a session is active.

``Client._transport_for_url`` is the one place both libraries pick the transport
for a request, whether it is the default pool, a user's transport, a mount or a
``MockTransport``. Wrapping what it returns covers all of them, and leaves
anything that patches below the transport (respx's default mode) working
underneath. The patch is reference counted; removing it restores the original
only if nobody has patched over it since.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from ..session import active_session

HTTP_LIBRARIES = ("httpx", "httpx2")
_WRAPPER_ATTRIBUTE = "_metrion_cache_wrapper"

_lock = threading.Lock()
_installs = 0
_patched: list[tuple[type, Callable[..., Any], Callable[..., Any]]] = []


def available_libraries() -> list[SimpleNamespace]:
    """The transport classes of every installed HTTP library (importing it if needed)."""
    built = []
    for name in HTTP_LIBRARIES:
        if importlib.util.find_spec(name) is None:
            continue
        built.append(importlib.import_module(f"{__package__}.{name}")._built)
    return built


def cache_transport_types() -> tuple[type, ...]:
    return tuple(cls for lib in available_libraries() for cls in (lib.CacheTransport, lib.AsyncCacheTransport))


def _patch_for(library: SimpleNamespace, cache_class: type, original: Callable[..., Any]) -> Callable[..., Any]:
    own_types = cache_transport_types()

    def _transport_for_url(self: Any, url: Any) -> Any:
        transport = original(self, url)
        if active_session() is None or isinstance(transport, own_types):
            return transport
        wrapper = getattr(transport, _WRAPPER_ATTRIBUTE, None)
        if wrapper is None:
            wrapper = cache_class(transport, session=active_session)
            try:
                setattr(transport, _WRAPPER_ATTRIBUTE, wrapper)
            except AttributeError:
                pass  # a transport with __slots__: wrap it afresh on each request
        return wrapper

    return _transport_for_url


def install() -> None:
    global _installs
    with _lock:
        _installs += 1
        if _installs > 1:
            return
        for library in available_libraries():
            hx = library.module
            for client_class, cache_class in (
                (hx.Client, library.CacheTransport),
                (hx.AsyncClient, library.AsyncCacheTransport),
            ):
                original = client_class._transport_for_url
                patched = _patch_for(library, cache_class, original)
                client_class._transport_for_url = patched
                _patched.append((client_class, original, patched))


def uninstall() -> None:
    global _installs
    with _lock:
        if _installs == 0:
            return
        _installs -= 1
        if _installs > 0:
            return
        while _patched:
            client_class, original, patched = _patched.pop()
            if client_class.__dict__.get("_transport_for_url") is patched:
                client_class._transport_for_url = original


def installed() -> bool:
    return _installs > 0
