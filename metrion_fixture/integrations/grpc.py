"""gRPC client interceptors that serve xAI's chat calls (the official ``xai-sdk``) from the cache.

``GetCompletion`` (unary) and ``GetCompletionChunk`` (server streaming) are keyed like every
other format: ``cache_key(model, messages)``, the messages being the request's protobuf
messages as JSON (``MessageToDict(preserving_proto_field_name=True)``). Entries hold the
serialized responses, one per streamed chunk, so a hit replays the same chunks. A stream is
stored only when it ended with status OK; one that failed or that the caller left early is
not. Identical concurrent cold calls make one call to xAI, the others wait for its entry
(single flight, as for HTTP). Other methods pass through untouched.

The mode comes from the session, or from the call's ``x-metrion-cache`` metadata (``true``,
``refresh``, ``false``), which is removed before the call goes out. While a session is
active (:func:`metrion_fixture.enable` / :func:`metrion_fixture.cache`), the channels the
``xai_sdk`` clients create get these interceptors (see :mod:`.patching`); for a channel you
build yourself, use :func:`intercept_channel` (sync) or pass :func:`aio_interceptors` to
``grpc.aio.insecure_channel`` / ``secure_channel``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio

from ..core.directives import KEY_HEADER, MODE_HEADER
from ..core.engine import BYPASS, Plan, Reply, plan_prompt
from ..core.flow import Answer, Outcome, Tee
from ..formats.xai_grpc import METHODS, WIRE_FORMAT, response_class
from ..runtime._async.driver import drive as adrive
from ..runtime._async.driver import end_stream as aend_stream
from ..runtime._sync.driver import drive, end_stream
from ..runtime.activation import active_session
from ..runtime.dropped import end_when_dropped
from ..runtime.session import CacheSession

SessionSource = CacheSession | Callable[[], CacheSession | None] | None

# Closest HTTP status of a gRPC status, for call records (``CallRecord.http_status``).
_HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


# The cache's own refusals, as gRPC errors.
_REFUSAL_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "replay_miss": grpc.StatusCode.FAILED_PRECONDITION,
    "store_down": grpc.StatusCode.UNAVAILABLE,
}


def _http_status(code: grpc.StatusCode | None) -> int:
    return _HTTP_STATUS.get(code.name if code is not None else "UNKNOWN", 500)


def _resolve(source: SessionSource) -> CacheSession | None:
    if source is None:
        return active_session()
    if isinstance(source, CacheSession):
        return source
    return source()


def _method(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


class _Call:
    """One chat call the cache handles: its session, plan and start (on the core's clock)."""

    __slots__ = ("session", "plan", "started")

    def __init__(self, session: CacheSession, plan: Plan, started: float) -> None:
        self.session, self.plan, self.started = session, plan, started

    def flow(self) -> Any:
        return self.session.core.serve(self.plan, self.started)


def _prepare(
    source: SessionSource,
    details: Any,
    request: Any,
    default_mode: str | None,
    credentials: dict[str, str] | None,
) -> tuple[Any, _Call | None]:
    """The call details without our metadata, and the planned call if the cache handles it."""
    metadata = list(details.metadata or ())
    header = default_mode
    kept = []
    for name, value in metadata:
        if name.lower() == MODE_HEADER:
            header = value if isinstance(value, str) else value.decode()
        else:
            kept.append((name, value))
    if len(kept) != len(metadata):
        details = details._replace(metadata=kept)
    stream = METHODS.get(_method(details))
    session = _resolve(source) if stream is not None else None
    if session is None or stream is None:
        return details, None
    started = session.core.clock.monotonic()
    from google.protobuf.json_format import MessageToDict

    model = request.model
    if not model or not request.messages:
        return details, _Call(
            session, Plan(outcome=BYPASS, wire_format=WIRE_FORMAT, model=model, stream=stream), started
        )
    messages = [MessageToDict(message, preserving_proto_field_name=True) for message in request.messages]
    if not credentials:
        credentials = {name.lower(): value for name, value in metadata if name.lower() == "authorization"}
    plan = plan_prompt(session.settings, WIRE_FORMAT, model, messages, stream, header, credentials)
    if request.previous_response_id:
        # Server-side conversation state: the messages alone do not say which answer is wanted.
        plan = Plan(outcome=BYPASS, wire_format=WIRE_FORMAT, model=model, key=plan.key, stream=stream)
    return details, _Call(session, plan, started)


def _metadata(reply: Reply) -> list[tuple[str, str]]:
    """The cache's own response headers (status, key, age) as call metadata."""
    return [(name, value) for name, value in reply.headers if name in (MODE_HEADER, KEY_HEADER, "age")]


def _serialized(message: Any) -> bytes:
    return bytes(message.SerializeToString())


class _Upstream:
    """xAI's side of a sync call: the interceptor's continuation."""

    def __init__(self, continuation: Any, details: Any, request: Any, stream: bool) -> None:
        self.continuation, self.details, self.request, self.stream = continuation, details, request, stream
        self.call: Any = None
        self.response: Any = None

    def read_request(self) -> bytes:
        raise AssertionError("a gRPC call is planned before its flow starts")

    def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        self.call = self.continuation(self.details, self.request)
        if self.stream:
            return 200, []  # a streamed call's errors arrive while it is read
        try:
            self.response = self.call.result()
        except grpc.RpcError as error:
            return _http_status(error.code() if isinstance(error, grpc.Call) else None), []
        except Exception:  # noqa: BLE001 - the SDK sees the failure as it would without the cache
            return 500, []
        return 200, []

    def read_body(self) -> bytes:
        return _serialized(self.response)


class _AsyncUpstream:
    """xAI's side of a ``grpc.aio`` call."""

    def __init__(self, continuation: Any, details: Any, request: Any, stream: bool) -> None:
        self.continuation, self.details, self.request, self.stream = continuation, details, request, stream
        self.call: Any = None
        self.response: Any = None
        self.error: BaseException | None = None

    async def read_request(self) -> bytes:
        raise AssertionError("a gRPC call is planned before its flow starts")

    async def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        self.call = await self.continuation(self.details, self.request)
        if self.stream:
            return 200, []
        try:
            self.response = await self.call
        except grpc.aio.AioRpcError as error:
            self.error = error
            return _http_status(error.code()), []
        except BaseException as error:  # noqa: BLE001 - raised to the caller once the call is recorded
            self.error = error
            return 500, []
        return 200, []

    async def read_body(self) -> bytes:
        return _serialized(self.response)


# --- sync -------------------------------------------------------------------------------------


class _Done(grpc.Call, grpc.Future):
    """A call the cache answered by itself: a hit, or an error (see :class:`_Failed`)."""

    def __init__(self, response: Any, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._response = response
        self._metadata = tuple(metadata)

    def result(self, timeout: float | None = None) -> Any:
        return self._response

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return None

    def traceback(self, timeout: float | None = None) -> Any:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def initial_metadata(self) -> Any:
        return self._metadata

    def trailing_metadata(self) -> Any:
        return ()

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    def details(self) -> str:
        return ""


class _Failed(grpc.RpcError, _Done):
    """An error the cache answers with (replay miss, invalid header): raised by ``result()`` and iteration."""

    def __init__(self, code: grpc.StatusCode, message: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        _Done.__init__(self, None, metadata)
        self._code, self._message = code, message

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        raise self

    def __str__(self) -> str:
        return f"<metrion cache RpcError: {self._code.name}: {self._message}>"


class _Replay(_Done):
    """A stored stream, replayed chunk by chunk."""

    def __init__(self, chunks: Sequence[bytes], metadata: Sequence[tuple[str, str]]) -> None:
        super().__init__(None, metadata)
        parse = response_class(True).FromString
        self._messages = (parse(chunk) for chunk in chunks)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._messages)


class _Tee:
    """xAI's stream passed to the caller as it arrives, stored once it ended with status OK.

    A gRPC call has no close hook: a stream the caller leaves half-read is ended (its lock given
    back) once the caller drops it and it is garbage-collected (runtime/dropped.py).
    """

    def __init__(self, call: Any, tee: Tee, session: CacheSession) -> None:
        self._call, self._tee, self._session = call, tee, session
        self._over = False
        self._dropped = end_when_dropped(self, session, tee)

    def __getattr__(self, name: str) -> Any:  # the grpc.Call / grpc.Future methods of the real call
        return getattr(self._call, name)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._call)
        except StopIteration:
            self._end(reached_eof=True)
            raise
        except BaseException:
            self._tee.recorder.abandon()  # failed or cancelled: never stored
            self._end(reached_eof=False)
            raise
        self._tee.recorder.feed(_serialized(message))
        return message

    def _end(self, reached_eof: bool) -> None:
        if not self._over:
            self._over = True
            self._dropped.detach()
            end_stream(self._session, self._tee, reached_eof)


def _answer(reply: Reply) -> Any:
    """A sync call the cache answers by itself: a hit, or its refusal as a gRPC error."""
    if reply.kind != "hit":
        return _Failed(_REFUSAL_CODES[reply.kind], reply.message, _metadata(reply))
    if reply.stream:
        return _Replay(reply.chunks, _metadata(reply))
    return _Done(response_class(False).FromString(reply.chunks[0]), _metadata(reply))


class CacheInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Serves ``GetCompletion`` / ``GetCompletionChunk`` from the cache on a sync channel.

    ``session``: a :class:`CacheSession`, a callable returning one, or None for the active one
    (no active session: calls pass through). ``default_mode``: the ``x-metrion-cache`` value for
    calls without that metadata. ``credentials``: credential headers (``authorization``) for
    ``scope="credential"`` when the channel's credentials are not in the call metadata.
    """

    def __init__(
        self,
        session: SessionSource = None,
        *,
        default_mode: str | None = None,
        credentials: dict[str, str] | None = None,
    ) -> None:
        self._session, self._default_mode, self._credentials = session, default_mode, credentials

    def _intercept(self, continuation: Any, client_call_details: Any, request: Any, stream: bool) -> Any:
        details, call = _prepare(self._session, client_call_details, request, self._default_mode, self._credentials)
        if call is None:
            return continuation(details, request)
        upstream = _Upstream(continuation, details, request, stream)
        outcome: Outcome = drive(call.session, call.flow(), upstream)
        if isinstance(outcome, Answer):
            return _answer(outcome.reply)
        if isinstance(outcome, Tee):
            return _Tee(upstream.call, outcome, call.session)
        return upstream.call  # the provider's own call, answered (and stored if it was worth it)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._intercept(continuation, client_call_details, request, stream=False)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._intercept(continuation, client_call_details, request, stream=True)


def intercept_channel(
    channel: grpc.Channel,
    *,
    session: SessionSource = None,
    default_mode: str | None = None,
    credentials: dict[str, str] | None = None,
) -> grpc.Channel:
    """``channel`` with the cache in front of its xAI chat calls (``session``: see :class:`CacheInterceptor`)."""
    interceptor = CacheInterceptor(session, default_mode=default_mode, credentials=credentials)
    return grpc.intercept_channel(channel, interceptor)


# --- async ------------------------------------------------------------------------------------


def _aio_error(reply: Reply) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        _REFUSAL_CODES[reply.kind], grpc.aio.Metadata(*_metadata(reply)), grpc.aio.Metadata(), details=reply.message
    )


class _AsyncBase:
    def __init__(
        self,
        session: SessionSource = None,
        *,
        default_mode: str | None = None,
        credentials: dict[str, str] | None = None,
    ) -> None:
        self._session, self._default_mode, self._credentials = session, default_mode, credentials

    async def _intercept(self, continuation: Any, client_call_details: Any, request: Any, stream: bool) -> Any:
        details, call = _prepare(self._session, client_call_details, request, self._default_mode, self._credentials)
        if call is None:
            return await continuation(details, request)
        upstream = _AsyncUpstream(continuation, details, request, stream)
        outcome: Outcome = await adrive(call.session, call.flow(), upstream)
        if isinstance(outcome, Answer):
            reply = outcome.reply
            if reply.kind != "hit":
                raise _aio_error(reply)
            if stream:
                return _AioReplay(reply.chunks, _metadata(reply))
            return response_class(False).FromString(reply.chunks[0])
        if upstream.error is not None:
            raise upstream.error
        if isinstance(outcome, Tee):
            return _atee(upstream.call, outcome, call.session)
        return upstream.call


class AsyncUnaryUnaryCacheInterceptor(_AsyncBase, grpc.aio.UnaryUnaryClientInterceptor):
    """``GetCompletion`` from the cache on a ``grpc.aio`` channel."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request, stream=False)


class AsyncUnaryStreamCacheInterceptor(_AsyncBase, grpc.aio.UnaryStreamClientInterceptor):
    """``GetCompletionChunk`` from the cache on a ``grpc.aio`` channel."""

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request, stream=True)


