"""Grok through the official xai-sdk (gRPC): the real sync and async clients against a local gRPC server
built from the SDK's own chat servicer, cached like every other format."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
import xai_sdk
from google.protobuf.json_format import MessageToDict
from xai_sdk.chat import system, user
from xai_sdk.proto import chat_pb2, chat_pb2_grpc, usage_pb2

import metrion_fixture
from metrion_fixture.core.engine import storage_key
from metrion_fixture.core.entry import Entry
from metrion_fixture.transports.grpc import intercept_channel

API_KEY = "xai-test-secret-3f9d2c"
MODEL = "grok-3"
WORDS = ["Hello", " from", " the", " fake", " Grok", "."]


class FakeChat(chat_pb2_grpc.ChatServicer):
    """Answers with fixed words; a prompt containing ABORT gets a stream that fails mid-way, SLOW waits first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def _note(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append((method, dict(context.invocation_metadata())))

    @property
    def call_count(self) -> int:
        return len(self.calls)

    def GetCompletion(self, request, context):
        self._note("GetCompletion", context)
        if "SLOW" in str(request.messages):
            time.sleep(0.3)  # long enough for concurrent callers to pile up behind the first
        return chat_pb2.GetChatCompletionResponse(
            id="resp-1",
            model=request.model,
            outputs=[
                chat_pb2.CompletionOutput(
                    index=0,
                    message=chat_pb2.CompletionMessage(content="".join(WORDS), role=chat_pb2.ROLE_ASSISTANT),
                )
            ],
            usage=usage_pb2.SamplingUsage(prompt_tokens=12, completion_tokens=6, total_tokens=18),
        )

    def GetCompletionChunk(self, request, context):
        self._note("GetCompletionChunk", context)
        abort = "ABORT" in str(request.messages)
        if "SLOW" in str(request.messages):
            time.sleep(0.3)
        for index, word in enumerate(WORDS):
            if abort and index == 2:
                context.abort(grpc.StatusCode.INTERNAL, "upstream failed mid-stream")
            last = index == len(WORDS) - 1
            yield chat_pb2.GetChatCompletionChunk(
                id="resp-1",
                model=request.model,
                outputs=[
                    chat_pb2.CompletionOutputChunk(
                        index=0, delta=chat_pb2.Delta(content=word, role=chat_pb2.ROLE_ASSISTANT)
                    )
                ],
                usage=usage_pb2.SamplingUsage(prompt_tokens=12, completion_tokens=6, total_tokens=18) if last else None,
            )


@pytest.fixture(scope="module")
def _server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = FakeChat()
    chat_pb2_grpc.add_ChatServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def fake(_server):
    servicer, _ = _server
    servicer.calls.clear()
    return servicer


@pytest.fixture
def host(_server) -> str:
    return _server[1]


def sync_client(host: str, **options) -> xai_sdk.Client:
    return xai_sdk.Client(api_key=API_KEY, api_host=host, use_insecure_channel=True, **options)


def prompt_messages(text: str) -> list:
    return [system("Be brief."), user(text)]


def expected_key(text: str) -> str:
    return metrion_fixture.cache_key(
        MODEL, [MessageToDict(m, preserving_proto_field_name=True) for m in prompt_messages(text)]
    )


def run_sync(host: str, text: str, stream: bool, **options) -> tuple[str, list[str]]:
    with sync_client(host, **options) as client:
        chat = client.chat.create(model=MODEL, messages=prompt_messages(text))
        if not stream:
            return chat.sample().content, []
        pieces = [chunk.content for _, chunk in chat.stream()]
        return "".join(pieces), pieces


def run_async(host: str, text: str, stream: bool, **options) -> tuple[str, list[str]]:
    async def go():
        client = xai_sdk.AsyncClient(api_key=API_KEY, api_host=host, use_insecure_channel=True, **options)
        try:
            chat = client.chat.create(model=MODEL, messages=prompt_messages(text))
            if not stream:
                return (await chat.sample()).content, []
            pieces = [chunk.content async for _, chunk in chat.stream()]
            return "".join(pieces), pieces
        finally:
            await client.close()

    return asyncio.run(go())


RUNNERS = {"sync": run_sync, "async": run_async}


def stored_values(session) -> dict[str, bytes]:
    prefix = f"{session.settings.namespace}:"
    return {key: session.store.get(key) for key in session.store.keys(prefix)}


@pytest.mark.parametrize("stream", [False, True], ids=["sample", "stream"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_second_identical_call_is_served_from_cache(memory_session, fake, host, flavour, stream):
    """The second identical Grok call is answered from the cache: same text, same chunks, no server call."""
    run = RUNNERS[flavour]
    text = f"hello {uuid.uuid4().hex}"
    first = run(host, text, stream)
    assert fake.call_count == 1
    second = run(host, text, stream)
    assert fake.call_count == 1
    assert second == first
    assert first[0] == "".join(WORDS)
    if stream:
        assert second[1] == WORDS  # chunk boundaries replayed as the server sent them
    statuses = [(call.status, call.wire_format, call.stream) for call in memory_session.calls]
    assert statuses == [("MISS", "xai_grpc", stream), ("HIT", "xai_grpc", stream)]


@pytest.mark.parametrize("stream", [False, True], ids=["sample", "stream"])
def test_key_is_model_and_messages_and_no_api_key_in_store(memory_session, fake, host, stream):
    """The entry is stored under cache_key(model, messages as dicts); the API key is nowhere in the store."""
    text = "what is the key"
    run_sync(host, text, stream)
    key = expected_key(text)
    where = storage_key(memory_session.settings.namespace, "xai_grpc", "stream" if stream else "json", key)
    values = stored_values(memory_session)
    assert list(values) == [where]
    entry = Entry.decode(values[where])
    assert (entry.key, entry.model, entry.stream, entry.wire_format) == (key, MODEL, stream, "xai_grpc")
    assert len(entry.chunks) == (len(WORDS) if stream else 1)
    assert all(API_KEY.encode() not in value for value in values.values())
    assert all(API_KEY not in name for name in values)
    # The server did get the key (the call was made with it) and never saw our own metadata.
    assert fake.calls[0][1]["authorization"] == f"Bearer {API_KEY}"


def test_stream_and_sample_are_separate_variants(memory_session, fake, host):
    """A stored stream does not answer a non-streamed call (and vice versa): each is its own variant."""
    run_sync(host, "variants", True)
    run_sync(host, "variants", False)
    assert [method for method, _ in fake.calls] == ["GetCompletionChunk", "GetCompletion"]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_stream_aborted_mid_way_is_not_stored(memory_session, fake, host, flavour):
    """A stream the server aborts mid-way reaches the caller as the error and is never stored."""
    with pytest.raises(grpc.RpcError) as raised:
        RUNNERS[flavour](host, "please ABORT", True)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert stored_values(memory_session) == {}
    with pytest.raises(grpc.RpcError):
        RUNNERS[flavour](host, "please ABORT", True)
    assert fake.call_count == 2


def test_stream_left_early_is_not_stored(memory_session, fake, host):
    """A caller that stops reading a stream before its end leaves nothing in the store."""
    with sync_client(host) as client:
        chat = client.chat.create(model=MODEL, messages=prompt_messages("left early"))
        stream = chat.stream()
        next(stream)
        stream.close()
    assert stored_values(memory_session) == {}


def test_stream_dropped_half_read_gives_its_lock_back(memory_session, fake, host):
    """A gRPC call has no close hook: a stream dropped half-read ends once it is garbage-collected, so
    the next identical stream (another thread: a thread never waits for itself) does not wait for the lock."""
    with sync_client(host) as client:
        chat = client.chat.create(model=MODEL, messages=prompt_messages("dropped half-read"))
        stream = chat.stream()
        next(stream)
        del stream, chat
        gc.collect()
        started = time.monotonic()
        answers: list[tuple[str, list[str]]] = []
        in_the_block = contextvars.copy_context()  # a cache() block covers its thread only
        other = threading.Thread(
            target=lambda: answers.append(in_the_block.run(run_sync, host, "dropped half-read", True))
        )
        other.start()
        other.join(timeout=60)
        waited = time.monotonic() - started
    assert answers and answers[0][0], answers
    assert waited < 5, f"the dropped stream's single-flight lock was held {waited:.1f} s"
    assert fake.call_count == 2 and [call.status for call in memory_session.calls] == ["MISS", "MISS"]


@pytest.mark.parametrize("stream", [False, True], ids=["sample", "stream"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_replay_miss_raises_a_grpc_error_naming_model_and_key(namespace, fake, host, flavour, stream):
    """In replay mode a miss never reaches the server: a gRPC error names the model and the key."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace, mode="replay"):
        with pytest.raises(grpc.RpcError) as raised:
            RUNNERS[flavour](host, "never recorded", stream)
    error = raised.value
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith("metrion cache:")
    assert MODEL in error.details() and expected_key("never recorded") in error.details()
    assert fake.call_count == 0


def test_replay_serves_what_was_recorded(namespace, fake, host):
    """A recorded answer is served in replay mode without the server."""
    url = f"memory://{uuid.uuid4().hex}"
    with metrion_fixture.cache(url, namespace=namespace):
        first = run_sync(host, "recorded", True)
    with metrion_fixture.cache(url, namespace=namespace, mode="replay"):
        assert run_sync(host, "recorded", True) == first
    assert fake.call_count == 1


def test_metadata_header_opts_in_and_is_stripped(namespace, fake, host):
    """In an 'off' session, x-metrion-cache: true in the client metadata caches; the server never sees it."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace, mode="off") as session:
        run_sync(host, "opt in", False)
        run_sync(host, "opt in", False)
        assert fake.call_count == 2  # off: not cached without the header
        options = {"metadata": (("x-metrion-cache", "true"),)}
        run_sync(host, "opt in", False, **options)
        run_sync(host, "opt in", False, **options)
        assert fake.call_count == 3
        assert [call.status for call in session.calls] == ["BYPASS", "BYPASS", "MISS", "HIT"]
    assert all("x-metrion-cache" not in metadata for _, metadata in fake.calls)


def test_refresh_header_calls_the_server_and_replaces_the_entry(memory_session, fake, host):
    """x-metrion-cache: refresh goes to the server even when an entry exists, and stores the new answer."""
    run_sync(host, "refresh me", False)
    run_sync(host, "refresh me", False, metadata=(("x-metrion-cache", "refresh"),))
    assert fake.call_count == 2
    run_sync(host, "refresh me", False)
    assert fake.call_count == 2
    assert [call.status for call in memory_session.calls] == ["MISS", "REFRESH", "HIT"]


def test_invalid_header_is_an_invalid_argument_error(memory_session, fake, host):
    """An invalid x-metrion-cache value is refused with INVALID_ARGUMENT and never sent."""
    with pytest.raises(grpc.RpcError) as raised:
        run_sync(host, "bad header", False, metadata=(("x-metrion-cache", "sometimes"),))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("metrion cache:")
    assert fake.call_count == 0


def test_usage_is_recorded_and_a_hit_saves_it(memory_session, fake, host):
    """A miss records the xAI usage it spent; a hit spends 0 tokens and records them as saved."""
    run_sync(host, "usage", True)
    run_sync(host, "usage", True)
    miss, hit = memory_session.calls
    assert (miss.input_tokens, miss.output_tokens, miss.provider) == (12, 6, "xai")
    assert (hit.input_tokens, hit.output_tokens) == (0, 0)
    assert (hit.saved_input_tokens, hit.saved_output_tokens) == (12, 6)


def test_no_session_means_untouched(fake, host):
    """Without an active session the client talks to the server as usual, every time."""
    run_sync(host, "uncached", False)
    run_sync(host, "uncached", False)
    assert fake.call_count == 2


def test_client_made_inside_a_block_passes_through_after_it(namespace, fake, host):
    """A client made while the cache was on stops using it when the block ends."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace):
        client = sync_client(host)
        client.chat.create(model=MODEL, messages=prompt_messages("block")).sample()
        client.chat.create(model=MODEL, messages=prompt_messages("block")).sample()
        assert fake.call_count == 1
    client.chat.create(model=MODEL, messages=prompt_messages("block")).sample()
    assert fake.call_count == 2
    client.close()


def test_explicit_intercept_channel(namespace, fake, host):
    """intercept_channel() caches a channel the user built, for the session given."""
    session = metrion_fixture.CacheSession(f"memory://{uuid.uuid4().hex}", namespace=namespace)
    channel = intercept_channel(grpc.insecure_channel(host), session=session)
    stub = chat_pb2_grpc.ChatStub(channel)
    request = chat_pb2.GetCompletionsRequest(model=MODEL, messages=prompt_messages("explicit"))
    first = stub.GetCompletion(request)
    second = stub.GetCompletion(request)
    assert second == first
    assert fake.call_count == 1
    assert [call.status for call in session.calls] == ["MISS", "HIT"]
    assert session.calls[0].key == expected_key("explicit")
    channel.close()


def test_other_methods_pass_through(memory_session, fake, host):
    """Chat methods other than GetCompletion / GetCompletionChunk are neither cached nor recorded."""
    with sync_client(host) as client:
        for _ in range(2):
            with pytest.raises(grpc.RpcError):  # the fake does not implement it: UNIMPLEMENTED
                client.chat.get_stored_completion("resp-1")
    assert memory_session.calls == []


def test_credential_scope_keeps_entries_private_to_the_api_key(namespace, fake, host):
    """With scope='credential', a client with another xAI key does not get the first key's entry."""
    with metrion_fixture.cache(f"memory://{uuid.uuid4().hex}", namespace=namespace, scope="credential") as session:
        run_sync(host, "private", False)
        run_sync(host, "private", False)
        assert fake.call_count == 1
        with xai_sdk.Client(api_key="xai-other-key", api_host=host, use_insecure_channel=True) as other:
            other.chat.create(model=MODEL, messages=prompt_messages("private")).sample()
        assert fake.call_count == 2
        assert all(API_KEY not in key and "xai-other-key" not in key for key in stored_values(session))


def test_enable_imports_no_grpc_and_patches_xai_sdk_when_imported_later():
    """enable() does not import grpc; xai_sdk imported afterwards is patched, and disable() restores it."""
    import subprocess
    import sys

    code = (
        "import sys, metrion_fixture\n"
        "metrion_fixture.enable('memory://import-check')\n"
        "assert 'grpc' not in sys.modules and 'xai_sdk' not in sys.modules\n"
        "import xai_sdk.sync.client as s, xai_sdk.aio.client as a\n"
        "assert hasattr(s.Client._make_grpc_channel, '__wrapped__')\n"
        "assert hasattr(a.Client._make_grpc_channel, '__wrapped__')\n"
        "metrion_fixture.disable()\n"
        "assert not hasattr(s.Client._make_grpc_channel, '__wrapped__')\n"
        "assert not hasattr(a.Client._make_grpc_channel, '__wrapped__')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_explicit_aio_interceptors(namespace, fake, host):
    """aio_interceptors() caches a grpc.aio channel the user built, streamed chunk by chunk."""
    from metrion_fixture.transports.grpc import aio_interceptors

    session = metrion_fixture.CacheSession(f"memory://{uuid.uuid4().hex}", namespace=namespace)
    request = chat_pb2.GetCompletionsRequest(model=MODEL, messages=prompt_messages("explicit aio"))

    async def go():
        async with grpc.aio.insecure_channel(host, interceptors=aio_interceptors(session=session)) as channel:
            stub = chat_pb2_grpc.ChatStub(channel)
            first = [chunk async for chunk in stub.GetCompletionChunk(request)]
            return first, [chunk async for chunk in stub.GetCompletionChunk(request)]

    first, second = asyncio.run(go())
    assert second == first and len(first) == len(WORDS)
    assert fake.call_count == 1
    assert [call.status for call in session.calls] == ["MISS", "HIT"]


@pytest.mark.parametrize("stream", [False, True], ids=["sample", "stream"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_dead_store_never_fails_the_call(namespace, fake, host, flavour, stream):
    """With the store down the Grok call still gets the server's answer; in replay mode it is UNAVAILABLE."""
    dead = "redis://127.0.0.1:1/0?socket_connect_timeout=0.2"
    with metrion_fixture.cache(dead, namespace=namespace) as session:
        assert RUNNERS[flavour](host, "store down", stream)[0] == "".join(WORDS)
    assert fake.call_count == 1
    assert session.stats.store_errors >= 2  # the read and the write, neither fatal
    with metrion_fixture.cache(dead, namespace=namespace, mode="replay"):
        with pytest.raises(grpc.RpcError) as raised:
            RUNNERS[flavour](host, "store down", stream)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details().startswith("metrion cache: the cache store could not be read")
    assert fake.call_count == 1


@pytest.mark.parametrize("stream", [False, True], ids=["sample", "stream"])
def test_show_prints_a_grok_answer_as_json_not_protobuf_bytes(memory_session, fake, host, stream, capsys):
    """metrion-cache show on a gRPC entry prints the protobuf messages in their JSON form."""
    import json

    from metrion_fixture.cli import main

    text = f"show me {uuid.uuid4().hex}"
    run_sync(host, text, stream)
    capsys.readouterr()
    url = memory_session.store.url
    assert (
        main(["show", "--url", url, "--namespace", memory_session.settings.namespace, "--json", expected_key(text)])
        == 0
    )
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["text"] == "".join(WORDS)
    if stream:  # one JSON document per chunk
        assert [chunk["outputs"][0]["delta"]["content"] for chunk in shown["answer"]] == WORDS
    else:
        assert shown["answer"]["outputs"][0]["message"]["content"] == "".join(WORDS)
        assert shown["answer"]["usage"]["promptTokens"] == 12


# -- single flight -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["sample", "stream"])
def test_identical_concurrent_cold_calls_make_one_server_call(memory_session, fake, host, stream):
    """Six threads ask the same new question at once: xAI is called once, the others get its entry."""
    text = f"SLOW {uuid.uuid4().hex}"
    # Threads start with an empty context: each runs in a copy of this one, inside its cache() block.
    with futures.ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(contextvars.copy_context().run, run_sync, host, text, stream) for _ in range(6)]
        answers = [call.result() for call in calls]
    assert fake.call_count == 1
    assert answers == [answers[0]] * 6 and answers[0][0] == "".join(WORDS)
    assert sorted(call.status for call in memory_session.calls) == ["HIT"] * 5 + ["MISS"]


@pytest.mark.parametrize("stream", [False, True], ids=["sample", "stream"])
def test_identical_concurrent_cold_async_calls_make_one_server_call(memory_session, fake, host, stream):
    text = f"SLOW {uuid.uuid4().hex}"

    async def ask() -> str:
        client = xai_sdk.AsyncClient(api_key=API_KEY, api_host=host, use_insecure_channel=True)
        try:
            chat = client.chat.create(model=MODEL, messages=prompt_messages(text))
            if stream:
                return "".join([chunk.content async for _, chunk in chat.stream()])
            return (await chat.sample()).content
        finally:
            await client.close()

    async def all_at_once() -> list[str]:
        return list(await asyncio.gather(*(ask() for _ in range(6))))

    assert asyncio.run(all_at_once()) == ["".join(WORDS)] * 6
    assert fake.call_count == 1
    assert sorted(call.status for call in memory_session.calls) == ["HIT"] * 5 + ["MISS"]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_failed_stream_releases_its_single_flight_lock(memory_session, fake, host, flavour):
    """Waiters must not sit out the lock's expiry when the caller ahead of them failed."""
    text = f"SLOW ABORT {uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError):
        RUNNERS[flavour](host, text, True)
    lock_key = storage_key(memory_session.settings.namespace, "xai_grpc", "stream", expected_key(text)) + ":lock"
    assert fake.call_count == 1
    assert not memory_session.store.locked(lock_key)
