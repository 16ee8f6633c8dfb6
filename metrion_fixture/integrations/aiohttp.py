"""The aiohttp adapter: ``aiohttp.ClientSession`` requests through the cache's core and async driver.

google-genai's async client (``client.aio``) sends through aiohttp whenever aiohttp is installed.

Where the cache sits: aiohttp (>= 3.12) runs client middlewares around the one step of
``ClientSession._request`` that sends a built request and returns its response. Everything
else stays aiohttp's own: redirects, cookies, traces, timeouts, ``raise_for_status``. While a
session is active the patched ``_request`` (:func:`wrap_request`, installed by
``patching.install()``) puts :class:`CacheMiddleware` last in each request's middleware chain,
so it is the innermost one, where the httpx adapter wraps the transport. Patching ``_request``
rather than adding the middleware when a ``ClientSession`` is made covers the sessions made
before the cache was switched on (google-genai keeps one per event loop), subclasses
(google-genai's) and requests that pass their own ``middlewares=``. The middleware sees the
request as it will be sent (URL with its query, every header, the body as a payload).

The answers are real ``ClientResponse`` objects of the session's response class, whose
``content`` is a real ``StreamReader``: a whole body is fed at once; a stream (a hit's stored
chunks, or the provider's stream while it is recorded) is pulled one piece at a time when a
read finds the buffer empty, so the caller gets each piece as the provider sends it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol, cast

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from aiohttp.payload import AsyncIterablePayload, BytesPayload
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from ..core.flow import Answer, Outcome, PassThrough, Rebuilt, Tee
from ..runtime._async.driver import drive, end_stream
from ..runtime._sync.driver import end_stream as end_stream_now
from ..runtime.activation import active_session
from ..runtime.dropped import end_when_dropped
from ..runtime.session import CacheSession
from . import warn_once
from .httpx_common import SessionSource, session_source

if TYPE_CHECKING:
    from aiohttp.client_middlewares import ClientHandlerType

log = logging.getLogger("metrion_fixture")

_DEFAULT_READ_BUFSIZE = 2**16  # aiohttp's own default, for a session that does not say


class CacheMiddleware:
    """An aiohttp client middleware that answers LLM requests from the cache.

    ``aiohttp.ClientSession(middlewares=[CacheMiddleware(session=...)])`` or
    ``CacheMiddleware(url=..., mode=...)`` (the options of :class:`~metrion_fixture.CacheSession`),
    for a session of your own without patching; ``middleware.session`` is the session it serves.
    """

    def __init__(self, *, session: CacheSession | SessionSource | None = None, **options: Any) -> None:
        self._session_source = session_source(session, options)

    @property
    def session(self) -> CacheSession | None:
        return self._session_source()

    async def __call__(self, request: aiohttp.ClientRequest, handler: ClientHandlerType) -> aiohttp.ClientResponse:
        session = self._session_source()
        if session is None or not _decompressed(request.session.auto_decompress):
            return await handler(request)
        upstream = _Upstream(request, handler)
        url = request.url
        flow = session.core.exchange(request.method, url.path, request.headers, url.raw_query_string)
        outcome = await drive(session, flow, upstream)
        return _respond(outcome, upstream, request, session)


_ACTIVE = CacheMiddleware(session=active_session)


def wrap_request(original: Callable[..., Any]) -> Callable[..., Any] | None:
    """A ``ClientSession._request`` that adds the cache's middleware while a session is active.

    None (and a warning, once) if this aiohttp cannot take it: its requests then go to the
    provider uncached, as before.
    """
    reason = unsupported()
    if reason is not None:
        warn_once(f"metrion cache: {reason}; requests sent through aiohttp are not cached")
        return None

    # wraps: google-genai reads ``_request``'s signature to choose which options it passes
    # (inspect.signature follows __wrapped__).
    @functools.wraps(original)
    async def _request(self: aiohttp.ClientSession, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        if active_session() is not None and _decompressed(kwargs.get("auto_decompress", True)):
            # A request's own middlewares replace the session's: keep whichever aiohttp would use.
            own = kwargs.get("middlewares")
            chain: tuple[Any, ...] = tuple(getattr(self, "_middlewares", ()) if own is None else own)
            if not any(isinstance(middleware, CacheMiddleware) for middleware in chain):
                kwargs["middlewares"] = (*chain, _ACTIVE)
        return await original(self, method, str_or_url, **kwargs)

    return _request


def unsupported() -> str | None:
    """Why this aiohttp version cannot be cached, or None."""
    version = getattr(aiohttp, "__version__", "?")
    if "middlewares" not in inspect.signature(aiohttp.ClientSession._request).parameters:
        return f"aiohttp {version} has no client middlewares (aiohttp >= 3.12 has)"
    unknown = sorted(
        name
        for name, parameter in _RESPONSE_PARAMETERS.items()
        if parameter.kind is parameter.KEYWORD_ONLY
        and parameter.default is parameter.empty
        and name not in _RESPONSE_ARGUMENTS
    )
    if unknown:
        return f"aiohttp {version} makes responses with arguments the cache does not know ({', '.join(unknown)})"
    return None


def _decompressed(auto_decompress: bool | None) -> bool:
    """Whether aiohttp decodes the bodies (its default). The core reads decoded bodies, and its
    answers carry no Content-Encoding: a caller that asked for the raw bytes gets no cache."""
    if auto_decompress is False:
        warn_once("metrion cache: aiohttp requests made with auto_decompress=False are not cached")
        return False
    return True


# -- the provider side -------------------------------------------------------------------------


class _Upstream:
    __slots__ = ("request", "handler", "response")

    def __init__(self, request: aiohttp.ClientRequest, handler: ClientHandlerType) -> None:
        self.request, self.handler = request, handler
        self.response: aiohttp.ClientResponse | None = None

    async def read_request(self) -> bytes:
        body = self.request.body
        if isinstance(body, BytesPayload):  # bytes, str and json= bodies: reading leaves them to be sent
            as_bytes = getattr(body, "as_bytes", None)  # aiohttp >= 3.13
            return bytes(await as_bytes() if as_bytes is not None else body._value)
        if isinstance(body, AsyncIterablePayload) and hasattr(body, "as_bytes"):
            # It keeps the chunks it read and sends those (aiohttp >= 3.13).
            return bytes(await body.as_bytes())
        # No body, or one that reading could use up (a file, a form): not a cacheable LLM
        # request, which the core passes through (BYPASS) when it finds no JSON.
        return b""

    async def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        headers = self.request.headers
        for name in strip:
            headers.popall(name, None)
        self.response = response = await self.handler(self.request)
        return response.status, list(response.headers.items())

    async def read_body(self) -> bytes:
        assert self.response is not None
        return await self.response.read()


# -- the caller side: the final states as aiohttp responses ------------------------------------


def _respond(
    outcome: Outcome, upstream: _Upstream, request: aiohttp.ClientRequest, session: CacheSession
) -> aiohttp.ClientResponse:
    loop, limit = request.loop, _read_limit(request)
    response_class = request.response_class
    if isinstance(outcome, Answer):
        reply = outcome.reply
        if reply.stream:
            content: StreamReader = _PulledStream(_Stored(reply.chunks), loop, limit)
            return _response(response_class, request, reply.status, reply.headers, content)
        body = reply.chunks[0] if len(reply.chunks) == 1 else b"".join(reply.chunks)
        return _response(response_class, request, reply.status, _sized(reply.headers, body), _whole(body, loop, limit))
    provider = upstream.response
    assert provider is not None  # every other state follows a Forward
    if isinstance(outcome, PassThrough):
        if outcome.tags:
            _set_headers(
                provider,
                [*provider.headers.items(), *outcome.tags],
                (*provider.raw_headers, *_raw(outcome.tags)),
            )
        return provider
    if isinstance(outcome, Rebuilt):
        headers = _sized(outcome.headers, outcome.body)
        return _response(response_class, request, outcome.status, headers, _whole(outcome.body, loop, limit), provider)
    recorded = _Recorded(provider, outcome, session)
    response = _response(
        _tee_class(response_class),
        request,
        outcome.recorder.status,
        outcome.headers,
        _PulledStream(recorded, loop, limit),
        provider,
    )
    cast(_TeeResponse, response).attach(provider, recorded)
    return response


def _sized(headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
    # A body the cache holds whole is sent with its length, as the httpx adapter's are.
    return [*headers, ("Content-Length", str(len(body)))]


def _read_limit(request: aiohttp.ClientRequest) -> int:
    # The session's read_bufsize bounds a line (readline) as it does for the provider's own responses.
    limit = getattr(request.session, "_read_bufsize", None)
    return limit if isinstance(limit, int) and limit > 0 else _DEFAULT_READ_BUFSIZE


class _NothingWritten:
    """aiohttp 3.14's ``stream_writer`` argument, for a response whose request this object did not send."""

    output_size = 0


