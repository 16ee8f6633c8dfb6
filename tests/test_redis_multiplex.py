"""The multiplexed connection of the Redis store's async hit path (stores/redis_multiplex.py), against real Redis servers.

Every task of a loop shares one connection: each command must get its own reply whatever the
interleaving (cancelled commands included), a Redis that stops answering must fail what waits once and
leave the next command to reconnect, the URL's password, user and database must be honoured, and a
connection must never outlive its loop or be used by a forked child.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
from test_event_loop import free_port

from metrion_fixture.stores import redis_multiplex
from metrion_fixture.stores.redis import _DEFAULTS, RedisStore
from metrion_fixture.stores.redis_multiplex import Multiplexer, Options, Resp2Reader, options_for


@pytest.fixture(params=["hiredis", "python"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with hiredis's reader and with the Python one (what a system without hiredis uses)."""
    if request.param == "python":
        monkeypatch.setattr(redis_multiplex, "hiredis", None)
    return str(request.param)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"mux-{uuid.uuid4().hex[:10]}:"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{name}*"))
    if keys:
        client.delete(*keys)
    client.close()


def multiplexer(url: str) -> Multiplexer:
    options = options_for(url, _DEFAULTS)
    assert options is not None, url
    return Multiplexer(options)


# -- URLs --------------------------------------------------------------------------------------------


def test_options_from_the_url() -> None:
    options = options_for("redis://alice:s%2Fecret@example.test:6380/3?socket_timeout=0.5", _DEFAULTS)
    assert options == Options(
        host="example.test",
        port=6380,
        db=3,
        username="alice",
        password="s/ecret",
        socket_timeout=0.5,
        socket_connect_timeout=1.0,
    )
    assert options_for("redis://:pw@localhost", _DEFAULTS) == Options(password="pw")
    unix = options_for("unix:///run/redis.sock?db=2", _DEFAULTS)
    assert unix is not None and unix.path == "/run/redis.sock" and unix.db == 2
    # What it does not do keeps redis-py's client: TLS, options it does not know, a user without a password.
    assert options_for("rediss://example.test", _DEFAULTS) is None
    assert options_for("redis://localhost?client_name=x", _DEFAULTS) is None
    assert options_for("redis://localhost?protocol=3", _DEFAULTS) is None
    assert options_for("redis://alice@localhost", _DEFAULTS) is None


def test_the_store_uses_redis_py_for_urls_it_does_not_fully_support(redis_url: str, prefix: str) -> None:
    supported, other = RedisStore(redis_url), RedisStore(f"{redis_url}?client_name=metrion-test")
    assert supported._multiplex is not None and other._multiplex is None

    async def read(store: RedisStore) -> bytes | None:
        return await store.aget(f"{prefix}k")

    try:
        supported.set(f"{prefix}k", b"value", 60)
        assert asyncio.run(read(supported)) == asyncio.run(read(other)) == b"value"
    finally:
        supported.close()
        other.close()


# -- replies -----------------------------------------------------------------------------------------


def test_resp2_reader_reads_what_hiredis_reads() -> None:
    """The Python reader, fed byte by byte, gives what hiredis gives for every reply type the store sees."""
    stream = (
        b"+OK\r\n$5\r\nhello\r\n$-1\r\n:-2\r\n:1234567\r\n$0\r\n\r\n"
        b"*3\r\n$1\r\na\r\n*-1\r\n*2\r\n:1\r\n$-1\r\n*0\r\n"
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
        b"-NOAUTH Authentication required.\r\n$7\r\nbin\r\n\x00\xff\r\n"
    )
    ours = Resp2Reader(redis_multiplex.BaseParser.parse_error)
    theirs = hiredis.Reader(replyError=redis_multiplex.BaseParser.parse_error)
    got: list[Any] = []
    for byte in stream:
        ours.feed(bytes([byte]))
        while (reply := ours.gets()) is not False:
            got.append(reply)
    theirs.feed(stream)
    expected = []
    while (reply := theirs.gets()) is not False:
        expected.append(reply)

    def comparable(value: Any) -> Any:
        if isinstance(value, Exception):
            return (type(value), value.args)
        if isinstance(value, list):
            return [comparable(each) for each in value]
        return value

    assert [comparable(each) for each in got] == [comparable(each) for each in expected]
    assert len(got) == 11 and got[1] == b"hello" and got[-1] == b"bin\r\n\x00\xff"
    assert type(got[-3]) is redis.ResponseError and isinstance(got[-2], redis.AuthenticationError)


