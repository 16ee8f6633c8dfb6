"""The cache's decisions, free of I/O: what to do with a request, what to answer, what to store.

The transports feed this module plain values (method, path, headers, body
bytes, upstream status and chunks) and carry out what it decides. Nothing here
imports httpx, httpx2 or a store client, so the sync and async shells share
every decision and cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MetrionCacheError
from ..formats import StreamWatcher, Usage, WireFormat
from .directives import (
    DEFAULT_TTL_SECONDS,
    KEY_HEADER,
    MODE_HEADER,
    TTL_HEADER,
    DirectiveError,
    check_namespace,
    check_session_mode,
    check_ttl,
    parse_header_mode,
    parse_max_age,
)
from .entry import CorruptEntry, Entry, RecentEntries
from .key import cache_key
from .scope import check_scope, credential_tag

HIT, MISS, REFRESH, BYPASS, ERROR = "HIT", "MISS", "REFRESH", "BYPASS", "ERROR"
DEFAULT_NAMESPACE = "metrion"
DEFAULT_MAX_ENTRY_BYTES = 16 * 1024 * 1024

# Never replayed: they describe one connection or one client, not the answer.
_UNREPLAYED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "set-cookie",
        "age",
        MODE_HEADER,
        KEY_HEADER,
    }
)


# Describe the upstream framing, which no longer holds once the cache has read the body.
_REFRAMED_HEADERS = frozenset({"content-length", "content-encoding", "transfer-encoding"})


@dataclass(frozen=True)
class Settings:
    """A session's defaults, checked once when the session is made."""

    mode: str = "true"
    ttl: int = DEFAULT_TTL_SECONDS
    namespace: str = DEFAULT_NAMESPACE
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    scope: str = "shared"  # or "credential": entries private to the API key that paid for them

    @classmethod
    def build(
        cls,
        mode: str = "true",
        ttl: int | str | None = None,
        namespace: str | None = None,
        max_entry_bytes: int | None = None,
        scope: str | None = None,
    ) -> Settings:
        if max_entry_bytes is not None and (
            isinstance(max_entry_bytes, bool) or not isinstance(max_entry_bytes, int) or max_entry_bytes <= 0
        ):
            raise MetrionCacheError(f"invalid max_entry_bytes {max_entry_bytes!r}; use a positive number of bytes")
        return cls(
            mode=check_session_mode(mode),
            ttl=DEFAULT_TTL_SECONDS if ttl is None else check_ttl(ttl),
            namespace=DEFAULT_NAMESPACE if namespace is None else check_namespace(namespace),
            max_entry_bytes=DEFAULT_MAX_ENTRY_BYTES if max_entry_bytes is None else max_entry_bytes,
            scope="shared" if scope is None else check_scope(scope),
        )


@dataclass(frozen=True)
class Reply:
    """An answer the cache gives itself, without the provider."""

    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes]
    stream: bool


@dataclass(frozen=True)
class Plan:
    """What the engine decided for one request before any I/O."""

    outcome: str  # what the response will be tagged with if the provider is called
    wire_format: WireFormat | None = None
    model: str = ""
    key: str = ""
    storage_key: str = ""
    stream: bool = False
    read: bool = False  # look in the store before calling the provider
    read_only: bool = False  # replay: a miss is answered by the cache, not the provider
    write_ttl: int = 0  # 0: do not store
    strip: tuple[str, ...] = (MODE_HEADER,)  # request headers the provider must not see
    error: Reply | None = None
    shape: dict[str, Any] | None = None  # request options that shape a converted answer (Prompt.shape)


def storage_key(namespace: str, wire_format: str, variant: str, key: str) -> str:
    return f"{namespace}:{wire_format}:{variant}:{key}"


