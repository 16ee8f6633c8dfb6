"""`metrion-cache serve`: the cache as a local proxy, with the original proxy's semantics.

Every proxy here is the real command (`python -m metrion_fixture.cli serve`) in its own process on
a free loopback port, with the simulated provider as every upstream (`--upstream NAME=URL`). The
clients are curl, requests, the Python SDKs and (slow) the Node SDKs; the store is the test Redis,
which the tests read directly to see what was (and was not) stored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import provider_sdk_calls
import pytest
import redis
import requests
import sdk_calls
from conftest import REDIS_URL

from metrion_fixture.reporting.reports import stats
from metrion_fixture.runtime.ledger import read_records
from metrion_fixture.stores import open_store
from metrion_fixture.testing.provider import SimulatedProvider

ROOT = Path(__file__).resolve().parent.parent
NODE_SDK_DIR = ROOT / ".cache" / "node-sdk"
ON = {"x-metrion-cache": "true"}
ROUTED = ("anthropic", "openai", "gemini", "mistral")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


class Proxy:
    """One `metrion-cache serve` process; its output (uvicorn's log included) is kept for the assertions."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, host: str = "127.0.0.1", wait: bool = True
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("METRION_CACHE_", "METRION_PROXY_"))}
        self._log = tempfile.TemporaryFile()
        command = [sys.executable, "-m", "metrion_fixture.cli", "serve", "--host", host, "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, *args], stdout=self._log, stderr=subprocess.STDOUT, env={**clean, **(env or {})}, cwd=ROOT
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the proxy exited with {self.process.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/_metrion/health", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.05)
        pytest.fail(f"the proxy did not answer within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def upstream_args(provider: SimulatedProvider, *extra: str) -> list[str]:
    args = [arg for name in ROUTED for arg in ("--upstream", f"{name}={provider.url}")]
    return [*args, *extra]


def entries_in(namespace: str) -> dict[str, bytes]:
    """The namespace's stored values by key (single-flight locks left out)."""
    client = redis.Redis.from_url(REDIS_URL)
    keys = [key.decode() for key in client.scan_iter(match=f"{namespace}:*", count=1000)]
    return {key: client.get(key) for key in keys if not key.endswith(":lock")}


def ttl_of(storage_key: str) -> int:
    return int(redis.Redis.from_url(REDIS_URL).ttl(storage_key))


def cleanup(namespace: str) -> None:
    store = open_store(REDIS_URL)
    store.delete_prefix(f"{namespace}:")
    store.delete_prefix(f"_ledger:{namespace}:")


def anthropic_body(question: str, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-test",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": question}],
    }
    return {**body, "stream": True} if stream else body


def unique(text: str = "What are your delivery times?") -> str:
    return f"{text} [{uuid.uuid4().hex[:10]}]"


@pytest.fixture(scope="module")
def module_namespace() -> Iterator[str]:
    namespace = f"test-proxy-{uuid.uuid4().hex[:10]}"
    yield namespace
    cleanup(namespace)


@pytest.fixture(scope="module")
def proxy(_provider_server: SimulatedProvider, redis_url: str, module_namespace: str) -> Iterator[Proxy]:
    """The default proxy (mode off), every provider routed to the simulated one, plus a route to nowhere."""
    down = f"down=http://127.0.0.1:{closed_port()}"
    server = Proxy(
        "--url", redis_url, "--namespace", module_namespace, *upstream_args(_provider_server, "--upstream", down)
    )
    yield server
    server.stop()


def post(proxy: Proxy, path: str, body: Any, headers: dict[str, str] | None = None, **options: Any) -> Any:
    return requests.post(proxy.url + path, json=body, headers=headers or {}, timeout=30, **options)


# -- the SDKs, through the proxy's base URL ------------------------------------------------------------------


def sdk_call(sdk: str, proxy: Proxy, question: str, stream: bool) -> tuple[str, str | None]:
    """One call through a real Python SDK opted in with the header; (answer text, x-metrion-cache or None)."""
    if sdk in ("anthropic", "openai"):
        base = f"{proxy.url}/{sdk}"
        answer = sdk_calls.call(
            sdk, base, stream=stream, messages=[{"role": "user", "content": question}], extra_headers=ON
        )
        return answer.text, answer.cache
    base = f"{proxy.url}/{ {'responses': 'openai'}.get(sdk, sdk) }"
    reply = provider_sdk_calls.call(sdk, base, stream=stream, question=question, headers=ON)
    return reply.text, (reply.headers or {}).get("x-metrion-cache")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", ["anthropic", "openai", "responses", "gemini", "mistral"])
def test_sdk_through_the_proxy_misses_then_hits(proxy, provider, sdk, stream):
    """A real SDK with its base URL on the proxy: the first call reaches the provider, the second is a HIT."""
    question = unique()
    first_text, first_cache = sdk_call(sdk, proxy, question, stream)
    second_text, second_cache = sdk_call(sdk, proxy, question, stream)

    assert provider.call_count == 1
    assert first_text == second_text and first_text
    if first_cache is not None:  # the SDKs that let a caller see the headers
        assert (first_cache, second_cache) == ("MISS", "HIT")
    # What reached the provider: the SDK's own credential, none of the proxy's headers.
    sent = provider.calls[0].headers
    assert "x-metrion-cache" not in sent and "x-metrion-proxy-token" not in sent
    assert {"x-api-key", "authorization", "x-goog-api-key"} & set(sent)
    assert sent["accept-encoding"] == "identity"


# -- curl and requests -------------------------------------------------------------------------------------------


def curl(proxy: Proxy, path: str, body: Any, *headers: str) -> tuple[dict[str, str], str]:
    command = ["curl", "-sS", "-N", "-D", "-", proxy.url + path, "-H", "content-type: application/json"]
    for header in headers:
        command += ["-H", header]
    done = subprocess.run([*command, "--data-binary", json.dumps(body)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    head, _, text = done.stdout.replace("\r\n", "\n").partition("\n\n")
    fields = dict(line.split(": ", 1) for line in head.splitlines()[1:])
    return {name.lower(): value for name, value in fields.items()}, text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_curl_miss_then_hit(proxy, provider, stream):
    body = anthropic_body(unique(), stream=stream)
    first_headers, first = curl(proxy, "/anthropic/v1/messages", body, "x-metrion-cache: true", "x-api-key: sk-curl")
    second_headers, second = curl(proxy, "/anthropic/v1/messages", body, "x-metrion-cache: true", "x-api-key: sk-curl")

    assert (first_headers["x-metrion-cache"], second_headers["x-metrion-cache"]) == ("MISS", "HIT")
    assert first_headers["x-metrion-cache-key"] == second_headers["x-metrion-cache-key"]
    assert second_headers["age"].isdigit() and "age" not in first_headers
    assert first == second and provider.call_count == 1
    if stream:
        assert second_headers["content-type"].startswith("text/event-stream")
        assert "event: message_stop" in second and second_headers.get("transfer-encoding") == "chunked"
    else:
        assert json.loads(second)["type"] == "message" and int(second_headers["content-length"]) == len(second)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_requests_miss_then_hit_for_openai_chat(proxy, provider, stream):
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": unique()}], "stream": stream}
    answers = []
    for _ in range(2):
        response = post(proxy, "/openai/v1/chat/completions", body, {**ON, "authorization": "Bearer sk-r"}, stream=True)
        answers.append((response.headers["x-metrion-cache"], b"".join(response.iter_content(chunk_size=None))))
    assert [cache for cache, _ in answers] == ["MISS", "HIT"]
    assert answers[0][1] == answers[1][1] and provider.call_count == 1
    assert (b"data: [DONE]" in answers[1][1]) is stream


# -- the header's semantics ------------------------------------------------------------------------------------


def test_without_the_header_the_default_proxy_passes_through_and_stores_nothing(proxy, provider, module_namespace):
    """Mode off: no header, no cache. The response says BYPASS (as in-process) and nothing is written."""
    body = anthropic_body(unique())
    responses = [post(proxy, "/anthropic/v1/messages", body, {"x-api-key": "sk-pass"}) for _ in range(2)]

    assert [r.status_code for r in responses] == [200, 200]
    assert [r.headers["x-metrion-cache"] for r in responses] == ["BYPASS", "BYPASS"]
    assert provider.call_count == 2
    key = responses[0].headers["x-metrion-cache-key"]
    assert not [stored for stored in entries_in(module_namespace) if key in stored]
    # Passed through untouched: the provider's cookie too (a hit never replays one).
    assert "__sim_session" in responses[0].headers.get("set-cookie", "")


def test_refresh_calls_the_provider_and_replaces_the_entry(proxy, provider):
    body = anthropic_body(unique())
    first = post(proxy, "/anthropic/v1/messages", body, ON)
    refreshed = post(proxy, "/anthropic/v1/messages", body, {"x-metrion-cache": "refresh"})
    after = post(proxy, "/anthropic/v1/messages", body, ON)

    assert [r.headers["x-metrion-cache"] for r in (first, refreshed, after)] == ["MISS", "REFRESH", "HIT"]
    assert provider.call_count == 2
    assert after.json()["id"] == refreshed.json()["id"] != first.json()["id"]


@pytest.mark.parametrize(
    ("cache_control", "expected"),
    [(None, 7 * 86400), ("max-age=3600", 3600), ("no-transform, max-age=99999999999", 365 * 86400)],
    ids=["default-7d", "max-age", "capped-365d"],
)
def test_cache_control_max_age_sets_the_ttl(proxy, module_namespace, cache_control, expected):
    headers = {**ON, **({"cache-control": cache_control} if cache_control else {})}
    response = post(proxy, "/anthropic/v1/messages", anthropic_body(unique()), headers)
    assert response.headers["x-metrion-cache"] == "MISS"
    key = response.headers["x-metrion-cache-key"]
    (stored,) = [name for name in entries_in(module_namespace) if name.endswith(key)]
    assert expected - 60 <= ttl_of(stored) <= expected


def test_max_age_zero_is_not_stored(proxy, provider, module_namespace):
    body = anthropic_body(unique())
    headers = {**ON, "cache-control": "max-age=0"}
    responses = [post(proxy, "/anthropic/v1/messages", body, headers) for _ in range(2)]
    assert provider.call_count == 2
    key = responses[0].headers["x-metrion-cache-key"]
    assert not [name for name in entries_in(module_namespace) if name.endswith(key)]


def test_a_bad_header_value_gets_the_providers_400(proxy, provider):
    response = post(proxy, "/anthropic/v1/messages", anthropic_body(unique()), {"x-metrion-cache": "yes"})
    assert response.status_code == 400 and provider.call_count == 0
    assert response.json()["type"] == "error" and "x-metrion-cache" in response.json()["error"]["message"]
    assert response.headers["x-should-retry"] == "false" and response.headers["x-metrion-cache"] == "ERROR"

    contents = {"contents": [{"role": "user", "parts": [{"text": unique()}]}]}
    gemini = post(proxy, "/gemini/v1beta/models/gemini-2.5-flash:generateContent", contents, {"x-metrion-cache": "?"})
    assert gemini.status_code == 400 and gemini.json()["error"]["status"] == "INVALID_ARGUMENT"


# -- routes, the provider, the store ----------------------------------------------------------------------------


def test_unknown_prefix_is_a_404_naming_the_routes(proxy, provider):
    response = requests.get(proxy.url + "/azure/openai/deployments", timeout=10)
    assert response.status_code == 404 and provider.call_count == 0
    message = response.json()["error"]["message"]
    for route in ("/anthropic", "/openai", "/gemini", "/mistral", "/xai", "/down"):
        assert route in message


def test_other_provider_paths_and_queries_pass_through_untouched(proxy, provider):
    response = requests.get(proxy.url + "/openai/v1/models?limit=2&after=x", headers=ON, timeout=10)
    assert response.status_code == 404  # the simulated provider has no such route: its own answer
    assert "x-metrion-cache" not in response.headers and "request-id" in response.headers
    (call,) = provider.calls
    assert (call.method, call.path, call.query) == ("GET", "/v1/models", "limit=2&after=x")
    assert "x-metrion-cache" not in call.headers  # the proxy's header never reaches the provider


def test_a_compressed_answer_is_decoded_once_and_a_passed_through_one_kept_as_sent(proxy, provider):
    """The proxy asks for identity; a provider that compresses anyway is still relayed correctly."""
    body = anthropic_body(unique())
    cached = [post(proxy, "/anthropic/v1/messages", body, {**ON, "x-simulate": "gzip"}) for _ in range(2)]
    assert [r.headers["x-metrion-cache"] for r in cached] == ["MISS", "HIT"]
    assert cached[0].json() == cached[1].json() and "content-encoding" not in cached[1].headers
    passed = post(proxy, "/anthropic/v1/messages", body, {"x-simulate": "gzip"}, stream=True)
    assert passed.headers["content-encoding"] == "gzip" and passed.headers["x-metrion-cache"] == "BYPASS"
    assert json.loads(b"".join(passed.iter_content(chunk_size=None)))["type"] == "message"


def test_an_unreachable_provider_is_a_502_in_its_shape(proxy):
    anthropic = post(proxy, "/down/v1/messages", anthropic_body(unique()), ON)
    assert anthropic.status_code == 502 and anthropic.json()["type"] == "error"
    assert "could not reach the provider" in anthropic.json()["error"]["message"]

    gemini = post(proxy, "/down/v1beta/models/gemini-2.5-flash:generateContent?key=AIza-secret", {"contents": []}, ON)
    assert gemini.status_code == 502 and gemini.json()["error"]["code"] == 502
    assert "AIza-secret" not in gemini.text

    other = requests.get(proxy.url + "/down/v1/models", timeout=10)
    assert other.status_code == 502 and other.json()["error"]["type"] == "api_error"


def test_an_unreachable_provider_is_recorded_in_stats_and_the_ledger(redis_url, namespace):
    """The 502 is a call like any other failed one: counted and in the ledger, with its status and key."""
    down = f"down=http://127.0.0.1:{closed_port()}"
    server = Proxy("--url", redis_url, "--namespace", namespace, "--upstream", down)
    try:
        opted_in = post(server, "/down/v1/messages", anthropic_body(unique()), ON)
        passed = post(server, "/down/v1/messages", anthropic_body(unique()))
        assert [opted_in.status_code, passed.status_code] == [502, 502]
        # The response says what the ledger says: the call missed (or bypassed) and reached no provider.
        assert [opted_in.headers["x-metrion-cache"], passed.headers["x-metrion-cache"]] == ["MISS", "BYPASS"]
        assert opted_in.headers["x-metrion-cache-key"] != passed.headers["x-metrion-cache-key"]
    finally:
        server.stop()  # a clean stop writes the ledger
    try:
        records = read_records(open_store(redis_url), namespace)
        assert sorted((r["status"], r["http_status"]) for r in records) == [("BYPASS", 502), ("MISS", 502)]
        assert {r["key"] for r in records} == {
            opted_in.headers["x-metrion-cache-key"],
            passed.headers["x-metrion-cache-key"],
        }
        totals = stats(open_store(redis_url), namespace).total
        assert (totals.misses, totals.bypassed) == (1, 1)
    finally:
        cleanup(namespace)


def test_a_broken_store_never_fails_a_request(_provider_server, provider):
    """A Redis URL to a closed port: every request still gets the provider's answer."""
    server = Proxy("--url", f"redis://127.0.0.1:{closed_port()}/0", "--mode", "true", *upstream_args(_provider_server))
    try:
        started = time.monotonic()
        responses = [post(server, "/anthropic/v1/messages", anthropic_body("Store down?")) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all(r.json()["type"] == "message" for r in responses)
        assert provider.call_count == 3 and time.monotonic() - started < 10
    finally:
        server.stop()


def test_mode_true_caches_without_the_header_and_replay_never_calls_the_provider(
    _provider_server, provider, redis_url, namespace
):
    common = ("--url", redis_url, "--namespace", namespace, *upstream_args(_provider_server))
    cached = Proxy(*common, "--mode", "true", wait=False)
    replay = Proxy(*common, "--mode", "replay", wait=False)
    try:
        cached.wait_ready()
        replay.wait_ready()
        body = anthropic_body(unique())
        assert [post(cached, "/anthropic/v1/messages", body).headers["x-metrion-cache"] for _ in range(2)] == [
            "MISS",
            "HIT",
        ]
        assert post(replay, "/anthropic/v1/messages", body).headers["x-metrion-cache"] == "HIT"
        missing = post(replay, "/anthropic/v1/messages", anthropic_body(unique()), {"x-metrion-cache": "refresh"})
        assert missing.status_code == 400 and "replay mode" in missing.json()["error"]["message"]
        assert provider.call_count == 1
    finally:
        cached.stop()
        replay.stop()
        cleanup(namespace)


def test_two_proxies_on_one_redis_share_answers_and_make_one_provider_call(
    _provider_server, provider, redis_url, namespace
):
    """The team setup: stateless processes on one store. Concurrent identical misses make one call."""
    args = ("--url", redis_url, "--namespace", namespace, "--mode", "true", *upstream_args(_provider_server))
    servers = [Proxy(*args, wait=False) for _ in range(2)]  # started side by side
    try:
        for server in servers:
            server.wait_ready()
        _provider_server.latency = 0.3
        body = anthropic_body(unique())
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda server: post(server, "/anthropic/v1/messages", body), servers))
        assert sorted(answer.headers["x-metrion-cache"] for answer in answers) == ["HIT", "MISS"]
        assert answers[0].json() == answers[1].json() and provider.call_count == 1

        other = anthropic_body(unique())
        assert post(servers[0], "/anthropic/v1/messages", other).headers["x-metrion-cache"] == "MISS"
        assert post(servers[1], "/anthropic/v1/messages", other).headers["x-metrion-cache"] == "HIT"
    finally:
        _provider_server.latency = 0.0
        for server in servers:
            server.stop()
        cleanup(namespace)


# -- credentials and the token ---------------------------------------------------------------------------------


def test_credentials_are_forwarded_and_never_stored(_provider_server, provider, redis_url, namespace):
    """Every credential form reaches the provider; none is in any stored key or value, ledger included."""
    secrets = {name: f"SECRET-{name}-{uuid.uuid4().hex}" for name in ("xapi", "bearer", "goog", "query", "azure")}
    server = Proxy("--url", redis_url, "--namespace", namespace, *upstream_args(_provider_server))
    try:
        post(server, "/anthropic/v1/messages", anthropic_body(unique()), {**ON, "x-api-key": secrets["xapi"]})
        chat = {"model": "gpt-test", "messages": [{"role": "user", "content": unique()}]}
        post(server, "/openai/v1/chat/completions", chat, {**ON, "authorization": f"Bearer {secrets['bearer']}"})
        streamed = {"model": "gpt-test", "messages": [{"role": "user", "content": unique()}], "stream": True}
        post(server, "/openai/v1/chat/completions", streamed, {**ON, "api-key": secrets["azure"]})
        gemini = {"contents": [{"role": "user", "parts": [{"text": unique()}]}]}
        path = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
        post(server, path, gemini, {**ON, "x-goog-api-key": secrets["goog"]})
        other = {"contents": [{"role": "user", "parts": [{"text": unique()}]}]}
        post(server, f"{path}?key={secrets['query']}", other, ON)
    finally:
        server.stop()  # a clean stop writes the ledger too
        output = server.output()

    received = json.dumps([(call.headers, call.query) for call in provider.calls])
    assert [name for name, secret in secrets.items() if secret not in received] == []
    client = redis.Redis.from_url(redis_url)
    keys = [*client.scan_iter(match=f"{namespace}:*"), *client.scan_iter(match=f"_ledger:{namespace}:*")]
    assert len([key for key in keys if key.startswith(b"_ledger:")]) >= 1  # the scan did see the ledger
    assert len(keys) >= 6
    stored = b"".join(key + (client.get(key) or b"") for key in keys)
    for secret in secrets.values():
        assert secret.encode() not in stored
        assert secret not in output  # uvicorn's access log prints the query: ?key= is masked
    assert "key=***" in output
    cleanup(namespace)


def test_a_non_loopback_bind_needs_a_token():
    done = subprocess.run(
        [sys.executable, "-m", "metrion_fixture.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "METRION_PROXY_TOKEN"},
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in done.stderr and "--token" in done.stderr


def test_with_a_token_requests_without_it_get_401(_provider_server, provider, redis_url, namespace):
    """The token and the store come from the environment (METRION_PROXY_TOKEN, METRION_CACHE_URL)."""
    env = {"METRION_PROXY_TOKEN": "team-token", "METRION_CACHE_URL": redis_url}
    server = Proxy("--namespace", namespace, *upstream_args(_provider_server), host="0.0.0.0", env=env)
    try:
        body = anthropic_body(unique())
        missing = post(server, "/anthropic/v1/messages", body, ON)
        wrong = post(server, "/anthropic/v1/messages", body, {**ON, "x-metrion-proxy-token": "guess"})
        unknown = requests.get(server.url + "/nowhere", timeout=10)
        assert [r.status_code for r in (missing, wrong, unknown)] == [401, 401, 401]
        assert "x-metrion-proxy-token" in missing.json()["error"]["message"] and provider.call_count == 0
        assert missing.json()["type"] == "error"  # the Anthropic route answers in Anthropic's error shape

        allowed = post(server, "/anthropic/v1/messages", body, {**ON, "x-metrion-proxy-token": "team-token"})
        assert allowed.status_code == 200 and allowed.headers["x-metrion-cache"] == "MISS"
        assert "x-metrion-proxy-token" not in provider.calls[0].headers
        assert [key for key in entries_in(namespace) if key.endswith(allowed.headers["x-metrion-cache-key"])]
    finally:
        server.stop()
        cleanup(namespace)


# -- streams -------------------------------------------------------------------------------------------------------


@pytest.fixture
def slow_chunks(_provider_server: SimulatedProvider) -> Iterator[SimulatedProvider]:
    _provider_server.chunk_delay = 0.05
    try:
        yield _provider_server
    finally:
        _provider_server.chunk_delay = 0.0


def read_stream(response: requests.Response) -> tuple[float, float, int, bytes]:
    """Seconds to the first and to the last chunk, how many reads, and the body."""
    started, first, reads, parts = time.perf_counter(), 0.0, 0, []
    for chunk in response.iter_content(chunk_size=None):
        first = first or time.perf_counter() - started
        reads += 1
        parts.append(chunk)
    return first, time.perf_counter() - started, reads, b"".join(parts)


def test_a_streamed_miss_is_relayed_chunk_by_chunk(proxy, provider, slow_chunks):
    body = anthropic_body(unique("Hi"), stream=True)
    response = post(proxy, "/anthropic/v1/messages", body, ON, stream=True)
    first, total, reads, data = read_stream(response)
    assert response.headers["x-metrion-cache"] == "MISS" and data.rstrip().endswith(b'{"type":"message_stop"}')
    # ~12 events 50 ms apart: the first arrives long before the last, each in its own read.
    assert total > 0.4 and first < total / 4 and reads >= 5

    replay = post(proxy, "/anthropic/v1/messages", body, ON, stream=True)
    assert replay.headers["x-metrion-cache"] == "HIT" and read_stream(replay)[3] == data


def test_a_client_that_leaves_mid_stream_stores_nothing(proxy, provider, module_namespace, slow_chunks):
    body = anthropic_body(unique("Leave early please"), stream=True)
    data = json.dumps(body).encode()
    head = (
        "POST /anthropic/v1/messages HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n"
        f"x-metrion-cache: true\r\ncontent-length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        client.sendall(head.encode() + data)
        received = b""
        while b"message_start" not in received:
            received += client.recv(65536)
    # The client is gone after the first event; the provider would go on for ~0.6 s more.
    key = next(line.split(b": ")[1] for line in received.split(b"\r\n") if line.startswith(b"x-metrion-cache-key"))
    time.sleep(1.0)
    assert not [name for name in entries_in(module_namespace) if name.endswith(key.decode())]
    again = post(proxy, "/anthropic/v1/messages", body, ON)
    assert again.headers["x-metrion-cache"] == "MISS" and provider.call_count == 2


def test_graceful_shutdown_finishes_streams_in_flight(_provider_server, provider, redis_url, namespace, slow_chunks):
    """SIGTERM mid-stream: the stream still ends whole, is stored, and the ledger is written before exit."""
    server = Proxy("--url", redis_url, "--namespace", namespace, *upstream_args(_provider_server))
    try:
        passed = post(server, "/anthropic/v1/messages", anthropic_body(unique()))  # a BYPASS, for the ledger
        assert passed.headers["x-metrion-cache"] == "BYPASS"
        body = anthropic_body(unique("Finish me"), stream=True)
        response = post(server, "/anthropic/v1/messages", body, ON, stream=True)
        chunks = response.iter_content(chunk_size=None)
        first = next(chunks)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        rest = b"".join(chunks)
        stopper.join(30)
        assert server.process.returncode is not None, server.output()
        assert (first + rest).rstrip().endswith(b'{"type":"message_stop"}')
        key = response.headers["x-metrion-cache-key"]
        assert [name for name in entries_in(namespace) if name.endswith(f":stream:{key}")]
        totals = stats(open_store(redis_url), namespace).total
        assert (totals.misses, totals.bypassed) == (1, 1)
        assert "Waiting for connections to close" in server.output()
    finally:
        server.stop()
        cleanup(namespace)


def test_a_proxy_killed_mid_stream_stores_nothing(_provider_server, provider, redis_url, namespace, slow_chunks):
    server = Proxy("--url", redis_url, "--namespace", namespace, *upstream_args(_provider_server))
    try:
        body = anthropic_body(unique("Cut me"), stream=True)
        response = post(server, "/anthropic/v1/messages", body, ON, stream=True)
        chunks = response.iter_content(chunk_size=None)
        next(chunks)
        server.stop(signal.SIGKILL)
        with pytest.raises(requests.RequestException):
            b"".join(chunks)  # the stream is cut, never completed
        key = response.headers["x-metrion-cache-key"]
        assert not [name for name in entries_in(namespace) if key in name]
    finally:
        server.stop()
        cleanup(namespace)


# -- the README's Node example, with the real Node SDKs --------------------------------------------------------


def node_sdks() -> Path:
    """`@anthropic-ai/sdk` and `openai` from npm, in .cache/node-sdk (installed once, reused while the pins hold)."""
    wanted = (ROOT / "tests" / "node" / "package.json").read_text()
    manifest = NODE_SDK_DIR / "package.json"
    installed = all((NODE_SDK_DIR / "node_modules" / name).is_dir() for name in ("@anthropic-ai/sdk", "openai"))
    if installed and manifest.exists() and manifest.read_text() == wanted:
        return NODE_SDK_DIR
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the Node SDK test (Node 20+)")
    NODE_SDK_DIR.mkdir(parents=True, exist_ok=True)
    manifest.write_text(wanted)
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE_SDK_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        manifest.unlink(missing_ok=True)  # try again next run
        pytest.fail(f"npm install of the Node SDKs failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return NODE_SDK_DIR


@pytest.mark.slow
def test_the_readme_node_example_with_the_real_node_sdks(proxy, provider, module_namespace):
    sdk_dir = node_sdks()
    run_id = uuid.uuid4().hex[:10]
    done = subprocess.run(
        ["node", str(ROOT / "tests" / "node" / "proxy_example.mjs")],
        env={**os.environ, "SDK_DIR": str(sdk_dir), "PROXY_URL": proxy.url, "RUN_ID": run_id},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    seen = {(line["sdk"], line["step"]): line for line in lines}
    for sdk in ("anthropic", "openai"):
        steps = {step: seen[(sdk, step)] for step in ("first", "second", "refresh", "max-age")}
        assert [steps[s]["cache"] for s in ("first", "second", "refresh")] == ["MISS", "HIT", "REFRESH"]
        assert steps["first"]["text"] == steps["second"]["text"] and "delivery" in steps["first"]["text"]
        assert steps["second"]["age"] is not None and steps["first"]["key"] == steps["second"]["key"]
        assert steps["max-age"]["cache"] == "MISS"
        (stored,) = [name for name in entries_in(module_namespace) if name.endswith(steps["max-age"]["key"])]
        assert 3600 - 60 <= ttl_of(stored) <= 3600
        first, second = seen[(sdk, "stream-first")], seen[(sdk, "stream-second")]
        assert (first["cache"], second["cache"]) == ("MISS", "HIT") and first["text"] == second["text"] != ""
    # Per SDK: a miss, a refresh, the max-age miss and the streamed miss reached the provider.
    assert provider.call_count == 8
    assert all("x-metrion" not in name for call in provider.calls for name in call.headers)
