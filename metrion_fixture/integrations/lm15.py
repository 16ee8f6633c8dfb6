"""The lm15 adapter: requests sent by lm15's own HTTP client through the cache's core and drivers.

lm15 is dspy's default engine since dspy 3.4 (vendored there as ``dspy._vendor.lm15``) and a
package of its own (``lm15``). It sends with an HTTP/1.1 client of its own, on the standard
library's sockets (``lm15/transports``), which the httpx and aiohttp patches never see.

Where the cache sits: every request of lm15's providers, streamed or not, goes through one
method of the transport they share: ``StdlibTransport.stream(request)`` (sync) and
``StdlibAsyncTransport._do_stream(request)`` (async: ``await transport.stream(request)`` and
``async with transport.stream(request)`` both call it). Each takes a ``TransportRequest`` (method,
full URL, a list of headers, the whole body as bytes) and returns a ``TransportResponse`` /
``AsyncTransportResponse`` whose iteration yields the decoded body, chunk by chunk, and which
hands its connection back through the ``release(body_consumed)`` callable it was made with. A
non-streamed call reads that whole body (``read()``); a streamed one reads it line by line. While
a session is active the patched methods (installed by ``patching.install()``, see
:func:`wrap_send`) hand each request to the core's flow and answer with responses of lm15's own
classes: a hit's stored chunks one by one, the provider's stream passed on (and recorded) chunk by
chunk as it arrives, never read whole before its first chunk.

Transports of the user's own (any object with a ``stream`` method, passed as ``transport=``) are
not lm15's classes and are not patched; nor is ``FetchTransport`` (Pyodide only).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from ..core.flow import Answer, Outcome, PassThrough, Rebuilt, Tee
from ..runtime._async.driver import drive as adrive
from ..runtime._async.driver import end_stream as aend_stream
from ..runtime._sync.driver import drive, end_stream
from ..runtime.activation import active_session
from ..runtime.dropped import end_when_dropped
from ..runtime.session import CacheSession
from . import warn_once

log = logging.getLogger("metrion_fixture")

# What the response classes are made with (lm15's transports make them with these keywords).
_RESPONSE_ARGUMENTS = ("status", "reason", "headers", "http_version", "chunks", "release")
_HTTP_VERSION = "HTTP/1.1"


def wrap_send(original: Callable[..., Any], response_class: type, *, aio: bool) -> Callable[..., Any] | None:
    """The transport's send method (``StdlibTransport.stream``, or ``StdlibAsyncTransport._do_stream``
    with ``aio``) with the cache in front of it while a session is active.

    None (and a warning, once) if this lm15 makes its responses in a way the cache does not know:
    its requests then go to the provider uncached, as before.
    """
    reason = unsupported(response_class)
    if reason is not None:
        warn_once(f"metrion cache: {reason}; requests sent by lm15 are not cached")
        return None
    if aio:

        @functools.wraps(original)
        async def _do_stream(self: Any, request: Any) -> Any:
            session = active_session()
            if session is None:
                return await original(self, request)
            upstream = _AsyncUpstream(self, original, request)
            method, path, headers, query = _request_line(request)
            outcome = await adrive(session, session.core.exchange(method, path, headers, query), upstream)
            return _arespond(outcome, upstream.response, session, response_class)

        return _do_stream

    @functools.wraps(original)
    def stream(self: Any, request: Any) -> Any:
        session = active_session()
        if session is None:
            return original(self, request)
        upstream = _Upstream(self, original, request)
        method, path, headers, query = _request_line(request)
        outcome = drive(session, session.core.exchange(method, path, headers, query), upstream)
        return _respond(outcome, upstream.response, session, response_class)

    return stream


def unsupported(response_class: type) -> str | None:
    """Why this lm15's responses cannot be made by the cache, or None."""
    try:
        parameters = inspect.signature(response_class).parameters
    except (TypeError, ValueError):
        return f"lm15's {response_class.__name__} has no signature the cache can read"
    missing = [name for name in _RESPONSE_ARGUMENTS if name not in parameters]
    unknown = sorted(
        name
        for name, parameter in parameters.items()
        if parameter.default is parameter.empty
        and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        and name not in _RESPONSE_ARGUMENTS
    )
    if missing or unknown:
        return f"lm15's {response_class.__name__} is made with arguments the cache does not know"
    return None


