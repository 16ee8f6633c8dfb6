"""The cache's decisions, free of I/O: what to do with a request, what to answer, what to store.

:mod:`.flow` feeds this module plain values (method, path, headers, body bytes,
upstream status and chunks) and the drivers carry out what it decides. Nothing
here imports an HTTP library, a store client or the runtime, so every adapter
shares every decision and none can drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..formats import Prompt, Usage, WireFormat
from ..formats.base import whole_events
from .directives import (
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_NAMESPACE,
    DEFAULT_SINGLE_FLIGHT_WAIT,
    DEFAULT_TTL_SECONDS,
    KEY_HEADER,
    MODE_HEADER,
    TTL_HEADER,
    DirectiveError,
    parse_header_mode,
    parse_max_age,
)
from .entry import CorruptEntry, Entry, RecentEntries
from .key import cache_key
from .options import CacheOptions
from .records import BYPASS, ERROR, HIT, MISS, REFRESH, Status
from .scope import credential_tag

# Re-exported: the statuses and defaults used to live here.
__all__ = [
    "BYPASS",
    "DEFAULT_MAX_ENTRY_BYTES",
    "DEFAULT_NAMESPACE",
    "ERROR",
    "HIT",
    "MISS",
    "REFRESH",
    "REPLAY_REFUSAL_STATUS",
]


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


# Describe the upstream framing, which no longer holds once the cache has read the body; and an
# upstream cache's own tags (a chain of caches), which ours replace.
_REFRAMED_HEADERS = frozenset({"content-length", "content-encoding", "transfer-encoding", MODE_HEADER, KEY_HEADER})


@dataclass(frozen=True)
class Settings:
    """What the core decides by: the part of a session's options a request's plan depends on."""

    mode: str = "true"
    ttl: int = DEFAULT_TTL_SECONDS
    namespace: str = DEFAULT_NAMESPACE
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    scope: str = "shared"  # or "credential": entries private to the API key that paid for them
    # How long a miss waits for an identical request already asking the provider (0: never waits).
    single_flight_wait: float = DEFAULT_SINGLE_FLIGHT_WAIT
    store_previews: bool = False  # keep the start of the last user message in call records

    @classmethod
    def from_options(cls, options: CacheOptions) -> Settings:
        return cls(
            mode=options.mode,
            ttl=options.ttl,
            namespace=options.namespace,
            max_entry_bytes=options.max_entry_bytes,
            scope=options.scope,
            single_flight_wait=options.single_flight_wait,
            store_previews=options.store_previews,
        )

    @classmethod
    def build(cls, **options: Any) -> Settings:
        """Settings from option values, checked by :class:`~.options.CacheOptions` (defaults for the rest)."""
        return cls.from_options(CacheOptions(**options))


ReplyKind = Literal["hit", "invalid", "replay_miss", "store_down"]


@dataclass(frozen=True)
class Reply:
    """An answer the cache gives itself, without the provider."""

    status: int
    headers: list[tuple[str, str]]
    # A hit's are the entry's own (a long stream's are cut out as they are replayed): read, never changed.
    chunks: Sequence[bytes]
    stream: bool
    kind: ReplyKind = "hit"
    message: str = ""  # for an error: what went wrong, for adapters that answer in another shape (gRPC)


@dataclass(frozen=True)
class Plan:
    """What the engine decided for one request before any I/O."""

    outcome: Status  # what the response will be tagged with if the provider is called
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
    preview: str = ""  # the start of the last user message, with Settings.store_previews only


def storage_key(namespace: str, wire_format: str, variant: str, key: str) -> str:
    return f"{namespace}:{wire_format}:{variant}:{key}"


def plan_request(
    settings: Settings,
    wire_format: WireFormat | None,
    path: str,
    headers: Mapping[str, str],
    body: bytes | None,
    query: bytes | str = b"",
    memo: PlanMemo | None = None,
) -> Plan:
    """Decide serve / store / pass for one request.

    ``wire_format`` comes from :func:`wire_format_for`; callers read the body only
    when it matched, so uploads and other traffic stay streamed and untouched.
    """
    if wire_format is None:
        return Plan(outcome=BYPASS)
    mode_value, max_age_value = headers.get(MODE_HEADER), headers.get(TTL_HEADER)
    if memo is None or settings.scope == "credential" or type(body) is not bytes or len(body) > memo.max_body:
        return _plan(settings, wire_format, path, headers, body, query, mode_value, max_age_value)
    # The same request again (the case a cache exists for) gets the same plan: a plan depends
    # on nothing else, and reusing it skips parsing the body and hashing the prompt again.
    memo_key = (settings, wire_format.name, path, query, mode_value, max_age_value, body)
    plan = memo.get(memo_key)
    if plan is None:
        plan = _plan(settings, wire_format, path, headers, body, query, mode_value, max_age_value)
        memo.put(memo_key, plan)
    return plan


class PlanMemo:
    """The plans of recent requests, by everything a plan depends on (bounded, first in first out)."""

    def __init__(self, max_plans: int = 256, max_body: int = 16 * 1024) -> None:
        # With the defaults: at most 4 MiB of remembered bodies.
        self.max_plans, self.max_body = max_plans, max_body
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> Plan | None:
        return self._plans.get(key)

    def put(self, key: tuple[Any, ...], plan: Plan) -> None:
        with self._lock:
            if len(self._plans) >= self.max_plans:
                del self._plans[next(iter(self._plans))]
            self._plans[key] = plan


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
        bypass = Plan(outcome=BYPASS, wire_format=wire_format, strip=strip)
        if settings.mode != "replay":
            return bypass
        # Replay: nothing sent to an LLM endpoint reaches the network unless the request says so itself.
        try:
            header_mode = parse_header_mode(mode_value)
        except DirectiveError as error:
            return _with(bypass, outcome=ERROR, error=error_reply(bypass, 400, str(error), "invalid"))
        if header_mode == "false":
            return bypass
        return _with(bypass, outcome=ERROR, error=unkeyable_reply(bypass, _unkeyable_reason(wire_format, path, body)))

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
        # Once per plan (plans are memoized): the same request again costs nothing more.
        preview=wire_format.preview(prompt) if settings.store_previews else "",
    )
    try:
        header_mode = parse_header_mode(mode_value)
        max_age = parse_max_age(max_age_value)
    except DirectiveError as error:
        return _with(base, outcome=ERROR, error=error_reply(base, 400, str(error), "invalid"))

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
    gives a plan with ``outcome=ERROR`` and ``error`` set. ``credentials`` are the call's
    credential headers, for ``scope="credential"``.
    """
    preview = wire_format.preview(Prompt(model, messages, stream)) if settings.store_previews else ""
    base = _located(settings, wire_format, model, messages, stream, credentials or {}, preview=preview)
    try:
        mode = parse_header_mode(header_mode)
    except DirectiveError as error:
        return _with(base, outcome=ERROR, error=error_reply(base, 400, str(error), "invalid"))
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


