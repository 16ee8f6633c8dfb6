"""Shared fixtures: the simulated provider on loopback, the three stores, a cache session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

import metrion_fixture
from metrion_fixture.stores import open_store
from metrion_fixture.testing.provider import SimulatedProvider

REDIS_URL = os.environ.get("METRION_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
STORE_KINDS = ("memory", "sqlite", "redis")


@pytest.fixture(scope="session")
def _provider_server() -> Iterator[SimulatedProvider]:
    with SimulatedProvider() as provider:
        yield provider


@pytest.fixture
def provider(_provider_server: SimulatedProvider) -> SimulatedProvider:
    _provider_server.reset()
    return _provider_server


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The test Redis. Missing Redis is a failure, never a skip: .ci/run starts one."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.fail(f"Redis at {REDIS_URL} does not answer ({error}); start redis-server or set METRION_TEST_REDIS_URL")
    return REDIS_URL


@pytest.fixture
def other(redis_url: str) -> Iterator[redis.Redis]:
    """Another client of the test Redis: another process, as far as a store can tell."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def make_store_url(kind: str, tmp_path, request: pytest.FixtureRequest) -> str:
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'cache.sqlite3'}"
    return request.getfixturevalue("redis_url")


@pytest.fixture(params=STORE_KINDS)
def store_url(request: pytest.FixtureRequest, tmp_path, namespace: str) -> Iterator[str]:
    url = make_store_url(request.param, tmp_path, request)
    yield url
    store = open_store(url)
    store.delete_prefix(f"{namespace}:")
    store.delete_prefix(f"_ledger:{namespace}:")


@pytest.fixture
def session(store_url: str, namespace: str) -> Iterator[metrion_fixture.CacheSession]:
    """The cache, active for the test, on each store in turn."""
    with metrion_fixture.cache(store_url, namespace=namespace) as active:
        yield active


@pytest.fixture
def memory_session(namespace: str) -> Iterator[metrion_fixture.CacheSession]:
    """The cache on the in-process store, for tests of semantics that do not depend on the store."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace) as active:
        yield active