def plan_request(
    settings: Settings,
    wire_format: WireFormat | None,
    path: str,
    headers: Mapping[str, str],
    body: bytes | None,
    query: bytes | str = b"",
) -> Plan:
    """Decide serve / store / pass for one request.

    ``wire_format`` comes from :func:`wire_format_for`; callers read the body only
    when it matched, so uploads and other traffic stay streamed and untouched.
    """
    if wire_format is None:
        return Plan(outcome=BYPASS)
    mode_value, max_age_value = headers.get(MODE_HEADER), headers.get(TTL_HEADER)
    if settings.scope == "credential" or type(body) is not bytes or len(body) > _RECENT_PLAN_MAX_BODY:
        return _plan(settings, wire_format, path, headers, body, query, mode_value, max_age_value)
    # The same request again (the case a cache exists for) gets the same plan: a plan depends
    # on nothing else, and reusing it skips parsing the body and hashing the prompt again.
    memo_key = (settings, wire_format.name, path, query, mode_value, max_age_value, body)
    plan = _recent_plans.get(memo_key)
    if plan is None:
        plan = _plan(settings, wire_format, path, headers, body, query, mode_value, max_age_value)
        with _recent_plans_lock:
            if len(_recent_plans) >= _RECENT_PLANS:
                del _recent_plans[next(iter(_recent_plans))]  # first in, first out
            _recent_plans[memo_key] = plan
    return plan


_RECENT_PLANS = 256
_RECENT_PLAN_MAX_BODY = 16 * 1024  # with _RECENT_PLANS: at most 4 MiB of remembered bodies
_recent_plans: dict[tuple[Any, ...], Plan] = {}
_recent_plans_lock = threading.Lock()


def _plan(
    settings: Settings,
    wire_format: WireFormat,
    path: str,
    headers: Mapping[str, str],
    body: bytes | None,
    query: bytes | str,
    mode_value: str | None,
    max_age_value: str | None,
) -> Plan:
    try:
        prompt = wire_format.prompt(path, json.loads(body or b""))
    except (ValueError, RecursionError):
        prompt = None
    strip = (MODE_HEADER, TTL_HEADER)
    if prompt is None:
        return Plan(outcome=BYPASS, wire_format=wire_format, strip=strip)

    base = _located(
        settings,
        wire_format,
        prompt.model,
        prompt.messages,
        prompt.stream,
        headers,
        query,
        strip=strip,
        shape=prompt.shape,
    )
    try:
        header_mode = parse_header_mode(mode_value)
        max_age = parse_max_age(max_age_value)
    except DirectiveError as error:
        return _with(base, outcome=ERROR, error=error_reply(base, 400, str(error)))

    return _decide(settings, base, header_mode, settings.ttl if max_age is None else max_age)


def _located(
    settings: Settings,
    wire_format: WireFormat,
    model: str,
    messages: list[Any],
    stream: bool,
    credentials: Mapping[str, str],
    query: bytes | str = b"",
    **plan: Any,
) -> Plan:
    """A request's key and storage key, before any decision (a BYPASS plan until :func:`_decide`)."""
    key = cache_key(model, messages)
    where = storage_key(settings.namespace, wire_format.name, "stream" if stream else "json", key)
    if settings.scope == "credential":
        where += f":cred-{credential_tag(credentials, query)}"  # a keyed hash, never the credential
    return Plan(outcome=BYPASS, wire_format=wire_format, model=model, key=key, storage_key=where, stream=stream, **plan)


def _decide(settings: Settings, base: Plan, header_mode: str | None, ttl: int) -> Plan:
    """Read, store or pass, from the session mode and the request's own ``x-metrion-cache`` (already checked)."""
    if settings.mode == "replay" and header_mode != "false":
        # Replay locks the cache: a header cannot make a keyless CI run call the provider.
        return _with(base, outcome=MISS, read=True, read_only=True)
    mode = header_mode or settings.mode
    if mode == "true":
        return _with(base, outcome=MISS, read=True, write_ttl=ttl)
    if mode == "refresh":
        return _with(base, outcome=REFRESH, write_ttl=ttl)
    return base  # "false" from the header, or an "off" session without a header


def plan_prompt(
    settings: Settings,
    wire_format: WireFormat,
    model: str,
    messages: list[Any],
    stream: bool,
    header_mode: str | None = None,
    credentials: Mapping[str, str] | None = None,
) -> Plan:
    """:func:`plan_request` for a transport that is not HTTP (gRPC): the prompt is already extracted.

    ``header_mode`` is the raw ``x-metrion-cache`` value the call carries, if any; an invalid one
    gives a plan with ``outcome=ERROR`` and ``error`` set (its status and message; the transport
    answers it in its own error shape). ``credentials`` are the call's credential headers, for
    ``scope="credential"``.
    """
    base = _located(settings, wire_format, model, messages, stream, credentials or {})
    try:
        mode = parse_header_mode(header_mode)
    except DirectiveError as error:
        return _with(base, outcome=ERROR, error=Reply(400, [], [str(error).encode()], stream=False))
    return _decide(settings, base, mode, settings.ttl)


