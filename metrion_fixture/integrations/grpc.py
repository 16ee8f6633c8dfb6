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

import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any, NamedTuple

import grpc
import grpc.aio

from ..core.directives import KEY_HEADER, MODE_HEADER
from ..core.engine import BYPASS, ERROR, HIT, Plan, plan_prompt
from ..core.entry import Entry
from ..core.flow import (
    Lookup,
    Release,
    Step,
    _record,
    arun_store_steps,
    may_wait,
    own_entry,
    run_store_steps,
    take_turn,
    usage_fields,
)
from ..formats.xai_grpc import METHODS, WIRE_FORMAT, response_class
from ..runtime.activation import active_session
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


class Refusal(NamedTuple):
    """The cache answers a call with this gRPC error instead of calling xAI."""

    code: grpc.StatusCode
    message: str


def _http_status(code: grpc.StatusCode | None) -> int:
    return _HTTP_STATUS.get(code.name if code is not None else "UNKNOWN", 500)


class _Prepared:
    """One chat call the cache handles: its session, plan and start time."""

    __slots__ = ("session", "plan", "started")

    def __init__(self, session: CacheSession, plan: Plan, started: float) -> None:
        self.session, self.plan, self.started = session, plan, started

    def record(self, outcome: str, status: int, **kwargs: Any) -> Any:
        return _record(self.session, self.plan, outcome, status, self.started, **kwargs)

    def own_entry(self, found: Any) -> Entry | None:
        return own_entry(self.plan, found)

    def lookup(self) -> Generator[Step, Any, Refusal | Entry | Release | None]:
        """The cache's part of a call, for sync and async alike (they perform its store steps):
        a refusal to answer with, the entry to replay (a hit, recorded), or None / the
        single-flight lock to hold while calling the provider."""
        plan, session = self.plan, self.session
        if plan.error is not None:
            return self.invalid()
        if not plan.read:
            return None
        found = yield Lookup(plan.storage_key)
        verdict = self.after_read(found)
        if verdict is None and may_wait(session, plan, found):
            verdict = self.after_turn((yield from take_turn(session, plan)))
        return verdict

    def after_read(self, found: Any) -> Refusal | Entry | None:
        """What the store's answer means: a refusal to answer with, the entry to replay (a hit,
        recorded), or None to call the provider."""
        if isinstance(found, BaseException) and self.plan.read_only:
            return self.store_down(found)
        entry = self.own_entry(found)
        if entry is not None:
            self.hit(entry)
            return entry
        if self.plan.read_only:
            return self.replay_miss()
        return None

    def hit(self, entry: Entry) -> None:
        self.record(HIT, 200, saved=entry.provider_seconds, stored=entry.extra)

    def after_turn(self, turn: Any) -> Entry | Release | None:
        """The outcome of a single-flight turn: the entry another caller stored (a hit, recorded),
        the lock this caller holds while it asks the provider, or None (ask without a lock)."""
        if turn is not None and not isinstance(turn, Release):
            self.hit(turn)
        return turn  # type: ignore[no-any-return]

    def age_tag(self, entry: Entry) -> list[tuple[str, str]]:
        return [*self.tags(HIT), ("age", str(max(0, int(time.time() - entry.stored_at))))]

    def entry(self, chunks: list[bytes]) -> bytes | None:
        """The encoded entry for a complete answer, or None when it is over the size cap."""
        plan, settings = self.plan, self.session.settings
        if sum(len(chunk) for chunk in chunks) > settings.max_entry_bytes:
            return None
        usage = _usage(chunks, plan.stream)
        return Entry(
            status=200,
            headers=[],
            chunks=chunks,
            stream=plan.stream,
            stored_at=time.time(),
            ttl=plan.write_ttl,
            model=plan.model,
            wire_format=WIRE_FORMAT.name,
            key=plan.key,
            provider_seconds=round(time.perf_counter() - self.started, 6),
            extra={"usage": usage.as_dict()} if usage is not None else {},
        ).encode()

    def replay_miss(self) -> Refusal:
        plan = self.plan
        self.record(ERROR, 504)
        return Refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"metrion cache: no cached answer for model {plan.model!r} (key {plan.key}) and the cache is in "
            "replay mode, so the provider was not called; run once with mode 'true' (or 'refresh') and a "
            "provider key to record it",
        )

    def store_down(self, error: BaseException) -> Refusal:
        plan = self.plan
        self.record(ERROR, 504)
        return Refusal(
            grpc.StatusCode.UNAVAILABLE,
            f"metrion cache: the cache store could not be read ({type(error).__name__}: {error}) and the "
            f"cache is in replay mode, so the provider was not called for model {plan.model!r} "
            f"(key {plan.key}); check the store URL and that the store is running",
        )

    def invalid(self) -> Refusal:
        assert self.plan.error is not None
        self.record(ERROR, 400)
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, b"".join(self.plan.error.chunks).decode())

    def tags(self, outcome: str | None = None) -> list[tuple[str, str]]:
        return [(MODE_HEADER, outcome or self.plan.outcome), (KEY_HEADER, self.plan.key)]