def _request_line(request: Any) -> tuple[str, str, Mapping[str, str], str]:
    """Method, decoded path (as httpx gives it), headers by lower-case name, and raw query of a ``TransportRequest``."""
    url = urlsplit(request.url)
    return request.method, unquote(url.path), {name.lower(): value for name, value in request.headers}, url.query


def _stripped(request: Any, strip: tuple[str, ...]) -> Any:
    """The request without the headers the core strips; the caller's own request is left as it was."""
    names = {name.lower() for name in strip}
    if not any(name.lower() in names for name, _ in request.headers):
        return request
    return dataclasses.replace(request, headers=[(k, v) for k, v in request.headers if k.lower() not in names])


# -- the provider side -------------------------------------------------------------------------


class _Upstream:
    __slots__ = ("transport", "send", "request", "response")

    def __init__(self, transport: Any, send: Callable[..., Any], request: Any) -> None:
        self.transport, self.send, self.request = transport, send, request
        self.response: Any = None

    def read_request(self) -> bytes:
        return bytes(self.request.body or b"")

    def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        self.response = response = self.send(self.transport, _stripped(self.request, strip))
        return response.status, list(response.headers)

    def read_body(self) -> bytes:
        # Reading to the end hands the provider's connection back to lm15's pool.
        return bytes(self.response.read())


class _AsyncUpstream:
    __slots__ = ("transport", "send", "request", "response")

    def __init__(self, transport: Any, send: Callable[..., Any], request: Any) -> None:
        self.transport, self.send, self.request = transport, send, request
        self.response: Any = None

    async def read_request(self) -> bytes:
        return bytes(self.request.body or b"")

    async def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        self.response = response = await self.send(self.transport, _stripped(self.request, strip))
        return response.status, list(response.headers)

    async def read_body(self) -> bytes:
        return bytes(await self.response.read())