_NOTHING_WRITTEN = _NothingWritten()
_RESPONSE_ARGUMENTS = frozenset(
    {
        "writer",
        "continue100",
        "timer",
        "request_info",
        "traces",
        "loop",
        "session",
        "stream_writer",
        "request_headers",
        "original_url",
    }
)


_RESPONSE_PARAMETERS = inspect.signature(aiohttp.ClientResponse).parameters
_PASSED_ARGUMENTS = tuple(name for name in _RESPONSE_PARAMETERS if name in _RESPONSE_ARGUMENTS)


def _response_arguments(request: aiohttp.ClientRequest) -> dict[str, Any]:
    """What ``ClientRequest.send`` gives its response class, for the arguments this aiohttp takes."""
    known: dict[str, Any] = {
        "writer": None,  # the request is sent already (or never will be)
        "continue100": None,
        "timer": None,
        "request_info": request.request_info,
        "traces": getattr(request, "_traces", []),
        "loop": request.loop,
        "session": request.session,
        "stream_writer": _NOTHING_WRITTEN,
        "request_headers": request.headers,
        "original_url": request.original_url,
    }
    return {name: known[name] for name in _PASSED_ARGUMENTS}


def _response(
    response_class: type[aiohttp.ClientResponse],
    request: aiohttp.ClientRequest,
    status: int,
    headers: list[tuple[str, str]],
    content: StreamReader,
    provider: aiohttp.ClientResponse | None = None,
) -> aiohttp.ClientResponse:
    """A response of the session's class, set up as ``ClientResponse.start`` sets up one read from a connection."""
    response = response_class(request.method, request.original_url, **_response_arguments(request))
    response.version = provider.version if provider is not None else aiohttp.HttpVersion11
    response.status = status
    response.reason = provider.reason if provider is not None else _reason(status)
    _set_headers(response, headers, _raw(headers))
    response.content = content
    response._closed = False
    # As for a connection's payload: the response counts as closed once its body is read.
    content.on_eof(response._response_eof)
    return response


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""  # raise_for_status needs a reason, not None