def _with(plan: Plan, **changes: Any) -> Plan:
    # On every request: filling a copy's dict skips the frozen __init__'s per-field setattr.
    unknown = changes.keys() - _PLAN_FIELDS
    if unknown:
        raise TypeError(f"Plan has no field {sorted(unknown)}")
    changed = object.__new__(Plan)
    changed.__dict__.update(plan.__dict__, **changes)
    return changed


_PLAN_FIELDS = frozenset(field.name for field in dataclasses.fields(Plan))


def error_reply(plan: Plan, status: int, message: str) -> Reply:
    """An error in the provider's own shape that SDKs show as-is and do not retry."""
    assert plan.wire_format is not None
    body = json.dumps(plan.wire_format.error_body(status, message)).encode()
    headers = [("content-type", "application/json"), ("x-should-retry", "false"), (MODE_HEADER, ERROR)]
    if plan.key:
        headers.append((KEY_HEADER, plan.key))
    return Reply(status, headers, [body], stream=False)


def replay_miss_reply(plan: Plan) -> Reply:
    return error_reply(
        plan,
        504,
        f"metrion cache: no cached answer for model {plan.model!r} (key {plan.key}) and the cache is in "
        "replay mode, so the provider was not called; run once with mode 'true' (or 'refresh') and a "
        "provider key to record it",
    )


def store_down_reply(plan: Plan, error: BaseException) -> Reply:
    return error_reply(
        plan,
        504,
        f"metrion cache: the cache store could not be read ({type(error).__name__}: {error}) and the "
        f"cache is in replay mode, so the provider was not called for model {plan.model!r} "
        f"(key {plan.key}); check the store URL and that the store is running",
    )


_RECENT_ENTRIES = RecentEntries()


def decode_hit(value: bytes | None) -> Entry | None:
    """A stored value as an entry, or None when absent or damaged (a damaged one is a miss)."""
    if value is None:
        return None
    try:
        return _RECENT_ENTRIES.decode(value)
    except (CorruptEntry, KeyError, TypeError, ValueError, IndexError):
        return None


def hit_reply(plan: Plan, entry: Entry, now: float | None = None) -> Reply:
    age = max(0, int((time.time() if now is None else now) - entry.stored_at))
    headers = [*entry.headers, (MODE_HEADER, HIT), (KEY_HEADER, plan.key), ("age", str(age))]
    return Reply(entry.status, headers, entry.chunks, stream=entry.stream)


def other_variant_key(plan: Plan, namespace: str) -> str:
    """Where the same answer in the other mode (streamed / not) would be stored."""
    assert plan.wire_format is not None
    own, other = ("stream", "json") if plan.stream else ("json", "stream")
    prefix = storage_key(namespace, plan.wire_format.name, own, plan.key)
    # Whatever follows the key (a credential scope) is kept as it is.
    return storage_key(namespace, plan.wire_format.name, other, plan.key) + plan.storage_key[len(prefix) :]


def converted_reply(plan: Plan, entry: Entry, now: float | None = None) -> Reply | None:
    """A stored answer of the other mode, converted to the mode the request asked for; None if it cannot be."""
    wire_format = plan.wire_format
    assert wire_format is not None
    if entry.key != plan.key or entry.stream == plan.stream or not 200 <= entry.status < 300:
        return None
    try:
        if plan.stream:
            chunks = wire_format.stream_from_body(b"".join(entry.chunks), plan.shape)
            content_type = "text/event-stream; charset=utf-8"
        else:
            body = wire_format.body_from_stream(entry.chunks)
            chunks = None if body is None else [body]
            content_type = "application/json"
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
        return None  # an answer the format cannot convert: a miss, never a broken answer
    if not chunks:
        return None
    age = max(0, int((time.time() if now is None else now) - entry.stored_at))
    headers = [(name, value) for name, value in entry.headers if name.lower() not in ("content-type", "cache-control")]
    headers += [("content-type", content_type), (MODE_HEADER, HIT), (KEY_HEADER, plan.key), ("age", str(age))]
    return Reply(entry.status, headers, chunks, stream=plan.stream)


def replayable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in _UNREPLAYED_HEADERS]