# -- the caller side: the final states as lm15 responses ----------------------------------------


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _sized(headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
    # A body the cache holds whole is answered with its length, as the other adapters' are.
    return [*headers, ("Content-Length", str(len(body)))]


def _whole(chunks: Sequence[bytes]) -> bytes:
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _release_nothing(body_consumed: bool) -> None:
    """A response the cache made holds no connection."""


async def _arelease_nothing(body_consumed: bool) -> None:
    """A response the cache made holds no connection."""


def _respond(outcome: Outcome, provider: Any, session: CacheSession, response_class: type) -> Any:
    if isinstance(outcome, Answer):
        reply = outcome.reply
        # A hit's stored chunks are read, never copied: one per iteration step, as the provider sent them.
        if reply.stream:
            status, headers, chunks = reply.status, reply.headers, iter(reply.chunks)
        else:
            body = _whole(reply.chunks)
            status, headers, chunks = reply.status, _sized(reply.headers, body), iter((body,))
        return response_class(
            status=status,
            reason=_reason(status),
            headers=headers,
            http_version=_HTTP_VERSION,
            chunks=chunks,
            release=_release_nothing,
        )
    assert provider is not None  # every other state follows a Forward
    if isinstance(outcome, PassThrough):
        if outcome.tags:
            provider.headers = [*provider.headers, *outcome.tags]
        return provider
    if isinstance(outcome, Rebuilt):
        return response_class(
            status=outcome.status,
            reason=provider.reason,
            headers=_sized(outcome.headers, outcome.body),
            http_version=provider.http_version,
            chunks=iter((outcome.body,)),
            release=_release_nothing,
        )
    recorded = _Recorded(provider, outcome, session)
    return response_class(
        status=outcome.recorder.status,
        reason=provider.reason,
        headers=outcome.headers,
        http_version=provider.http_version,
        chunks=recorded,
        release=recorded.release,
    )


def _arespond(outcome: Outcome, provider: Any, session: CacheSession, response_class: type) -> Any:
    if isinstance(outcome, Answer):
        reply = outcome.reply
        if reply.stream:
            status, headers, chunks = reply.status, reply.headers, _achunks(reply.chunks)
        else:
            body = _whole(reply.chunks)
            status, headers, chunks = reply.status, _sized(reply.headers, body), _achunks((body,))
        return response_class(
            status=status,
            reason=_reason(status),
            headers=headers,
            http_version=_HTTP_VERSION,
            chunks=chunks,
            release=_arelease_nothing,
        )
    assert provider is not None
    if isinstance(outcome, PassThrough):
        if outcome.tags:
            provider.headers = [*provider.headers, *outcome.tags]
        return provider
    if isinstance(outcome, Rebuilt):
        return response_class(
            status=outcome.status,
            reason=provider.reason,
            headers=_sized(outcome.headers, outcome.body),
            http_version=provider.http_version,
            chunks=_achunks((outcome.body,)),
            release=_arelease_nothing,
        )
    recorded = _AsyncRecorded(provider, outcome, session)
    return response_class(
        status=outcome.recorder.status,
        reason=provider.reason,
        headers=outcome.headers,
        http_version=provider.http_version,
        chunks=recorded,
        release=recorded.release,
    )


async def _achunks(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class _Recorded:
    """The provider's stream, each chunk recorded as the caller reads it; ``end_stream`` once, at its end.

    The response made with it iterates it once (lm15's ``TransportResponse.__iter__``), and calls
    :meth:`release` when it is closed, read to the end or left early (``with`` blocks close it).
    """

    __slots__ = ("_provider", "_source", "_tee", "_session", "_over", "_dropped", "__weakref__")

    def __init__(self, provider: Any, tee: Tee, session: CacheSession) -> None:
        self._provider, self._tee, self._session = provider, tee, session
        self._source = iter(provider)  # hands the provider's connection back once read to the end
        self._over = False
        self._dropped = end_when_dropped(self, session, tee)

    def __iter__(self) -> _Recorded:
        return self

    def __next__(self) -> bytes:
        recorder = self._tee.recorder
        try:
            chunk: bytes = next(self._source)
        except StopIteration:
            self._end(reached_eof=True)  # stored before the caller sees the end of the body
            raise
        except Exception:
            # The provider's stream broke. A caller leaving early is not an Exception: release()
            # then decides, by whether the terminator had arrived.
            recorder.abandon()
            raise
        recorder.feed(chunk)
        return chunk

    def release(self, body_consumed: bool) -> None:
        try:
            self._provider.close()
        finally:
            self._end(reached_eof=False)

    def _end(self, reached_eof: bool) -> None:
        if not self._over:
            self._over = True
            self._dropped.detach()
            end_stream(self._session, self._tee, reached_eof)


class _AsyncRecorded:
    """The async twin of :class:`_Recorded`, for ``AsyncTransportResponse``."""

    __slots__ = ("_provider", "_source", "_tee", "_session", "_over", "_dropped", "__weakref__")

    def __init__(self, provider: Any, tee: Tee, session: CacheSession) -> None:
        self._provider, self._tee, self._session = provider, tee, session
        self._source = provider.__aiter__()
        self._over = False
        self._dropped = end_when_dropped(self, session, tee)

    def __aiter__(self) -> _AsyncRecorded:
        return self

    async def __anext__(self) -> bytes:
        recorder = self._tee.recorder
        try:
            chunk: bytes = await self._source.__anext__()
        except StopAsyncIteration:
            await self._end(reached_eof=True)
            raise
        except Exception:
            recorder.abandon()
            raise
        recorder.feed(chunk)
        return chunk

    async def release(self, body_consumed: bool) -> None:
        try:
            await self._provider.aclose()
        finally:
            await self._end(reached_eof=False)

    async def _end(self, reached_eof: bool) -> None:
        if not self._over:
            self._over = True
            self._dropped.detach()
            await aend_stream(self._session, self._tee, reached_eof)


__all__ = ["unsupported", "wrap_send"]