def _usage(chunks: list[bytes], stream: bool) -> Any:
    try:
        return WIRE_FORMAT.usage(chunks, stream)
    except Exception:  # noqa: BLE001 - an odd answer must still be stored and served
        return None


def _resolve(source: SessionSource) -> CacheSession | None:
    if source is None:
        return active_session()
    if isinstance(source, CacheSession):
        return source
    return source()


def _method(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else str(method)


def _prepare(
    source: SessionSource,
    details: Any,
    request: Any,
    default_mode: str | None,
    credentials: dict[str, str] | None,
) -> tuple[Any, _Prepared | None]:
    """The call details without our metadata, and the plan if the cache handles this call."""
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
    if session is None:
        return details, None
    started = time.perf_counter()
    from google.protobuf.json_format import MessageToDict

    model = request.model
    if not model or not request.messages:
        plan = Plan(outcome=BYPASS, wire_format=WIRE_FORMAT, model=model, stream=stream)
        return details, _Prepared(session, plan, started)
    messages = [MessageToDict(message, preserving_proto_field_name=True) for message in request.messages]
    if not credentials:
        credentials = {name.lower(): value for name, value in metadata if name.lower() == "authorization"}
    plan = plan_prompt(session.settings, WIRE_FORMAT, model, messages, stream, header, credentials)
    if request.previous_response_id:
        # Server-side conversation state: the messages alone do not say which answer is wanted.
        plan = Plan(outcome=BYPASS, wire_format=WIRE_FORMAT, model=model, key=plan.key, stream=stream)
    return details, _Prepared(session, plan, started)


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
    """The provider's stream passed to the caller as it arrives, stored once it ended with status OK."""

    def __init__(self, call: Any, prepared: _Prepared, record: Any, lock: Release | None = None) -> None:
        self._call, self._prepared, self._record = call, prepared, record
        self._chunks: list[bytes] | None = [] if prepared.plan.write_ttl > 0 else None
        self._over = False
        # The single-flight lock, released once the entry is written or the stream failed. A
        # stream the caller leaves half-read keeps it until it expires (single_flight_wait + 1 s).
        self._lock = lock

    def __getattr__(self, name: str) -> Any:  # the grpc.Call / grpc.Future methods of the real call
        return getattr(self._call, name)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._call)
        except StopIteration:
            self._finish()
            raise
        except BaseException:
            self._chunks, self._over = None, True  # failed or cancelled: never stored
            self._release()
            raise
        if self._chunks is not None:
            self._chunks.append(message.SerializeToString())
        return message

    def _finish(self) -> None:
        if self._over:
            return
        self._over = True
        prepared, chunks = self._prepared, self._chunks or []
        prepared.session.ledger.amend(self._record, **usage_fields(prepared.plan, _usage(chunks, True)))
        try:
            if self._chunks is not None:
                value = prepared.entry(self._chunks)
                if value is not None:
                    prepared.session.write(prepared.plan.storage_key, value, prepared.plan.write_ttl)
        finally:
            self._release()

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            self._prepared.session.release(*lock)


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

    def _lookup(self, prepared: _Prepared) -> tuple[Any, Release | None]:
        """A _Done/_Failed answer from the cache, or (None, the single-flight lock if taken) to call the provider."""
        verdict = run_store_steps(prepared.session, prepared.lookup())
        if isinstance(verdict, Refusal):
            return _Failed(*verdict, prepared.tags(ERROR)), None
        if verdict is None or isinstance(verdict, Release):
            return None, verdict
        if prepared.plan.stream:
            return _Replay(verdict.chunks, prepared.age_tag(verdict)), None
        return _Done(response_class(False).FromString(verdict.chunks[0]), prepared.age_tag(verdict)), None

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details, prepared = _prepare(self._session, client_call_details, request, self._default_mode, self._credentials)
        if prepared is None:
            return continuation(details, request)
        answer, lock = self._lookup(prepared)
        if answer is not None:
            return answer
        try:
            return self._call_provider(continuation, details, request, prepared)
        finally:
            if lock is not None:  # after the entry is written: the waiters find it
                prepared.session.release(*lock)

    def _call_provider(self, continuation: Any, details: Any, request: Any, prepared: _Prepared) -> Any:
        outcome = continuation(details, request)
        plan = prepared.plan
        try:
            response = outcome.result()
        except grpc.RpcError as error:
            prepared.record(plan.outcome, _http_status(error.code() if isinstance(error, grpc.Call) else None))
            return outcome
        except Exception:  # noqa: BLE001 - the SDK sees the failure as it would without the cache
            prepared.record(plan.outcome, 500)
            return outcome
        chunks = [response.SerializeToString()]
        if plan.write_ttl > 0:
            value = prepared.entry(chunks)
            if value is not None:
                prepared.session.write(plan.storage_key, value, plan.write_ttl)
        prepared.record(plan.outcome, 200, usage=_usage(chunks, False))
        return outcome

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details, prepared = _prepare(self._session, client_call_details, request, self._default_mode, self._credentials)
        if prepared is None:
            return continuation(details, request)
        answer, lock = self._lookup(prepared)
        if answer is not None:
            return answer
        try:
            call = continuation(details, request)
        except BaseException:
            if lock is not None:
                prepared.session.release(*lock)
            raise
        record = prepared.record(prepared.plan.outcome, 200)
        return _Tee(call, prepared, record, lock)


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