def error_reply(plan: Plan, status: int, message: str, kind: ReplyKind) -> Reply:
    """An error in the provider's own shape that SDKs show as-is and do not retry."""
    assert plan.wire_format is not None
    body = json.dumps(plan.wire_format.error_body(status, message)).encode()
    headers = [("content-type", "application/json"), ("x-should-retry", "false"), (MODE_HEADER, ERROR)]
    if plan.key:
        headers.append((KEY_HEADER, plan.key))
    return Reply(status, headers, [body], stream=False, kind=kind, message=message)


# The status of every answer replay mode gives instead of calling the provider (a miss, an unreadable
# store). Not a 5xx, 408 or 429: client libraries report those as timeouts or outages and retry them
# (litellm maps 504 and 408 to Timeout, dspy to LMTimeoutError, llama-index and dspy retry every 5xx),
# while every one of them reports a 400 as the caller's bad request and never retries it (see the
# README, "What the cache promises"). 404 would say "model not found" in litellm, dspy, langchain
# and pydantic-ai; 409 is retried by the OpenAI and Anthropic SDKs unless x-should-retry says no.
REPLAY_REFUSAL_STATUS = 400


def replay_miss_reply(plan: Plan) -> Reply:
    return error_reply(
        plan,
        REPLAY_REFUSAL_STATUS,
        f"metrion cache: no cached answer for model {plan.model!r} (key {plan.key}) and the cache is in "
        "replay mode, so the provider was not called; run once with mode 'true' (or 'refresh') and a "
        "provider key to record it",
        "replay_miss",
    )