def test_concurrent_commands_each_get_their_own_reply(reader: str, redis_url: str, prefix: str) -> None:
    """Hundreds of tasks on one connection, a third of them cancelled at random moments: every other
    one gets the value of its own key, and the connection stays in step."""
    count = 300
    client = redis.Redis.from_url(redis_url)
    for number in range(count):
        client.set(f"{prefix}{number}", f"value {number} ".encode() * (1 + number % 50), px=60_000)
    client.rpush(f"{prefix}list", b"x")
    client.close()
    rng = random.Random(7)

    async def scenario() -> tuple[dict[int, list[Any]], int, set[int]]:
        mux = multiplexer(redis_url)
        try:
            first = await mux.execute([("GET", f"{prefix}0")])
            connection = mux._connection

            async def ask(number: int) -> list[Any]:
                await asyncio.sleep(rng.choice((0, 0, 0.001)))
                key = f"{prefix}{number}"
                if number % 3 == 0:
                    return await mux.execute([("GET", key), ("PTTL", key)])
                if number % 3 == 1:
                    return await mux.execute([("GET", key)])
                return await mux.execute([("SET", f"{prefix}lock{number}", "t", "NX", "PX", 60_000), ("GET", key)])

            tasks = {number: asyncio.ensure_future(ask(number)) for number in range(count)}
            cancelled = set(rng.sample(range(count), count // 3))
            for turn in range(6):
                for number in [number for number in cancelled if number % 6 == turn]:
                    tasks[number].cancel()
                await asyncio.sleep(0)
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            answers = {number: task.result() for number, task in tasks.items() if not task.cancelled()}
            # An error reply raises, and the replies after it still go to their own commands.
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                await mux.execute([("GET", f"{prefix}list")])
            after = await mux.execute([("GET", f"{prefix}1"), ("GET", f"{prefix}missing")])
            assert mux._connection is connection, "one connection for all of them"
            assert first == [b"value 0 "]
            return answers, len([task for task in tasks.values() if task.cancelled()]), after
        finally:
            await mux.aclose()

    answers, cancelled_count, after = asyncio.run(scenario())
    assert cancelled_count > 0 and len(answers) > count // 2
    for number, replies in answers.items():
        value = f"value {number} ".encode() * (1 + number % 50)
        if number % 3 == 0:
            assert replies[0] == value and 0 < replies[1] <= 60_000, (number, replies)
        elif number % 3 == 1:
            assert replies == [value], number
        else:
            assert replies == [b"OK", value], number
    assert after == [b"value 1 " * 2, None]


def test_the_store_reads_through_one_connection_per_loop(redis_url: str, prefix: str) -> None:
    """RedisStore's async reads (near cache on and off) and locks go through this loop's multiplexer."""
    for round_, url in enumerate((redis_url, f"{redis_url}?near_cache=off")):
        store = RedisStore(url)
        try:
            for number in range(40):
                store.set(f"{prefix}{number}", f"v{number}".encode(), 60)

            async def scenario(
                store: RedisStore = store, round_: int = round_
            ) -> tuple[list[bytes | None], bool, tuple[bool, list[bytes | None]], Any]:
                values = await asyncio.gather(*(store.aget(f"{prefix}{number}") for number in range(40)))
                taken = await store.aacquire(f"{prefix}lock{round_}", "token", 5_000)
                again = await store.aacquire_and_get(f"{prefix}lock{round_}", "other", 5_000, (f"{prefix}1",))
                return values, taken, again, store._last_multiplexer

            values, taken, again, last = asyncio.run(scenario())
            assert values == [f"v{number}".encode() for number in range(40)]
            assert taken is True and again == (False, [])
            assert last is not None and last[1]._connection is not None
            assert last[1]._connection.closed, "closed when its loop shut down"
        finally:
            store.close()


# -- a Redis that stops answering ------------------------------------------------------------------


class OwnRedis:
    """A redis-server of the test's own, to stop, resume and restart (the shared one is never touched)."""

    def __init__(self, root: Path, *arguments: str) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server is needed (.ci/run installs Redis)")
        self.command = [server, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)]
        self.command += list(arguments)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, password: str | None = None) -> None:
        self.process = subprocess.Popen(
            [*self.command, "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, password=password, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    pytest.fail(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(30)
            self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_frozen_redis_fails_what_waits_at_once_then_the_next_command_reconnects(
    reader: str, own_redis: OwnRedis
) -> None:
    """SIGSTOP: commands sent at different moments all fail with redis.TimeoutError when the oldest has
    waited socket_timeout (one timeout, not one each), the loop runs on meanwhile, the connection is
    dropped; once Redis runs again (resumed, or restarted empty), the next command works."""
    url = f"redis://127.0.0.1:{own_redis.port}/0?socket_timeout=0.5"
    assert own_redis.process is not None
    redis.Redis(port=own_redis.port).set("k", b"before")

    async def scenario() -> None:
        mux = multiplexer(url)
        try:
            assert await mux.execute([("GET", "k")]) == [b"before"]
            broken = mux._connection
            assert own_redis.process is not None
            own_redis.process.send_signal(signal.SIGSTOP)
            ticks = 0

            async def heartbeat() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            beating = asyncio.ensure_future(heartbeat())
            oldest = asyncio.ensure_future(mux.execute([("GET", "k")]))
            await asyncio.sleep(0.2)
            later = [asyncio.ensure_future(mux.execute([("GET", "k"), ("PTTL", "k")])) for _ in range(5)]
            with pytest.raises(redis.TimeoutError):
                await oldest
            # The later commands failed with it, though they had waited less than socket_timeout.
            assert all(task.done() for task in later)
            for task in later:
                assert isinstance(task.exception(), redis.TimeoutError)
            assert ticks > 10, "the loop ran while Redis did not answer"
            beating.cancel()
            assert broken is not None and broken.closed

            own_redis.process.send_signal(signal.SIGCONT)
            assert await mux.execute([("GET", "k")]) == [b"before"]
            assert mux._connection is not broken

            own_redis.stop()  # killed: the connection is lost, the next command fails, then works once restarted
            with pytest.raises(redis.ConnectionError):
                await mux.execute([("GET", "k")])
            with pytest.raises(redis.ConnectionError):
                await mux.execute([("GET", "k")])  # refused while down
            own_redis.start()
            assert await mux.execute([("GET", "k")]) == [None]  # restarted empty
        finally:
            beating.cancel()
            await mux.aclose()

    asyncio.run(scenario())


def test_a_store_on_a_frozen_redis_costs_its_read_one_timeout_and_recovers(own_redis: OwnRedis) -> None:
    """Through RedisStore.aget: the reads waiting on a frozen Redis fail with redis.TimeoutError, as redis-py's
    client failed them (store_calls then treats the store as down); once resumed, reads work again."""
    store = RedisStore(f"redis://127.0.0.1:{own_redis.port}/0?socket_timeout=0.5&near_cache=off")
    assert store._multiplex is not None and own_redis.process is not None
    store.set("ns:k", b"v", 60)

    async def scenario() -> list[Any]:
        assert await store.aget("ns:k") == b"v"
        assert own_redis.process is not None
        own_redis.process.send_signal(signal.SIGSTOP)
        try:
            failed = await asyncio.gather(*(store.aget("ns:k") for _ in range(4)), return_exceptions=True)
        finally:
            own_redis.process.send_signal(signal.SIGCONT)
        return [*failed, await store.aget("ns:k")]

    try:
        *failed, after = asyncio.run(scenario())
    finally:
        store.close()
    assert all(isinstance(error, redis.TimeoutError) for error in failed), failed
    assert after == b"v"


# -- AUTH and SELECT -------------------------------------------------------------------------------


def test_the_database_of_the_url_is_selected(reader: str, redis_url: str, prefix: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    other_db = 13 if not redis_url.endswith("/13") else 12
    client, other = redis.Redis.from_url(redis_url), redis.Redis.from_url(f"{base}/{other_db}")
    try:
        client.set(f"{prefix}k", b"in the test database")
        other.set(f"{prefix}k", b"in the other database")

        async def read(url: str) -> list[Any]:
            mux = multiplexer(url)
            try:
                return await mux.execute([("GET", f"{prefix}k")])
            finally:
                await mux.aclose()

        assert asyncio.run(read(redis_url)) == [b"in the test database"]
        assert asyncio.run(read(f"{base}/{other_db}")) == [b"in the other database"]
    finally:
        other.delete(f"{prefix}k")
        client.close()
        other.close()


def test_password_and_user_are_sent(reader: str, tmp_path: Path) -> None:
    server = OwnRedis(tmp_path, "--requirepass", "s3cret/", "--user", "alice", "on", ">wonder", "~*", "+@all")
    server.start(password="s3cret/")
    try:
        redis.Redis(port=server.port, password="s3cret/", db=2).set("k", b"secret value")
        base = f"127.0.0.1:{server.port}/2"

        async def read(url: str) -> list[Any]:
            mux = multiplexer(url)
            try:
                return await mux.execute([("GET", "k")])
            finally:
                await mux.aclose()

        assert asyncio.run(read(f"redis://:s3cret%2F@{base}")) == [b"secret value"]
        assert asyncio.run(read(f"redis://alice:wonder@{base}")) == [b"secret value"]
        with pytest.raises(redis.AuthenticationError):
            asyncio.run(read(f"redis://:wrong@{base}"))
        with pytest.raises(redis.AuthenticationError):  # NOAUTH: no password given
            asyncio.run(read(f"redis://{base}"))
        store = RedisStore(f"redis://alice:wonder@{base}")
        try:
            assert store._multiplex is not None
            assert asyncio.run(store.aget("k")) == b"secret value"
        finally:
            store.close()
    finally:
        server.stop()


# -- loops and fork --------------------------------------------------------------------------------


def test_a_connection_closes_with_its_loop_and_is_never_shared_across_loops(redis_url: str, prefix: str) -> None:
    store = RedisStore(f"{redis_url}?near_cache=off")  # every read a GET (the near cache would answer the later ones)
    store.set(f"{prefix}k", b"v", 60)

    async def use() -> Multiplexer:
        assert await store.aget(f"{prefix}k") == b"v"
        last = store._last_multiplexer
        assert last is not None and last[0]() is asyncio.get_running_loop()
        return last[1]

    try:
        first = asyncio.run(use())
        assert first._connection is not None and first._connection.closed and first._connection.lost.done()
        second = asyncio.run(use())
        assert second is not first and len(store._aclients) == 1
        # A store closed in its loop closes its multiplexer there; a command after that fails, no socket is left.
        loop = asyncio.new_event_loop()
        try:
            third = loop.run_until_complete(use())
            loop.run_until_complete(store.aclose())
            assert third._connection is not None and third._connection.closed and third._connection.lost.done()
            with pytest.raises(redis.ConnectionError):
                loop.run_until_complete(third.execute([("GET", f"{prefix}k")]))
            assert loop.run_until_complete(use()) is not third  # the store itself opens a new one
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_a_forked_child_never_uses_its_parents_connection(redis_url: str, prefix: str) -> None:
    """The child's commands go on a connection of its own: the parent's replies stay the parent's."""
    client = redis.Redis.from_url(redis_url)
    client.set(f"{prefix}parent", b"parent value")
    client.set(f"{prefix}child", b"child value")
    mux = multiplexer(redis_url)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(mux.execute([("GET", f"{prefix}parent")])) == [b"parent value"]
        parent_connection = mux._connection
        pid = os.fork()
        if pid == 0:  # the child: a loop of its own, the same multiplexer object
            code = 1
            try:
                child_loop = asyncio.new_event_loop()
                replies = child_loop.run_until_complete(mux.execute([("GET", f"{prefix}child")]))
                ok = replies == [b"child value"] and mux._connection is not parent_connection
                code = 0 if ok else 2
            except BaseException:  # noqa: BLE001 - the exit code says it
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert mux._connection is parent_connection
        assert loop.run_until_complete(mux.execute([("GET", f"{prefix}parent"), ("GET", f"{prefix}child")])) == [
            b"parent value",
            b"child value",
        ]
    finally:
        loop.run_until_complete(mux.aclose())
        loop.close()
        client.close()


# -- commands that must end even when the connection goes away under them ---------------------------


def _refusing_server() -> tuple[int, threading.Event]:
    """A server that does what Redis does at maxclients: accept, send an error, close."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.sendall(b"-ERR max number of clients reached\r\n")
            conn.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], stop


def test_a_server_that_closes_right_after_accepting_fails_the_command() -> None:
    """Redis at maxclients (or restarting, or CLIENT KILL) closes a new connection at once: the command
    must fail with redis.ConnectionError within one timeout, never wait forever."""
    port, stop = _refusing_server()
    options = options_for(f"redis://127.0.0.1:{port}/0?socket_timeout=0.5", _DEFAULTS)
    assert options is not None

    async def scenario() -> list[object]:
        mux = Multiplexer(options)
        outcomes: list[object] = []
        try:
            for _ in range(20):
                try:
                    # The promise: one socket_timeout (0.5 s) at most; 5 s is generous.
                    outcomes.append(await asyncio.wait_for(mux.execute([("GET", "k")]), 5))
                except Exception as error:  # noqa: BLE001
                    outcomes.append(error)
        finally:
            await mux.aclose()
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        stop.set()
    assert all(isinstance(each, redis.ConnectionError) for each in outcomes), outcomes


def test_a_command_waiting_for_the_connection_when_the_multiplexer_closes_fails() -> None:
    """A store closed (RedisStore.aclose / close) while a first read is connecting: that read must fail
    with redis.ConnectionError, not wait forever."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # accepts (in the kernel's backlog); never answers
    port = server.getsockname()[1]
    options = options_for(f"redis://127.0.0.1:{port}/0?socket_timeout=0.5", _DEFAULTS)
    assert options is not None

    async def scenario() -> object:
        mux = Multiplexer(options)
        read = asyncio.ensure_future(mux.execute([("GET", "k")]))
        await asyncio.sleep(0)  # the connect has started
        await mux.aclose()
        try:
            return await asyncio.wait_for(read, 5)  # generous: the promise is one timeout at most
        except Exception as error:  # noqa: BLE001
            return error

    try:
        outcome = asyncio.run(scenario())
    finally:
        server.close()
    assert isinstance(outcome, redis.ConnectionError), outcome


def test_a_store_read_on_a_redis_at_maxclients_ends() -> None:
    """Through RedisStore.aget (what store_calls awaits, with no timeout of its own): every read ends,
    with redis.ConnectionError, however the close of the refused connection races the read."""
    from metrion_fixture.stores.redis import RedisStore

    port, stop = _refusing_server()
    store = RedisStore(f"redis://127.0.0.1:{port}/0?socket_timeout=0.5&near_cache=off")
    assert store._multiplex is not None

    async def scenario() -> list[object]:
        outcomes: list[object] = []
        for _ in range(10):
            try:
                outcomes.append(await asyncio.wait_for(store.aget("ns:k"), 5))  # generous bound
            except Exception as error:  # noqa: BLE001
                outcomes.append(error)
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        stop.set()
        store.close()
    assert all(isinstance(each, redis.ConnectionError) for each in outcomes), outcomes


def test_closing_at_loop_shutdown_ends_while_a_write_is_stuck() -> None:
    """A Redis that stopped reading (frozen, partitioned) while a write was under way: the loop's shutdown
    (Multiplexer.aclose, awaited by shutdown_asyncgens) must still end."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # the kernel accepts; nobody ever reads
    port = server.getsockname()[1]
    options = options_for(f"redis://127.0.0.1:{port}/0?socket_timeout=30", _DEFAULTS)
    assert options is not None

    async def scenario() -> object:
        mux = Multiplexer(options)
        first = asyncio.ensure_future(mux.execute([("GET", "k")]))
        await asyncio.sleep(0.2)  # connected, the GET written
        big = asyncio.ensure_future(mux.execute([("SET", "k", b"x" * 64_000_000)]))  # more than the socket buffers hold
        await asyncio.sleep(0.2)
        try:
            await asyncio.wait_for(mux.aclose(), 5)  # generous: closing must not wait on Redis at all
            return None
        except Exception as error:  # noqa: BLE001
            return error
        finally:
            first.cancel()
            big.cancel()

    try:
        outcome = asyncio.run(scenario())
    finally:
        server.close()
    assert outcome is None, outcome