def _aio_error(code: grpc.StatusCode, message: str, tags: list[tuple[str, str]]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(*tags), grpc.aio.Metadata(), details=message)


class _AsyncBase:
    def __init__(
        self,
        session: SessionSource = None,
        *,
        default_mode: str | None = None,
        credentials: dict[str, str] | None = None,
    ) -> None:
        self._session, self._default_mode, self._credentials = session, default_mode, credentials

    async def _lookup(self, prepared: _Prepared) -> Entry | Release | None:
        """The stored entry to answer with, or None / the single-flight lock taken to call the
        provider; raises the cache's own errors."""
        verdict = await arun_store_steps(prepared.session, prepared.lookup())
        if isinstance(verdict, Refusal):
            raise _aio_error(*verdict, prepared.tags(ERROR))
        return verdict


class AsyncUnaryUnaryCacheInterceptor(_AsyncBase, grpc.aio.UnaryUnaryClientInterceptor):
    """``GetCompletion`` from the cache on a ``grpc.aio`` channel."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details, prepared = _prepare(self._session, client_call_details, request, self._default_mode, self._credentials)
        if prepared is None:
            return await continuation(details, request)
        found = await self._lookup(prepared)
        if isinstance(found, Entry):
            return response_class(False).FromString(found.chunks[0])
        try:
            return await self._call_provider(continuation, details, request, prepared)
        finally:
            if found is not None:  # the single-flight lock: released after the entry is written
                await prepared.session.arelease(*found)

    async def _call_provider(self, continuation: Any, details: Any, request: Any, prepared: _Prepared) -> Any:
        plan = prepared.plan
        call = await continuation(details, request)
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            prepared.record(plan.outcome, _http_status(error.code()))
            raise
        except BaseException:
            prepared.record(plan.outcome, 500)
            raise
        chunks = [response.SerializeToString()]
        if plan.write_ttl > 0:
            value = prepared.entry(chunks)
            if value is not None:
                await prepared.session.awrite(plan.storage_key, value, plan.write_ttl)
        prepared.record(plan.outcome, 200, usage=_usage(chunks, False))
        return call


class AsyncUnaryStreamCacheInterceptor(_AsyncBase, grpc.aio.UnaryStreamClientInterceptor):
    """``GetCompletionChunk`` from the cache on a ``grpc.aio`` channel."""

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details, prepared = _prepare(self._session, client_call_details, request, self._default_mode, self._credentials)
        if prepared is None:
            return await continuation(details, request)
        found = await self._lookup(prepared)
        if isinstance(found, Entry):
            return _AioReplay(found.chunks, prepared.age_tag(found))
        try:
            call = await continuation(details, request)
        except BaseException:
            if found is not None:
                await prepared.session.arelease(*found)
            raise
        record = prepared.record(prepared.plan.outcome, 200)
        return _atee(call, prepared, record, found)


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


async def _atee(call: Any, prepared: _Prepared, record: Any, lock: Release | None) -> AsyncIterator[Any]:
    plan = prepared.plan
    chunks: list[bytes] = []
    try:
        async for message in call:  # an error or the caller leaving raises here: nothing is stored
            chunks.append(message.SerializeToString())
            yield message
        prepared.session.ledger.amend(record, **usage_fields(plan, _usage(chunks, True)))
        if plan.write_ttl > 0:
            value = prepared.entry(chunks)
            if value is not None:
                await prepared.session.awrite(plan.storage_key, value, plan.write_ttl)
    finally:
        if lock is not None:
            await prepared.session.arelease(*lock)


def aio_interceptors(
    *,
    session: SessionSource = None,
    default_mode: str | None = None,
    credentials: dict[str, str] | None = None,
) -> list[Any]:
    """The interceptors to pass to ``grpc.aio.insecure_channel(..., interceptors=...)`` / ``secure_channel``."""
    options = {"default_mode": default_mode, "credentials": credentials}
    return [
        AsyncUnaryUnaryCacheInterceptor(session, **options),
        AsyncUnaryStreamCacheInterceptor(session, **options),
    ]


def add_aio_interceptors(channel: grpc.aio.Channel, interceptors: list[Any]) -> bool:
    """Add interceptors to an existing ``grpc.aio`` channel (innermost); False if this grpc cannot.

    grpc.aio has no ``intercept_channel``; its channel keeps its interceptors in per-kind lists,
    read when a stub method is made, so this must run before the stubs are created.
    """
    lists = {
        grpc.aio.UnaryUnaryClientInterceptor: getattr(channel, "_unary_unary_interceptors", None),
        grpc.aio.UnaryStreamClientInterceptor: getattr(channel, "_unary_stream_interceptors", None),
    }
    if not all(isinstance(found, list) for found in lists.values()):
        return False
    for interceptor in interceptors:
        for kind, found in lists.items():
            if isinstance(interceptor, kind):
                found.append(interceptor)
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