def unkeyable_reply(plan: Plan, reason: str) -> Reply:
    return error_reply(
        plan,
        REPLAY_REFUSAL_STATUS,
        f"metrion cache: this request cannot be keyed ({reason}), so it cannot be answered from the cache, "
        "and the cache is in replay mode, so the provider was not called; send it with the header "
        f"'{MODE_HEADER}: false' to let it reach the provider",
        "replay_miss",
    )


def _unkeyable_reason(wire_format: WireFormat, path: str, body: bytes | None) -> str:
    try:
        parsed = json.loads(body or b"")
    except RecursionError:
        return "its body nests deeper than the JSON parser reads"
    except ValueError:
        return "its body is not JSON"
    return wire_format.unkeyable_reason(path, parsed) or "it holds nothing the cache can key"


def store_down_reply(plan: Plan, error: BaseException) -> Reply:
    return error_reply(
        plan,
        REPLAY_REFUSAL_STATUS,
        f"metrion cache: the cache store could not be read ({type(error).__name__}: {error}) and the "
        f"cache is in replay mode, so the provider was not called for model {plan.model!r} "
        f"(key {plan.key}); check the store URL and that the store is running",
        "store_down",
    )


def decode_hit(value: bytes | None, entries: RecentEntries | None = None) -> Entry | None:
    """A stored value as an entry, or None when absent or damaged (a damaged one is a miss).

    ``entries`` remembers recently decoded values, so the same answer read again is not decoded again.
    """
    if value is None:
        return None
    try:
        return entries.decode(value) if entries is not None else Entry.decode(value)
    except (CorruptEntry, KeyError, TypeError, ValueError, IndexError):
        return None


def hit_reply(plan: Plan, entry: Entry, now: float) -> Reply:
    age = max(0, int(now - entry.stored_at))
    headers = [*entry.headers, (MODE_HEADER, HIT), (KEY_HEADER, plan.key), ("age", str(age))]
    # Not copied: a copy of a 2,000-event stream's chunks would delay its first event by 0.3 ms.
    return Reply(entry.status, headers, entry.chunks, stream=entry.stream)


def other_variant_key(plan: Plan, namespace: str) -> str:
    """Where the same answer in the other mode (streamed / not) would be stored."""
    assert plan.wire_format is not None
    own, other = ("stream", "json") if plan.stream else ("json", "stream")
    prefix = storage_key(namespace, plan.wire_format.name, own, plan.key)
    # Whatever follows the key (a credential scope) is kept as it is.
    return storage_key(namespace, plan.wire_format.name, other, plan.key) + plan.storage_key[len(prefix) :]


def lock_key(plan: Plan, namespace: str, storage_key: str) -> str:
    """The single-flight lock of a request: one per key (and scope), shared by both modes when they convert.

    A streamed and a non-streamed duplicate answer each other, so they take the same lock:
    the one of the non-streamed entry's storage key.
    """
    assert plan.wire_format is not None
    if plan.stream and plan.wire_format.converts_modes:
        storage_key = other_variant_key(plan, namespace)
    return storage_key + ":lock"


def converted_reply(plan: Plan, entry: Entry, now: float, namespace: str) -> Reply | None:
    """A stored answer of the other mode, converted to the mode the request asked for; None if it cannot be."""
    wire_format = plan.wire_format
    assert wire_format is not None
    if entry.key != plan.key or entry.stream == plan.stream or not 200 <= entry.status < 300:
        return None
    if entry.wire_format != wire_format.name or entry.storage_key != other_variant_key(plan, namespace):
        return None  # written for another format, namespace or scope (or by a version that did not say)
    try:
        if plan.stream:
            chunks = wire_format.stream_from_body(b"".join(entry.chunks), plan.shape)
            content_type = "text/event-stream; charset=utf-8"
        else:
            body = wire_format.body_from_stream(list(entry.chunks))
            chunks = None if body is None else [body]
            content_type = "application/json"
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
        return None  # an answer the format cannot convert: a miss, never a broken answer
    if not chunks:
        return None
    age = max(0, int(now - entry.stored_at))
    headers = [(name, value) for name, value in entry.headers if name.lower() not in ("content-type", "cache-control")]
    headers += [("content-type", content_type), (MODE_HEADER, HIT), (KEY_HEADER, plan.key), ("age", str(age))]
    return Reply(entry.status, headers, chunks, stream=plan.stream)


