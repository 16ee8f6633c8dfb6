"""Routing every httpx / httpx2 client through the cache while a session is active.

``Client._transport_for_url`` is the one place both libraries pick the transport
for a request, whether it is the default pool, a user's transport, a mount or a
``MockTransport``. Wrapping what it returns covers all of them, and leaves
anything that patches below the transport (respx's default mode) working
underneath. The patch is reference counted; removing it restores the original
only if nobody has patched over it since.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..runtime.activation import active_session

HTTP_LIBRARIES = ("httpx", "httpx2")
_WRAPPER_ATTRIBUTE = "_metrion_cache_wrapper"

_lock = threading.Lock()
_installs = 0
_patched: list[tuple[type, Callable[..., Any], Callable[..., Any]]] = []


def _patch_for(cache_class: type, original: Callable[..., Any]) -> Callable[..., Any]:
    # The base classes, not the libraries' own: patching one library must not import the other.
    from .httpx_common import AsyncCacheTransportBase, SyncCacheTransportBase

    own_types = (SyncCacheTransportBase, AsyncCacheTransportBase)

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
        _install_http_libraries()
        _install_xai()
        _install_aiohttp()
        _install_lm15()


def uninstall() -> None:
    global _installs
    with _lock:
        if _installs == 0:
            return
        _installs -= 1
        if _installs > 0:
            return
        if _http_hook in sys.meta_path:
            sys.meta_path.remove(_http_hook)
        while _patched:
            client_class, original, patched = _patched.pop()
            if client_class.__dict__.get("_transport_for_url") is patched:
                client_class._transport_for_url = original  # type: ignore[attr-defined]
        _uninstall_xai()
        _uninstall_aiohttp()
        _uninstall_lm15()


def installed() -> bool:
    return _installs > 0


def _patch_http_library(module: Any) -> None:
    """Patch one HTTP library's two clients (called with ``_lock`` held, while installed)."""
    if any(client_class is module.Client for client_class, _, _ in _patched):
        return
    library = importlib.import_module(f"{__package__}.{module.__name__}")
    for client_class, cache_class in (
        (module.Client, library.CacheTransport),
        (module.AsyncClient, library.AsyncCacheTransport),
    ):
        original = client_class._transport_for_url
        patched = _patch_for(cache_class, original)
        client_class._transport_for_url = patched
        _patched.append((client_class, original, patched))


def _install_http_libraries() -> None:
    # A library not imported yet is patched when it is: an httpx2 user (anthropic 2.x) does not pay
    # for importing httpx 1.x (and the click and pygments its CLI imports) just to patch it.
    for name in HTTP_LIBRARIES:
        module = sys.modules.get(name)
        if module is not None:
            _patch_http_library(module)
        elif importlib.util.find_spec(name) is not None and _http_hook not in sys.meta_path:
            sys.meta_path.insert(0, _http_hook)


# gRPC: the official xai-sdk makes its channels in ``Client._make_grpc_channel`` (sync and aio);
# the patched method puts the cache's interceptors on each channel it makes while the patch is
# installed (metrion_fixture.transports.grpc). grpc and xai_sdk are imported only if the user
# imports xai_sdk: a client module imported later is patched by an import hook.
_XAI_CLIENT_MODULES = {"xai_sdk.sync.client": False, "xai_sdk.aio.client": True}
_xai_patched: list[tuple[type, Callable[..., Any], Callable[..., Any]]] = []


def _patch_xai_module(module: Any, aio: bool) -> None:
    """Patch one xai_sdk client module's ``Client`` (called with ``_lock`` held, while installed)."""
    client_class = getattr(module, "Client", None)
    original = getattr(client_class, "_make_grpc_channel", None)
    if original is None or any(patched_class is client_class for patched_class, _, _ in _xai_patched):
        return
    from .grpc import wrap_make_channel

    patched = wrap_make_channel(original, aio=aio)
    client_class._make_grpc_channel = patched  # type: ignore[union-attr]
    _xai_patched.append((client_class, original, patched))  # type: ignore[arg-type]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a module right after it is imported, while the cache is installed."""

    def __init__(self, patches: dict[str, Callable[[Any], None]]) -> None:
        self._patches = patches

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        patch = self._patches.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            with _lock:
                if _installs > 0:
                    patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


_http_hook = _PatchOnImport(dict.fromkeys(HTTP_LIBRARIES, _patch_http_library))
_xai_hook = _PatchOnImport(
    {name: functools.partial(_patch_xai_module, aio=aio) for name, aio in _XAI_CLIENT_MODULES.items()}
)


def _install_xai() -> None:
    if "xai_sdk" not in sys.modules and importlib.util.find_spec("xai_sdk") is None:
        return
    for name, aio in _XAI_CLIENT_MODULES.items():
        module = sys.modules.get(name)
        if module is not None:
            _patch_xai_module(module, aio)
    if _xai_hook not in sys.meta_path:
        sys.meta_path.insert(0, _xai_hook)


