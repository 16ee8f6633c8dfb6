"""Bulk warm-up: the entries each test read last time, fetched by the next run in one round trip.

A run with the warm-up on (the pytest plugin's ``--metrion-cache-warmup``) keeps, in the store,
one value per namespace under ``_warmup:{namespace}``: a JSON object of test (node id) -> the
storage keys its requests looked up. The next run reads it (one ``GET``), and has the store fetch
the keys of the tests it collected (one pipeline: :meth:`Store.warm`, which on Redis fills the
near cache under its tracking rules), so each test's first read is answered from memory instead
of a round trip. At the end of the run the value is read and written again, this run's tests
updated (under pytest-xdist, by the controller, with every worker's tests).

Not from the ledger: finding a run's records there means listing the ledger's batches, a ``SCAN``
of the whole database, whose cost grows with every key in it (1 s on a Redis of a million keys,
measured in benchmarks/README.md): more than the warm-up saves. This value is one read and one write
whatever the database holds. Best effort throughout: two runs writing at once keep the last one's
view, and a key that is gone or changed by then is read as it is now.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ..core.engine import storage_key
from ..stores.base import Store

PREFIX = "_warmup:"  # under the reserved "_" namespace prefix, like the ledger
MAX_TESTS = 50_000  # tests kept in one namespace's index, least recently run dropped first
MAX_KEYS_PER_TEST = 100
MAX_KEYS = 10_000  # fetched by one warm-up (a near cache holds 32 MiB)


def index_key(namespace: str) -> str:
    return f"{PREFIX}{namespace}"


def read_index(store: Store, namespace: str) -> dict[str, list[str]]:
    """The namespace's index (test -> storage keys); empty when there is none or it is damaged."""
    value = store.get_many([index_key(namespace)])[0]  # past any near cache: read once, never kept
    try:
        index = json.loads(value) if value else {}
    except ValueError:
        return {}
    if not isinstance(index, dict):
        return {}
    return {
        test: [key for key in keys if isinstance(key, str)]
        for test, keys in index.items()
        if isinstance(test, str) and isinstance(keys, list)
    }


def warm(store: Store, index: dict[str, list[str]], tests: Iterable[str]) -> int:
    """Fetch the entries ``tests`` read last time, as ``index`` says; returns how many the store kept."""
    keys = list(dict.fromkeys(key for test in tests for key in index.get(test, ())))[:MAX_KEYS]
    return store.warm(keys) if keys else 0


def keys_read(namespace: str, calls: Iterable[Any]) -> list[str]:
    """The storage keys a session's call records looked up (shared scope: a credential-scoped key holds
    a hash of the API key, which records do not keep)."""
    keys = {
        storage_key(namespace, call.wire_format, "stream" if call.stream else "json", call.key)
        for call in calls
        if call.key and call.wire_format and call.status in ("HIT", "MISS", "REFRESH")
    }
    return sorted(keys)[:MAX_KEYS_PER_TEST]


def update_index(store: Store, namespace: str, ran: dict[str, list[str]], ttl: int) -> None:
    """The index with the tests that ran updated (moved last: the most recently run are kept), written back."""
    index = read_index(store, namespace)
    for test, keys in ran.items():
        index.pop(test, None)
        if keys:
            index[test] = keys
    for test in list(index)[: max(0, len(index) - MAX_TESTS)]:
        del index[test]
    store.set(index_key(namespace), json.dumps(index, separators=(",", ":")).encode(), ttl)
