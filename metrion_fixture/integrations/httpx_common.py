"""What the httpx and httpx2 adapters share: the two libraries have the same transport API.

A transport is one method (``handle_request``): here it hands the request to the core's flow
through the sync or async driver, and turns the final state into the library's response.
``metrion_fixture.integrations.httpx`` and ``.httpx2`` declare the public classes, one line
of library each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, ClassVar

from ..core.engine import Reply
from ..core.flow import Answer, Outcome, PassThrough, Rebuilt, Tee
from ..runtime._async.driver import drive as adrive
from ..runtime._async.driver import end_stream as aend_stream
from ..runtime._sync.driver import drive, end_stream
from ..runtime.dropped import end_when_dropped
from ..runtime.session import CacheSession

SessionSource = Callable[[], "CacheSession | None"]
_KEPT_EXTENSIONS = ("http_version", "reason_phrase")


class Library:
    """One HTTP library (the httpx or httpx2 module) and the stream classes the cache answers with in it."""

    def __init__(self, hx: ModuleType) -> None:
        self.module = hx
        # The library checks a response's stream against its own base classes.
        self.chunk_stream: type = type("ChunkStream", (_ChunkStream, hx.SyncByteStream, hx.AsyncByteStream), {})
        self.tee_stream: type = type("TeeStream", (_TeeStream, hx.SyncByteStream), {})
        self.async_tee_stream: type = type("AsyncTeeStream", (_AsyncTeeStream, hx.AsyncByteStream), {})
        self.fast_replies = self._same_as_library()

    def respond(self, outcome: Outcome, upstream: Any, request: Any, session: CacheSession, tee: type) -> Any:
        hx = self.module
        if isinstance(outcome, Answer):
            return self.reply_response(outcome.reply, request)
        if isinstance(outcome, PassThrough):
            for name, value in outcome.tags:
                upstream.headers[name] = value
            return upstream
        extensions = {name: upstream.extensions[name] for name in _KEPT_EXTENSIONS if name in upstream.extensions}
        if isinstance(outcome, Rebuilt):
            return hx.Response(
                outcome.status, headers=outcome.headers, content=outcome.body, extensions=extensions, request=request
            )
        return hx.Response(
            outcome.recorder.status,
            headers=outcome.headers,
            stream=tee(upstream, outcome, session),
            extensions=extensions,
            request=request,
        )

    def reply_response(self, reply: Reply, request: Any) -> Any:
        hx = self.module
        if reply.stream:
            return hx.Response(
                reply.status, headers=reply.headers, stream=self.chunk_stream(reply.chunks), request=request
            )
        body = reply.chunks[0] if len(reply.chunks) == 1 else b"".join(reply.chunks)
        if not self.fast_replies:
            return hx.Response(reply.status, headers=reply.headers, content=body, request=request)
        return self._read_response(reply.status, [*reply.headers, ("Content-Length", str(len(body)))], body, request)

    def _read_response(self, status: int, headers: list[tuple[str, str]], body: bytes, request: Any) -> Any:
        """What ``Response(status, headers=..., content=body)`` builds, without its encode and read steps.

        Those steps cost a hit about as much as the rest of the cache's work. The state set
        here is checked against the library's own when the adapter is made (``fast_replies``):
        a library version that differs gets the plain constructor.
        """
        hx = self.module
        response = hx.Response(status, headers=headers, stream=hx.ByteStream(body), request=request)
        response._content = body
        response.is_stream_consumed = True
        response.is_closed = True
        return response

    def _same_as_library(self) -> bool:
        hx = self.module
        try:
            sample = [("content-type", "application/json"), ("x-metrion-cache", "HIT")]
            body = b'{"ok":true}'
            ours = self._read_response(200, [*sample, ("Content-Length", str(len(body)))], body, None)
            theirs = hx.Response(200, headers=sample, content=body)
            return bool(
                ours.headers.raw == theirs.headers.raw
                and ours.content == theirs.content == b"".join(ours.iter_bytes())
                and ours.read() == theirs.read()
                and (ours.is_stream_consumed, ours.is_closed, ours.num_bytes_downloaded)
                == (theirs.is_stream_consumed, theirs.is_closed, theirs.num_bytes_downloaded)
                and vars(ours).keys() | {"_decoder"} == vars(theirs).keys() | {"_decoder"}  # made when needed
            )
        except Exception:  # noqa: BLE001 - any difference means: use the plain constructor
            return False


class _ChunkStream:
    """A stored answer, replayed chunk by chunk with its original boundaries."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        # Single pass, like a network stream: an SDK draining the rest after it stopped
        # reading must get the rest, not a second copy.
        self._remaining = iter(chunks)

    def __iter__(self) -> Iterator[bytes]:
        return self._remaining

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._remaining:
            yield chunk