def _uninstall_xai() -> None:
    if _xai_hook in sys.meta_path:
        sys.meta_path.remove(_xai_hook)
    while _xai_patched:
        client_class, original, patched = _xai_patched.pop()
        if client_class.__dict__.get("_make_grpc_channel") is patched:
            client_class._make_grpc_channel = original  # type: ignore[attr-defined]


# aiohttp (google-genai's async client uses it when it is installed): ``ClientSession._request``
# puts the cache's middleware on each request made while a session is active
# (metrion_fixture.integrations.aiohttp says why there). aiohttp is imported only if the user
# imports it: an import made later is patched by the import hook, once the package is whole.
_aiohttp_patched: list[tuple[type, Callable[..., Any], Callable[..., Any]]] = []


def _patch_aiohttp(module: Any) -> None:
    """Patch aiohttp's ``ClientSession`` (called with ``_lock`` held, while installed)."""
    session_class = getattr(module, "ClientSession", None)
    original = getattr(session_class, "_request", None)
    if original is None or _aiohttp_patched:
        return
    from .aiohttp import wrap_request

    patched = wrap_request(original)
    if patched is None:
        return  # this aiohttp cannot be cached: the adapter logged why
    session_class._request = patched  # type: ignore[union-attr]
    _aiohttp_patched.append((session_class, original, patched))  # type: ignore[arg-type]


_aiohttp_hook = _PatchOnImport({"aiohttp": _patch_aiohttp})


def _install_aiohttp() -> None:
    module = sys.modules.get("aiohttp")
    if module is not None:
        _patch_aiohttp(module)
    elif importlib.util.find_spec("aiohttp") is not None and _aiohttp_hook not in sys.meta_path:
        sys.meta_path.insert(0, _aiohttp_hook)


def _uninstall_aiohttp() -> None:
    if _aiohttp_hook in sys.meta_path:
        sys.meta_path.remove(_aiohttp_hook)
    while _aiohttp_patched:
        session_class, original, patched = _aiohttp_patched.pop()
        if session_class.__dict__.get("_request") is patched:
            session_class._request = original  # type: ignore[attr-defined]


# lm15 (dspy 3.4's default engine, vendored there as ``dspy._vendor.lm15``, and a package of its own)
# sends with an HTTP client of its own: every request goes through ``StdlibTransport.stream`` (sync)
# or ``StdlibAsyncTransport._do_stream`` (async), which the patch hands to the cache while a session
# is active (metrion_fixture.integrations.lm15 says why there). Neither dspy nor lm15 is imported
# for it: a transport module imported later is patched by the import hook.
_LM15_PACKAGES = ("lm15", "dspy")
# transport module -> (its transport class, the method every request goes through, its response class, async)
_LM15_TRANSPORTS = {
    f"{package}.transports.{side}": (transport_class, method, response_class, aio)
    for package in ("lm15", "dspy._vendor.lm15")
    for side, transport_class, method, response_class, aio in (
        ("_sync", "StdlibTransport", "stream", "TransportResponse", False),
        ("_async", "StdlibAsyncTransport", "_do_stream", "AsyncTransportResponse", True),
    )
}
_lm15_patched: list[tuple[type, str, Callable[..., Any], Callable[..., Any]]] = []


def _patch_lm15_module(module: Any) -> None:
    """Patch one lm15 transport module's transport class (called with ``_lock`` held, while installed)."""
    transport_name, method, response_name, aio = _LM15_TRANSPORTS[module.__name__]
    transport_class = getattr(module, transport_name, None)
    original = transport_class.__dict__.get(method) if isinstance(transport_class, type) else None
    response_class = getattr(module, response_name, None)
    if original is None or not isinstance(response_class, type):
        return
    if any(patched_class is transport_class for patched_class, _, _, _ in _lm15_patched):
        return
    from .lm15 import wrap_send

    patched = wrap_send(original, response_class, aio=aio)
    if patched is None:
        return  # this lm15 cannot be cached: the adapter logged why
    setattr(transport_class, method, patched)
    _lm15_patched.append((transport_class, method, original, patched))  # type: ignore[arg-type]


_lm15_hook = _PatchOnImport(dict.fromkeys(_LM15_TRANSPORTS, _patch_lm15_module))


def _install_lm15() -> None:
    if not any(name in sys.modules or importlib.util.find_spec(name) is not None for name in _LM15_PACKAGES):
        return
    for name in _LM15_TRANSPORTS:
        module = sys.modules.get(name)
        if module is not None:
            _patch_lm15_module(module)
    if _lm15_hook not in sys.meta_path:
        sys.meta_path.insert(0, _lm15_hook)


def _uninstall_lm15() -> None:
    if _lm15_hook in sys.meta_path:
        sys.meta_path.remove(_lm15_hook)
    while _lm15_patched:
        transport_class, method, original, patched = _lm15_patched.pop()
        if transport_class.__dict__.get(method) is patched:
            setattr(transport_class, method, original)
