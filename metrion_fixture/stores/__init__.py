"""Open a store from a URL: ``memory://``, ``sqlite:///path`` or ``redis://host``."""

from __future__ import annotations

import threading
from pathlib import Path

from metrion_fixture.errors import MetrionCacheError
from metrion_fixture.stores.base import Store
from metrion_fixture.stores.memory import MemoryStore

__all__ = ["MetrionCacheError", "Store", "default_store_url", "open_store"]

_ACCEPTED = (
    "accepted: memory://[NAME], sqlite:///relative/path or sqlite:////absolute/path, "
    "redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS), unix:///path/to/redis.sock, "
    "redis+cluster://HOST:PORT (any node of a Redis Cluster); "
    "for example sqlite:///.metrion_cache/cache.sqlite3 or redis://localhost:6379/0"
)
# One store object per URL in a process: sessions are cheap (one per test, per cell),
# connections and SQLite handles are not. For memory:// this is also what makes every
# session on the same URL see the same data.
_open_stores: dict[str, Store] = {}
_open_lock = threading.Lock()


def default_store_url() -> str:
    return f"sqlite:///{Path.cwd() / '.metrion_cache' / 'cache.sqlite3'}"


def open_store(url: str) -> Store:
    """The store ``url`` names, shared by every caller in this process that names it.

    Cheap: nothing connects until the first read or write. Closing a shared store is
    harmless, as stores reopen on their next use.
    """
    with _open_lock:
        store = _open_stores.get(url) if isinstance(url, str) else None
        if store is None:
            store = _open_stores[url] = _new_store(url)
        return store


def _new_store(url: str) -> Store:
    scheme, sep, rest = url.partition("://") if isinstance(url, str) else ("", "", "")
    if sep and scheme == "memory":
        return MemoryStore(url)
    if sep and scheme == "sqlite":
        if not rest.startswith("/") or rest.endswith("/"):
            raise MetrionCacheError(f"Bad SQLite URL {url!r}: it needs a file path; {_ACCEPTED}.")
        from metrion_fixture.stores.sqlite import SQLiteStore

        return SQLiteStore(Path(rest[1:]).absolute())
    if sep and scheme in ("redis+cluster", "rediss+cluster"):
        from metrion_fixture.stores.redis import RedisClusterStore, cluster_node_url, mask_url, url_problem

        problem = url_problem(cluster_node_url(url))
        if problem:
            raise MetrionCacheError(f"Bad Redis Cluster URL {mask_url(url)!r}: {problem}; {_ACCEPTED}.")
        return RedisClusterStore(url)
    if sep and scheme in ("redis", "rediss", "unix"):
        from metrion_fixture.stores.redis import RedisStore, mask_url, url_problem

        problem = url_problem(url)
        if problem:
            raise MetrionCacheError(f"Bad Redis URL {mask_url(url)!r}: {problem}; {_ACCEPTED}.")
        return RedisStore(url)
    from metrion_fixture.stores.redis import mask_url

    raise MetrionCacheError(f"Unsupported cache store URL {mask_url(str(url))!r}; {_ACCEPTED}.")