def _raw(headers: Iterable[tuple[str, str]]) -> tuple[tuple[bytes, bytes], ...]:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape; this is its inverse.
    return tuple(
        (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")) for name, value in headers
    )


def _set_headers(
    response: aiohttp.ClientResponse, headers: list[tuple[str, str]], raw: tuple[tuple[bytes, bytes], ...]
) -> None:
    response._headers = CIMultiDictProxy(CIMultiDict(headers))
    response._raw_headers = raw
    # ``headers`` and ``raw_headers`` are computed once and kept (reify): forget a value kept before.
    kept = getattr(response, "_cache", None)
    if isinstance(kept, dict):
        kept.pop("headers", None)
        kept.pop("raw_headers", None)


# -- bodies: StreamReaders fed by the cache ------------------------------------------------------


class _Unthrottled:
    """The protocol a cache-fed ``StreamReader`` reports to: no socket to pause.

    Its bytes are in memory, or pulled from the provider only when the caller reads, so a
    full buffer never needs to hold back a connection.
    """

    connected = True
    _reading_paused = False  # read by aiohttp < 3.14 before it pauses or resumes

    def pause_reading(self, *args: Any, **kwargs: Any) -> None:
        pass

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        pass


_UNTHROTTLED = cast(BaseProtocol, _Unthrottled())


def _whole(body: bytes, loop: asyncio.AbstractEventLoop, limit: int) -> StreamReader:
    reader = StreamReader(_UNTHROTTLED, limit, loop=loop)
    if body:
        reader.feed_data(body)
    reader.feed_eof()
    return reader


class _Source(Protocol):
    async def pull(self) -> bytes:
        """The next piece of the body; b"" at its end."""


class _PulledStream(StreamReader):
    """A ``StreamReader`` that, when a read finds its buffer empty, pulls the next piece from ``source``.

    ``_wait`` is the one place every read method of ``StreamReader`` waits for data (aiohttp
    3.x and 4): pulling there gives the caller every read method, with each piece as it comes.
    Each piece is marked as one HTTP chunk, so ``iter_chunks()`` keeps the pieces' boundaries.
    """

    __slots__ = ("_source", "_pulling")

    def __init__(self, source: _Source, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        super().__init__(_UNTHROTTLED, limit, loop=loop)
        self._source, self._pulling = source, False
        self.begin_http_chunk_receiving()

    async def _wait(self, func_name: str) -> None:
        if self._pulling:
            # As aiohttp's own: two readers at once could not both get the next piece.
            raise RuntimeError(f"{func_name}() called while another coroutine is already waiting for incoming data")
        self._pulling = True
        try:
            piece = await self._source.pull()
        except Exception as error:
            self.set_exception(error)
            raise
        finally:
            self._pulling = False
        if piece:
            self.feed_data(piece)
            self.end_http_chunk_receiving()
        else:
            self.feed_eof()

    async def wait_eof(self) -> None:
        # Nothing arrives unless pulled: pull the rest into the buffer.
        while not self.is_eof():
            exception = self.exception()
            if exception is not None:
                raise exception
            await self._wait("wait_eof")


class _Stored:
    """A hit's stored chunks, one per pull."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = (chunk for chunk in chunks if chunk)  # not all copied before the first is sent

    async def pull(self) -> bytes:
        return next(self._chunks, b"")


class _Recorded:
    """The provider's stream, each piece recorded as the caller pulls it; ``end_stream`` once, at its end."""

    __slots__ = ("_provider", "_tee", "_session", "_over", "_dropped", "__weakref__")

    def __init__(self, provider: aiohttp.ClientResponse, tee: Tee, session: CacheSession) -> None:
        self._provider, self._tee, self._session = provider, tee, session
        self._over = False
        self._dropped = end_when_dropped(self, session, tee)

    async def pull(self) -> bytes:
        recorder = self._tee.recorder
        try:
            piece = await self._next_chunk()
        except Exception:
            # The provider's stream broke. A caller leaving early is not an Exception: its
            # release() ends the stream, by whether the terminator had arrived.
            recorder.abandon()
            if self._claim():
                await end_stream(self._session, self._tee, False)
            raise
        if piece:
            recorder.feed(piece)
        elif self._claim():
            # Stored before the caller sees the end of the body.
            await end_stream(self._session, self._tee, True)
        return piece

    async def _next_chunk(self) -> bytes:
        # One HTTP chunk of the provider's at a time (not whatever is buffered), so the entry
        # keeps the provider's chunks whatever the caller's pace.
        content = self._provider.content
        while True:
            data, end_of_chunk = await content.readchunk()
            if data or not end_of_chunk:
                return data

    def end_early(self) -> None:
        """The caller released or closed the response before the end of the body.

        ``release()`` and ``close()`` are not coroutines, and a task started there may never
        run: ``asyncio.run`` cancels the pending tasks once the caller's coroutine returns, and
        google-genai releases a stream it stops reading without awaiting anything. So the end
        is done with the session's blocking store calls (one lock given back, and one write for
        a stream whose terminator had arrived), on a thread of its own: a store that hangs
        never stalls the caller's event loop.
        """
        if self._claim():
            threading.Thread(
                target=end_stream_now, args=(self._session, self._tee, False), name="metrion-stream-end", daemon=True
            ).start()

    def _claim(self) -> bool:
        over, self._over = self._over, True
        self._dropped.detach()
        return not over


class _TeeResponse(aiohttp.ClientResponse):
    """A recorded stream's response. The provider's response keeps its connection; this one releases or closes it."""

    _provider: aiohttp.ClientResponse
    _recorded: _Recorded

    def attach(self, provider: aiohttp.ClientResponse, recorded: _Recorded) -> None:
        self._provider, self._recorded = provider, recorded

    @property
    def connection(self) -> Any:
        # aiohttp ties the request's total timeout to this connection's release.
        return self._provider.connection

    def release(self) -> Any:
        try:
            return super().release()
        finally:
            try:
                self._provider.release()
            finally:
                self._recorded.end_early()

    def close(self) -> None:
        try:
            super().close()
        finally:
            try:
                self._provider.close()
            finally:
                self._recorded.end_early()


_tee_classes: dict[type[aiohttp.ClientResponse], type[aiohttp.ClientResponse]] = {aiohttp.ClientResponse: _TeeResponse}


def _tee_class(response_class: type[aiohttp.ClientResponse]) -> type[aiohttp.ClientResponse]:
    tee_class = _tee_classes.get(response_class)
    if tee_class is None:
        # A session's own response class stays its class (and keeps its methods).
        tee_class = _tee_classes[response_class] = type(
            f"Tee{response_class.__name__}", (_TeeResponse, response_class), {}
        )
    return tee_class


__all__ = ["CacheMiddleware", "unsupported", "wrap_request"]