def replayable_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in _UNREPLAYED_HEADERS]


def decoded_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Upstream headers for a body the cache has already decoded and re-framed, without an upstream cache's tags."""
    return [(name, value) for name, value in headers if name.lower() not in _REFRAMED_HEADERS]


def tag_headers(plan: Plan, outcome: Status | None = None) -> list[tuple[str, str]]:
    """The headers that tell the caller what the cache did."""
    tags: list[tuple[str, str]] = [(MODE_HEADER, outcome or plan.outcome)]
    if plan.key:
        tags.append((KEY_HEADER, plan.key))
    return tags


def wants_recording(plan: Plan, status: int) -> bool:
    """Whether the provider's answer should be read through the cache (and maybe stored)."""
    return plan.write_ttl > 0 and 200 <= status < 300


class Recorder:
    """Collects one answer as it passes to the caller and says whether, and what, to store.

    For streams the format's watcher follows the events: only a stream that reached its
    format's terminator (or, for formats without one, the end of a clean body) with no
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
        "reached_eof",
    )

    def __init__(self, plan: Plan, status: int, headers: list[tuple[str, str]], max_bytes: int, started: float) -> None:
        assert plan.wire_format is not None
        self.plan = plan
        self.status = status
        self.headers = replayable_headers(headers)
        self.max_bytes = max_bytes
        self.started = started  # on the core's monotonic clock
        self.chunks: list[bytes] = []
        self.size = 0
        self.watcher = plan.wire_format.stream_watcher(plan.shape)
        self.broken = False
        self.done = False
        self.reached_eof = False

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

    def stream_complete(self, reached_eof: bool) -> bool:
        """Whether the stream, now over, is whole and clean: the only kind worth storing. True at most once."""
        if self.done:
            return False
        self.done = True
        self.reached_eof = reached_eof
        assert self.plan.wire_format is not None
        if reached_eof and not self.broken:
            self.watcher.close()  # a body that ended inside an event is incomplete
        complete = self.watcher.ended or (reached_eof and not self.plan.wire_format.has_stream_terminator)
        return complete and not self.broken and not self.watcher.failed

    def stream_chunks(self) -> list[bytes]:
        """The chunks of a complete stream as they are stored: as received, ending as the provider's streams end.

        A caller may stop reading once the final state arrived (litellm after Anthropic's message_delta):
        an event it left unfinished is dropped and the format's trailer added, so a hit replays a whole stream.
        """
        wire_format = self.plan.wire_format
        assert wire_format is not None
        if self.reached_eof or self.watcher.trailed and not self.watcher.in_event:
            return self.chunks  # as the provider sent them
        chunks = whole_events(self.chunks) if self.watcher.in_event else self.chunks
        if self.watcher.trailed or not wire_format.stream_trailer:
            return chunks
        return [*chunks, wire_format.stream_trailer]

    def body_storable(self, body: bytes) -> bool:
        # Too big, or not a whole answer (truncated, HTML from a gateway...): not stored.
        assert self.plan.wire_format is not None
        return len(body) <= self.max_bytes and self.plan.wire_format.storable_body(body)

    def entry(
        self, chunks: list[bytes], *, stream: bool, usage: Usage | None, now: float, now_monotonic: float
    ) -> bytes:
        """The encoded entry for a complete answer."""
        assert self.plan.wire_format is not None
        return Entry(
            status=self.status,
            headers=self.headers,
            chunks=chunks,
            stream=stream,
            stored_at=now,
            ttl=self.plan.write_ttl,
            model=self.plan.model,
            wire_format=self.plan.wire_format.name,
            key=self.plan.key,
            provider_seconds=round(now_monotonic - self.started, 6),
            # Kept with the entry so a hit knows what it saved without parsing the answer.
            extra={"usage": usage.as_dict()} if usage is not None else {},
            storage_key=self.plan.storage_key,
        ).encode()


def read_usage(wire_format: WireFormat, chunks: list[bytes], stream: bool) -> Usage | None:
    """The usage an answer reports; None, never an exception, when it cannot be read."""
    try:
        return wire_format.usage(chunks, stream)
    except Exception:  # noqa: BLE001 - an odd answer must still be stored and served
        return None