class _AioReplay(grpc.aio.UnaryStreamCall):
    """A stored stream replayed on a ``grpc.aio`` channel: a finished call whose messages are the chunks."""

    def __init__(self, chunks: Sequence[bytes], tags: list[tuple[str, str]]) -> None:
        parse = response_class(True).FromString
        self._messages = iter([parse(chunk) for chunk in chunks])
        self._tags = tags
        self._callbacks: list[Callable[[Any], None]] = []

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        for message in self._messages:
            yield message

    async def read(self) -> Any:
        return next(self._messages, grpc.aio.EOF)

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        callback(self)

    def time_remaining(self) -> float | None:
        return None

    async def initial_metadata(self) -> Any:
        return grpc.aio.Metadata(*self._tags)

    async def trailing_metadata(self) -> Any:
        return grpc.aio.Metadata()

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    async def details(self) -> str:
        return ""

    async def wait_for_connection(self) -> None:
        return None


async def _atee(call: Any, tee: Tee, session: CacheSession) -> AsyncIterator[Any]:
    reached_eof = False
    try:
        async for message in call:  # an error or the caller leaving raises here: nothing is stored
            tee.recorder.feed(_serialized(message))
            yield message
        reached_eof = True
    except BaseException:
        tee.recorder.abandon()
        raise
    finally:
        await aend_stream(session, tee, reached_eof)