class _TeeStream:
    """The provider's stream, passed on chunk by chunk as it arrives and recorded on the way."""

    def __init__(self, upstream: Any, tee: Tee, session: CacheSession) -> None:
        self._upstream, self._tee, self._session = upstream, tee, session
        self._source: Iterator[bytes] | None = None
        self._over = False
        self._dropped = end_when_dropped(self, session, tee)

    def __iter__(self) -> Iterator[bytes]:
        # One source for every iteration: SDKs drain the rest of a stream by iterating
        # it a second time after they stopped reading, and that must resume, not restart.
        if self._source is None:
            self._source = self._upstream.iter_bytes()
        recorder = self._tee.recorder
        try:
            for chunk in self._source:
                recorder.feed(chunk)
                yield chunk
        except Exception:
            # The provider's stream broke. A caller leaving early is not an Exception:
            # close() then decides, by whether the terminator had arrived.
            recorder.abandon()
            raise
        self._end(reached_eof=True)

    def close(self) -> None:
        try:
            self._upstream.close()
        finally:
            self._end(reached_eof=False)

    def _end(self, reached_eof: bool) -> None:
        if not self._over:
            self._over = True
            self._dropped.detach()
            end_stream(self._session, self._tee, reached_eof)


class _AsyncTeeStream:
    def __init__(self, upstream: Any, tee: Tee, session: CacheSession) -> None:
        self._upstream, self._tee, self._session = upstream, tee, session
        self._source: AsyncIterator[bytes] | None = None
        self._over = False
        self._dropped = end_when_dropped(self, session, tee)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._source is None:
            self._source = self._upstream.aiter_bytes()
        recorder = self._tee.recorder
        try:
            async for chunk in self._source:
                recorder.feed(chunk)
                yield chunk
        except Exception:
            recorder.abandon()
            raise
        await self._end(reached_eof=True)

    async def aclose(self) -> None:
        try:
            await self._upstream.aclose()
        finally:
            await self._end(reached_eof=False)

    async def _end(self, reached_eof: bool) -> None:
        if not self._over:
            self._over = True
            self._dropped.detach()
            await aend_stream(self._session, self._tee, reached_eof)


def _strip(request: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if name in request.headers:
            del request.headers[name]


class _Upstream:
    __slots__ = ("request", "transport", "response")

    def __init__(self, request: Any, transport: Any) -> None:
        self.request, self.transport, self.response = request, transport, None

    def read_request(self) -> bytes:
        return bytes(self.request.read())

    def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        _strip(self.request, strip)
        self.response = response = self.transport.handle_request(self.request)
        return response.status_code, response.headers.multi_items()

    def read_body(self) -> bytes:
        assert self.response is not None
        return bytes(self.response.read())


class _AsyncUpstream:
    __slots__ = ("request", "transport", "response")

    def __init__(self, request: Any, transport: Any) -> None:
        self.request, self.transport, self.response = request, transport, None

    async def read_request(self) -> bytes:
        return bytes(await self.request.aread())

    async def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        _strip(self.request, strip)
        self.response = response = await self.transport.handle_async_request(self.request)
        return response.status_code, response.headers.multi_items()

    async def read_body(self) -> bytes:
        assert self.response is not None
        return bytes(await self.response.aread())


class SyncCacheTransportBase:
    """Wraps a transport with the cache.

    ``CacheTransport(inner, session=...)`` or ``CacheTransport(inner, url=..., mode=...)``
    (the options of :class:`~metrion_fixture.CacheSession`); without ``inner``, the library's
    default ``HTTPTransport()``. ``transport.session`` is the session it serves.
    """

    library: ClassVar[Library]

    def __init__(self, transport: Any = None, *, session: CacheSession | SessionSource | None = None, **options: Any):
        self.transport = transport if transport is not None else self.library.module.HTTPTransport()
        self._session_source = session_source(session, options)

    @property
    def session(self) -> CacheSession | None:
        return self._session_source()

    def handle_request(self, request: Any) -> Any:
        session = self._session_source()
        if session is None:
            return self.transport.handle_request(request)
        upstream = _Upstream(request, self.transport)
        url = request.url
        outcome = drive(session, session.core.exchange(request.method, url.path, request.headers, url.query), upstream)
        return self.library.respond(outcome, upstream.response, request, session, self.library.tee_stream)

    def close(self) -> None:
        self.transport.close()


class AsyncCacheTransportBase:
    """The async twin of the sync transport; default inner: the library's ``AsyncHTTPTransport()``."""

    library: ClassVar[Library]

    def __init__(self, transport: Any = None, *, session: CacheSession | SessionSource | None = None, **options: Any):
        self.transport = transport if transport is not None else self.library.module.AsyncHTTPTransport()
        self._session_source = session_source(session, options)

    @property
    def session(self) -> CacheSession | None:
        return self._session_source()

    async def handle_async_request(self, request: Any) -> Any:
        session = self._session_source()
        if session is None:
            return await self.transport.handle_async_request(request)
        upstream = _AsyncUpstream(request, self.transport)
        url = request.url
        flow = session.core.exchange(request.method, url.path, request.headers, url.query)
        outcome = await adrive(session, flow, upstream)
        return self.library.respond(outcome, upstream.response, request, session, self.library.async_tee_stream)

    async def aclose(self) -> None:
        await self.transport.aclose()


def session_source(session: CacheSession | SessionSource | None, options: dict[str, Any]) -> SessionSource:
    """Where a transport finds its session: a fixed one, or a callable asked on every request.

    The patched clients pass :func:`~metrion_fixture.runtime.activation.active_session`, so one
    wrapper per transport serves whichever ``enable()`` / ``cache()`` session is active at the time.
    """
    if isinstance(session, CacheSession):
        fixed = session
        return lambda: fixed
    if session is not None:
        if options:
            raise TypeError("pass either a session source or session options, not both")
        return session
    own = CacheSession(**options)
    return lambda: own