def decoded_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream headers for a body the cache has already decoded and re-framed."""
    return [(name, value) for name, value in headers if name.lower() not in _REFRAMED_HEADERS]


def tag_headers(plan: Plan, outcome: str | None = None) -> list[tuple[str, str]]:
    """The headers that tell the caller what the cache did."""
    tags = [(MODE_HEADER, outcome or plan.outcome)]
    if plan.key:
        tags.append((KEY_HEADER, plan.key))
    return tags


def wants_recording(plan: Plan, status: int) -> bool:
    """Whether the provider's answer should be read through the cache (and maybe stored)."""
    return plan.write_ttl > 0 and 200 <= status < 300


def is_json_object(body: bytes) -> bool:
    """Whether a provider's non-streamed answer is a whole JSON object, the only kind worth storing."""
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def is_event_stream(headers: list[tuple[str, str]]) -> bool:
    return any(
        name.lower() == "content-type" and value.split(";")[0].strip().lower() == "text/event-stream"
        for name, value in headers
    )


class Recorder:
    """Collects one answer as it passes to the caller and says whether, and what, to store.

    For streams it watches the events: only a stream that reached its format's
    terminator (or, for formats without one, the end of a clean body) with no
    error event is stored. Anything over the size cap is never stored.
    """

    __slots__ = (
        "plan",
        "status",
        "headers",
        "max_bytes",
        "started",
        "chunks",
        "size",
        "watcher",
        "broken",
        "done",
        "usage",
        "on_usage",
    )

    def __init__(self, plan: Plan, status: int, headers: list[tuple[str, str]], max_bytes: int, started: float) -> None:
        assert plan.wire_format is not None
        self.plan = plan
        self.status = status
        self.headers = replayable_headers(headers)
        self.max_bytes = max_bytes
        self.started = started
        self.chunks: list[bytes] = []
        self.size = 0
        self.watcher = StreamWatcher(plan.wire_format)
        self.broken = False
        self.done = False
        self.usage: Usage | None = None  # what the answer reports, read once when it is stored
        self.on_usage: Callable[[Usage | None], None] | None = None  # told when a stream's usage is known

    def feed(self, chunk: bytes) -> None:
        if self.broken or not chunk:
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.broken, self.chunks = True, []
            return
        self.chunks.append(chunk)
        self.watcher.feed(chunk)

    def abandon(self) -> None:
        """The stream failed or the caller left before its end: store nothing."""
        self.broken, self.chunks = True, []

    def finish_stream(self, reached_eof: bool, now_monotonic: float) -> bytes | None:
        """The encoded entry to store once the stream is over, or None. Returns a value at most once."""
        if self.done:
            return None
        self.done = True
        assert self.plan.wire_format is not None
        complete = self.watcher.ended or (reached_eof and not self.plan.wire_format.has_stream_terminator)
        if self.broken or self.watcher.failed or not complete:
            return None
        value = self._entry(self.chunks, stream=True, now_monotonic=now_monotonic)
        if self.on_usage is not None:
            self.on_usage(self.usage)
        return value

    def finish_body(self, body: bytes, now_monotonic: float) -> bytes | None:
        if len(body) > self.max_bytes or not is_json_object(body):
            return None  # too big, or not a whole JSON answer (truncated, HTML from a gateway...)
        return self._entry([body], stream=False, now_monotonic=now_monotonic)

    def _entry(self, chunks: list[bytes], *, stream: bool, now_monotonic: float) -> bytes:
        assert self.plan.wire_format is not None
        self.usage = read_usage(self.plan.wire_format, chunks, stream)
        return Entry(
            status=self.status,
            headers=self.headers,
            chunks=chunks,
            stream=stream,
            stored_at=time.time(),
            ttl=self.plan.write_ttl,
            model=self.plan.model,
            wire_format=self.plan.wire_format.name,
            key=self.plan.key,
            provider_seconds=round(now_monotonic - self.started, 6),
            # Kept with the entry so a hit knows what it saved without parsing the answer.
            extra={"usage": self.usage.as_dict()} if self.usage is not None else {},
        ).encode()


def read_usage(wire_format: WireFormat, chunks: list[bytes], stream: bool) -> Usage | None:
    """The usage an answer reports; None, never an exception, when it cannot be read."""
    try:
        return wire_format.usage(chunks, stream)
    except Exception:  # noqa: BLE001 - an odd answer must still be stored and served
        return None
