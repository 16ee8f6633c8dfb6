"""Sync and async cache transports for one HTTP library (httpx or httpx2).

httpx and httpx2 share their transport API, so one factory builds the classes
for either from the library's module. The shells only perform the steps that
:func:`metrion_fixture.core.flow.exchange` asks for; every decision is there.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

from ..core.engine import Recorder, Reply
from ..core.flow import (
    Acquire,
    Answer,
    Forward,
    Lookup,
    Outcome,
    PassThrough,
    ReadBody,
    ReadRequest,
    Rebuilt,
    Release,
    Tee,
    WaitFor,
    Write,
    exchange,
)
from ..runtime.session import CacheSession

SessionSource = Callable[[], "CacheSession | None"]
_KEPT_EXTENSIONS = ("http_version", "reason_phrase")


def build_transports(hx: ModuleType) -> SimpleNamespace:
    """The cache transport classes for the HTTP library ``hx`` (the httpx or httpx2 module)."""

    class ChunkStream(hx.SyncByteStream, hx.AsyncByteStream):  # type: ignore[misc,name-defined]
        """A stored answer, replayed chunk by chunk with its original boundaries."""

        def __init__(self, chunks: list[bytes]) -> None:
            # Single pass, like a network stream: an SDK draining the rest after it stopped
            # reading must get the rest, not a second copy.
            self._remaining = iter(chunks)

        def __iter__(self) -> Iterator[bytes]:
            return self._remaining

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in self._remaining:
                yield chunk

    class TeeStream(hx.SyncByteStream):  # type: ignore[misc,name-defined]
        """The provider's stream, passed on chunk by chunk as it arrives and recorded on the way."""

        def __init__(
            self, upstream: Any, recorder: Recorder, session: CacheSession, release: Release | None = None
        ) -> None:
            self._upstream, self._recorder, self._session = upstream, recorder, session
            self._source: Iterator[bytes] | None = None
            self._release = release  # the single-flight lock, released once the entry is written

        def __iter__(self) -> Iterator[bytes]:
            # One source for every iteration: SDKs drain the rest of a stream by iterating
            # it a second time after they stopped reading, and that must resume, not restart.
            if self._source is None:
                self._source = self._upstream.iter_bytes()
            try:
                for chunk in self._source:
                    self._recorder.feed(chunk)
                    yield chunk
            except Exception:
                # The provider's stream broke. A caller leaving early is not an Exception:
                # close() then decides, by whether the terminator had arrived.
                self._recorder.abandon()
                raise
            self._finish(reached_eof=True)

        def close(self) -> None:
            try:
                self._upstream.close()
            finally:
                self._finish(reached_eof=False)

        def _finish(self, reached_eof: bool) -> None:
            value = self._recorder.finish_stream(reached_eof, time.perf_counter())
            if value is not None:
                plan = self._recorder.plan
                self._session.write(plan.storage_key, value, plan.write_ttl)
            release, self._release = self._release, None
            if release is not None:
                self._session.release(*release)

    class AsyncTeeStream(hx.AsyncByteStream):  # type: ignore[misc,name-defined]
        def __init__(
            self, upstream: Any, recorder: Recorder, session: CacheSession, release: Release | None = None
        ) -> None:
            self._upstream, self._recorder, self._session = upstream, recorder, session
            self._source: AsyncIterator[bytes] | None = None
            self._release = release

        async def __aiter__(self) -> AsyncIterator[bytes]:
            if self._source is None:
                self._source = self._upstream.aiter_bytes()
            try:
                async for chunk in self._source:
                    self._recorder.feed(chunk)
                    yield chunk
            except Exception:
                self._recorder.abandon()
                raise
            await self._finish(reached_eof=True)

        async def aclose(self) -> None:
            try:
                await self._upstream.aclose()
            finally:
                await self._finish(reached_eof=False)

        async def _finish(self, reached_eof: bool) -> None:
            value = self._recorder.finish_stream(reached_eof, time.perf_counter())
            if value is not None:
                plan = self._recorder.plan
                await self._session.awrite(plan.storage_key, value, plan.write_ttl)
            release, self._release = self._release, None
            if release is not None:
                await self._session.arelease(*release)

    def respond(outcome: Outcome, upstream: Any, request: Any, session: CacheSession, tee: type) -> Any:
        if isinstance(outcome, Answer):
            return reply_response(outcome.reply, request)
        if isinstance(outcome, PassThrough):
            for name, value in outcome.tags:
                upstream.headers[name] = value
            return upstream
        extensions = {name: upstream.extensions[name] for name in _KEPT_EXTENSIONS if name in upstream.extensions}
        if isinstance(outcome, Rebuilt):
            return hx.Response(
                outcome.status, headers=outcome.headers, content=outcome.body, extensions=extensions, request=request
            )
        assert isinstance(outcome, Tee)
        stream = tee(upstream, outcome.recorder, session, outcome.release)
        return hx.Response(
            outcome.recorder.status, headers=outcome.headers, stream=stream, extensions=extensions, request=request
        )

    def reply_response(reply: Reply, request: Any) -> Any:
        if reply.stream:
            return hx.Response(reply.status, headers=reply.headers, stream=ChunkStream(reply.chunks), request=request)
        body = reply.chunks[0] if len(reply.chunks) == 1 else b"".join(reply.chunks)
        if not read_response_ok:
            return hx.Response(reply.status, headers=reply.headers, content=body, request=request)
        return read_response(reply.status, [*reply.headers, ("Content-Length", str(len(body)))], body, request)

    def read_response(status: int, headers: list[tuple[str, str]], body: bytes, request: Any) -> Any:
        """What ``Response(status, headers=..., content=body)`` builds, without its encode and read steps.

        Those steps cost a hit about as much as the rest of the cache's work. The state set
        here is checked against the library's own at import (``read_response_ok``): a library
        version that differs gets the plain constructor.
        """
        response = hx.Response(status, headers=headers, stream=hx.ByteStream(body), request=request)
        response._content = body
        response.is_stream_consumed = True
        response.is_closed = True
        return response

    def same_as_library() -> bool:
        try:
            sample = [("content-type", "application/json"), ("x-metrion-cache", "HIT")]
            body = b'{"ok":true}'
            ours = read_response(200, [*sample, ("Content-Length", str(len(body)))], body, None)
            theirs = hx.Response(200, headers=sample, content=body)
            return (
                ours.headers.raw == theirs.headers.raw
                and ours.content == theirs.content == b"".join(ours.iter_bytes())
                and ours.read() == theirs.read()
                and (ours.is_stream_consumed, ours.is_closed, ours.num_bytes_downloaded)
                == (theirs.is_stream_consumed, theirs.is_closed, theirs.num_bytes_downloaded)
                and vars(ours).keys() | {"_decoder"} == vars(theirs).keys() | {"_decoder"}  # made when needed
            )
        except Exception:  # noqa: BLE001 - any difference means: use the plain constructor
            return False

    read_response_ok = same_as_library()

    def strip(request: Any, names: tuple[str, ...]) -> None:
        for name in names:
            if name in request.headers:
                del request.headers[name]

    class CacheTransport(hx.BaseTransport):  # type: ignore[misc,name-defined]
        """Wraps a transport with the cache.

        ``CacheTransport(inner, session=...)`` or ``CacheTransport(inner, url=..., mode=...)``
        (the options of :class:`CacheSession`); without ``inner``, the library's default
        ``HTTPTransport()``. ``transport.session`` is the session it serves.
        """

        @property
        def session(self) -> CacheSession | None:
            return self._session_source()

        def __init__(
            self, transport: Any = None, *, session: CacheSession | SessionSource | None = None, **options: Any
        ) -> None:
            self.transport = transport if transport is not None else hx.HTTPTransport()
            self._session_source = session_source(session, options)

        def handle_request(self, request: Any) -> Any:
            session = self._session_source()
            if session is None:
                return self.transport.handle_request(request)
            flow = exchange(session, request.method, request.url.path, request.headers, request.url.query)
            upstream: Any = None
            answer: Any = None
            held: Acquire | None = None  # a single-flight lock to give back if the provider call fails
            try:
                while True:
                    try:
                        step = flow.send(answer)
                    except StopIteration as done:
                        held = None  # released by the exchange, or by the stream when it ends
                        return respond(done.value, upstream, request, session, TeeStream)
                    if isinstance(step, Lookup):
                        answer = session.read(step.storage_key)
                    elif isinstance(step, ReadRequest):
                        answer = request.read()
                    elif isinstance(step, Forward):
                        strip(request, step.strip)
                        upstream = self.transport.handle_request(request)
                        answer = (upstream.status_code, upstream.headers.multi_items())
                    elif isinstance(step, ReadBody):
                        answer = upstream.read()
                    elif isinstance(step, Write):
                        session.write(*step)
                        answer = None
                    elif isinstance(step, Acquire):
                        answer = session.acquire(*step)
                        held = step if answer else None
                    elif isinstance(step, WaitFor):
                        answer = session.wait_for(*step)
                    elif isinstance(step, Release):
                        session.release(*step)
                        held = answer = None
            finally:
                if held is not None:
                    session.release(held.key, held.token)

        def close(self) -> None:
            self.transport.close()

    class AsyncCacheTransport(hx.AsyncBaseTransport):  # type: ignore[misc,name-defined]
        """The async twin of :class:`CacheTransport`; default inner: ``AsyncHTTPTransport()``."""

        @property
        def session(self) -> CacheSession | None:
            return self._session_source()

        def __init__(
            self, transport: Any = None, *, session: CacheSession | SessionSource | None = None, **options: Any
        ) -> None:
            self.transport = transport if transport is not None else hx.AsyncHTTPTransport()
            self._session_source = session_source(session, options)

        async def handle_async_request(self, request: Any) -> Any:
            session = self._session_source()
            if session is None:
                return await self.transport.handle_async_request(request)
            flow = exchange(session, request.method, request.url.path, request.headers, request.url.query)
            upstream: Any = None
            answer: Any = None
            held: Acquire | None = None
            try:
                while True:
                    try:
                        step = flow.send(answer)
                    except StopIteration as done:
                        held = None
                        return respond(done.value, upstream, request, session, AsyncTeeStream)
                    if isinstance(step, Lookup):
                        answer = await session.aread(step.storage_key)
                    elif isinstance(step, ReadRequest):
                        answer = await request.aread()
                    elif isinstance(step, Forward):
                        strip(request, step.strip)
                        upstream = await self.transport.handle_async_request(request)
                        answer = (upstream.status_code, upstream.headers.multi_items())
                    elif isinstance(step, ReadBody):
                        answer = await upstream.aread()
                    elif isinstance(step, Write):
                        await session.awrite(*step)
                        answer = None
                    elif isinstance(step, Acquire):
                        answer = await session.aacquire(*step)
                        held = step if answer else None
                    elif isinstance(step, WaitFor):
                        answer = await session.await_for(*step)
                    elif isinstance(step, Release):
                        await session.arelease(*step)
                        held = answer = None
            finally:
                if held is not None:
                    await session.arelease(held.key, held.token)

        async def aclose(self) -> None:
            await self.transport.aclose()

    return SimpleNamespace(
        CacheTransport=CacheTransport, AsyncCacheTransport=AsyncCacheTransport, module=hx, fast_replies=read_response_ok
    )


def session_source(session: CacheSession | SessionSource | None, options: dict[str, Any]) -> SessionSource:
    """Where a transport finds its session: a fixed one, or a callable asked on every request.

    The patched clients pass :func:`active_session`, so one wrapper per transport
    serves whichever ``enable()`` / ``cache()`` session is active at the time.
    """
    if isinstance(session, CacheSession):
        return lambda: session
    if session is not None:
        if options:
            raise TypeError("pass either a session source or session options, not both")
        return session
    own = CacheSession(**options)
    return lambda: own