def aio_interceptors(
    *,
    session: SessionSource = None,
    default_mode: str | None = None,
    credentials: dict[str, str] | None = None,
) -> list[Any]:
    """The interceptors to pass to ``grpc.aio.insecure_channel(..., interceptors=...)`` / ``secure_channel``."""
    return [
        AsyncUnaryUnaryCacheInterceptor(session, default_mode=default_mode, credentials=credentials),
        AsyncUnaryStreamCacheInterceptor(session, default_mode=default_mode, credentials=credentials),
    ]


def add_aio_interceptors(channel: grpc.aio.Channel, interceptors: list[Any]) -> bool:
    """Add interceptors to an existing ``grpc.aio`` channel (innermost); False if this grpc cannot.

    grpc.aio has no ``intercept_channel``; its channel keeps its interceptors in per-kind lists,
    read when a stub method is made, so this must run before the stubs are created.
    """
    lists: dict[type, list[Any]] = {}
    for kind, attribute in (
        (grpc.aio.UnaryUnaryClientInterceptor, "_unary_unary_interceptors"),
        (grpc.aio.UnaryStreamClientInterceptor, "_unary_stream_interceptors"),
    ):
        found = getattr(channel, attribute, None)
        if not isinstance(found, list):
            return False
        lists[kind] = found
    for interceptor in interceptors:
        for kind, kept in lists.items():
            if isinstance(interceptor, kind):
                kept.append(interceptor)
    return True


