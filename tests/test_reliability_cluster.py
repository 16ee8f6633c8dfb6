"""Redis Cluster: redis+cluster:// works like redis://, on a real three-node cluster the test starts and stops."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import httpx2
import pytest
import redis
import redis.cluster
from sdk_calls import acall, call

import metrion_fixture
from metrion_fixture.stores import open_store
from metrion_fixture.stores.redis import RedisClusterStore

pytestmark = pytest.mark.slow  # run by .ci/run; skip in a quick local loop with -m 'not slow'


def free_ports(count: int) -> list[int]:
    # Cluster nodes also listen on port + 10000 (the cluster bus): pick ports with both free.
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three redis-server --cluster-enabled nodes under a temporary directory, joined with redis-cli --cluster create."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.fail("redis-server and redis-cli are needed for the Redis Cluster test (.ci/run installs Redis)")
    root = tmp_path_factory.mktemp("redis-cluster")
    ports = free_ports(3)
    nodes = []
    try:
        for port in ports:
            workdir = root / str(port)
            workdir.mkdir()
            nodes.append(
                subprocess.Popen(
                    [
                        server,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(workdir / "nodes.conf"),
                        "--dir",
                        str(workdir),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            _wait_for(lambda port=port: redis.Redis(port=port).ping())
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports), "--cluster-replicas", "0"]
            + ["--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        _wait_for(lambda: redis.Redis(port=ports[0]).cluster("info")["cluster_state"] == "ok")
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.wait(timeout=30)
        open_store_cache_forget(ports)


def open_store_cache_forget(ports: list[int]) -> None:
    from metrion_fixture import stores

    for url in [url for url in stores._open_stores if f":{ports[0]}" in url]:
        stores._open_stores.pop(url).close()


def _wait_for(check, attempts: int = 200) -> None:
    for _ in range(attempts):
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise AssertionError("the Redis Cluster did not come up")


def test_the_url_opens_a_cluster_client(cluster_url):
    """redis+cluster:// opens a RedisCluster-backed store that sees all three primaries."""
    store = open_store(cluster_url)
    assert isinstance(store, RedisClusterStore)
    assert isinstance(store._sync(), redis.cluster.RedisCluster)
    assert len(store._sync().get_primaries()) == 3


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_miss_then_hit_through_the_cluster(provider, cluster_url, namespace, stream, use_async):
    """An SDK call is stored in the cluster and the next identical one is a HIT, sync and async."""
    with metrion_fixture.cache(cluster_url, namespace=namespace) as session:
        if use_async:

            async def twice() -> list:
                return [await acall("anthropic", provider.url, stream=stream) for _ in range(2)]

            answers = asyncio.run(twice())
        else:
            answers = [call("anthropic", provider.url, stream=stream) for _ in range(2)]
    assert [a.cache for a in answers] == ["MISS", "HIT"]
    assert answers[0].text == answers[1].text and provider.call_count == 1
    assert session.stats.store_errors == 0
    key = [k for k in session.store.keys(f"{namespace}:") if not k.endswith(":lock")]
    assert len(key) == 1 and 0 < session.store.ttl(key[0]) <= 7 * 86400


def test_entries_spread_over_the_nodes_are_listed_and_cleared(provider, cluster_url, namespace):
    """Entries land on every node (different hash slots); keys() and clear() see all of them."""
    store = open_store(cluster_url)
    names = [f"{namespace}:anthropic_messages:json:{uuid.uuid4().hex}" for _ in range(30)]
    for name in names:
        store.set(name, b"value", 600)
    client = store._sync()
    nodes = {client.get_node_from_key(name).name for name in names}
    assert len(nodes) == 3
    assert store.keys(f"{namespace}:") == sorted(names)
    with metrion_fixture.cache(cluster_url, namespace=namespace) as session:
        assert session.clear() == 30
    assert store.keys(f"{namespace}:") == []


def test_single_flight_through_the_cluster(cluster_url, namespace):
    """20 threads with one question, through the cluster: one provider call, its lock key expires by itself."""
    calls: list[int] = []
    lock = threading.Lock()
    answer = {"id": "m", "type": "message", "role": "assistant", "content": [{"type": "text", "text": "ok"}]}

    def handler(request: httpx2.Request) -> httpx2.Response:
        with lock:
            calls.append(1)
        time.sleep(0.2)
        return httpx2.Response(200, json=answer)

    session = metrion_fixture.CacheSession(cluster_url, namespace=namespace)
    from metrion_fixture.transports.httpx2 import CacheTransport

    body = {"model": "m", "messages": [{"role": "user", "content": "cluster question"}]}
    tags: list[str] = []
    start = threading.Barrier(20)

    def one() -> None:
        start.wait()
        with httpx2.Client(transport=CacheTransport(httpx2.MockTransport(handler), session=session)) as client:
            tags.append(client.post("https://p.test/v1/messages", json=body).headers["x-metrion-cache"])

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1
    assert sorted(tags) == ["HIT"] * 19 + ["MISS"]
    session.clear()


def test_a_bad_cluster_url_is_refused():
    """A malformed redis+cluster:// URL raises MetrionCacheError naming the cluster form."""
    with pytest.raises(metrion_fixture.MetrionCacheError, match="Redis Cluster"):
        open_store("redis+cluster://127.0.0.1:notaport")