# --- the xai_sdk clients (installed by metrion_fixture.transports.patching) --------------------


def wrap_make_channel(original: Callable[..., Any], *, aio: bool) -> Callable[..., Any]:
    """A replacement for ``xai_sdk`` ``Client._make_grpc_channel`` that puts the cache on the channel.

    An ``x-metrion-cache`` entry in the client's ``metadata`` becomes the channel's default mode
    and is never sent. The client's API key is given to the interceptors for ``scope="credential"``
    (hashed there, never stored).
    """

    def _make_grpc_channel(self: Any, api_key: Any, api_host: Any, metadata: Any, *args: Any, **kwargs: Any) -> Any:
        default_mode, kept = None, []
        for name, value in metadata or ():
            if name.lower() == MODE_HEADER:
                default_mode = value
            else:
                kept.append((name, value))
        channel = original(self, api_key, api_host, tuple(kept), *args, **kwargs)
        options: dict[str, Any] = {
            "default_mode": default_mode,
            "credentials": {"authorization": f"Bearer {api_key}"} if api_key else None,
        }
        if not aio:
            return intercept_channel(channel, **options)
        if not add_aio_interceptors(channel, aio_interceptors(**options)):
            import logging

            logging.getLogger("metrion_fixture").warning(
                "metrion cache: this grpc version's aio channel cannot take interceptors after it is made; "
                "xai_sdk.AsyncClient calls are not cached"
            )
        return channel

    _make_grpc_channel.__wrapped__ = original  # type: ignore[attr-defined]
    return _make_grpc_channel
