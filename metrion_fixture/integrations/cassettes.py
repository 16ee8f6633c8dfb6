"""Import recorded cassettes into the cache: ``metrion-cache import-cassettes``.

The layouts read (each learnt from the library that writes it):

- vcrpy's YAML and JSON cassettes (``interactions``, each a ``request`` and a
  ``response``), which pytest-recording writes too, one file per test;
- pydantic-ai's JSON-body serializer: the same, with a JSON body kept parsed under
  ``parsed_body`` instead of ``body`` (and cassetter's, which pydantic-ai records with now:
  ``body: {type: json, content: ...}`` and a bare ``status`` code);
- langchain's ``*.yaml.gz``: gzip-compressed YAML with top-level ``requests`` and
  ``responses`` lists, bodies as YAML binaries.

Each is turned into vcrpy's own cassette shape and read by vcrpy's loader
(:func:`vcr.serialize.deserialize`), so bodies and requests come out as vcrpy
itself would replay them. Each recorded exchange then goes through the same
engine as live traffic (:func:`import_recorded`), so it is keyed, filtered and
stored exactly as the live answer would have been. Interactions that are not
LLM requests, or whose answer was not a success, are skipped and reported.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.flow import Tee
from ..core.options import mask_query_keys
from ..formats import WIRE_FORMATS
from ..formats.sse import Event, SSEDecoder
from ..runtime._sync.driver import drive, end_stream
from ..runtime.session import CacheSession

CASSETTE_SUFFIXES = (".yaml", ".yml", ".json", ".yaml.gz", ".yml.gz", ".json.gz")
EXPECTED_LAYOUTS = (
    "a vcrpy / pytest-recording / pydantic-ai cassette (YAML or JSON with an `interactions` list) "
    "or a langchain one (gzip-compressed YAML with `requests` and `responses` lists)"
)
_FORMAT_TITLES = {
    "anthropic_messages": "Anthropic Messages",
    "openai_chat": "OpenAI Chat Completions",
    "openai_responses": "OpenAI Responses",
    "gemini": "Gemini generateContent",
}
IMPORTED_FORMATS = ", ".join(_FORMAT_TITLES.get(f.name, f.name) for f in WIRE_FORMATS)


@dataclass(frozen=True)
class Skipped:
    cassette: str
    method: str
    uri: str
    reason: str


@dataclass(frozen=True)
class Collision:
    """Two recordings of one storage key whose requests differ beyond model and messages: one answer is kept."""

    storage_key: str
    kept: str  # "cassette: METHOD uri" of the recording stored last, the one kept
    replaced: str


@dataclass
class ImportReport:
    url: str
    namespace: str
    cassettes: list[str] = field(default_factory=list)
    imported: int = 0  # distinct entries written, not recordings read
    skipped: list[Skipped] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (cassette, why, one line)
    collisions: list[Collision] = field(default_factory=list)
    store_failures: int = 0  # interactions that could not be written to the store


class UnreadableCassette(ValueError):
    """A file that is not a cassette of a layout the importer reads; the message is one line."""


def _unreadable(found: str) -> UnreadableCassette:
    return UnreadableCassette(f"{found}; expected {EXPECTED_LAYOUTS}")


def find_cassettes(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The cassette files named, and those under the folders named (see :data:`CASSETTE_SUFFIXES`)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and _is_cassette_name(p)))
        else:
            found.append(path)
    return found


def _is_cassette_name(path: Path) -> bool:
    return path.name.lower().endswith(CASSETTE_SUFFIXES)


def load_interactions(path: Path) -> list[tuple[Any, dict[str, Any]]]:
    """(vcr Request, response dict) pairs of a cassette in any layout read, or :class:`UnreadableCassette`."""
    from vcr.serialize import deserialize

    cassette = _vcr_shape(_parse(path))
    try:
        loaded = deserialize("", _Parsed(cassette))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _unreadable(f"an interaction is not in vcrpy's shape ({_one_line(error)})") from None
    return list(zip(loaded[0], loaded[1], strict=True))


class _Parsed:
    """A vcrpy serializer that hands over a cassette already parsed (vcrpy then builds its requests and bodies)."""

    def __init__(self, cassette: dict[str, Any]) -> None:
        self.cassette = cassette

    def deserialize(self, _: str) -> dict[str, Any]:
        return self.cassette


def _parse(path: Path) -> Any:
    from vcr.serializers import yamlserializer

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableCassette("no such file") from None
    except OSError as error:
        raise UnreadableCassette(_one_line(error)) from None
    if raw[:2] == b"\x1f\x8b":  # langchain's *.yaml.gz (read by content: a renamed file still reads)
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise _unreadable(f"a broken gzip file ({_one_line(error)})") from None
    if not raw.strip():
        raise _unreadable("the file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _unreadable("neither text nor gzip") from None
    as_json = path.name.lower().endswith((".json", ".json.gz"))
    try:
        return json.loads(text) if as_json else yamlserializer.deserialize(text)
    except ValueError as error:  # json.JSONDecodeError
        raise _unreadable(f"not valid JSON ({_one_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - yaml.YAMLError and the tags vcrpy's safe loader refuses
        raise _unreadable(f"not valid YAML ({_one_line(error)})") from None


def _vcr_shape(data: Any) -> dict[str, Any]:
    """vcrpy's cassette dict (``interactions`` of ``request``/``response``) from any layout read."""
    if isinstance(data, list) and data and isinstance(data[0], dict) and "request" in data[0]:
        raise UnreadableCassette("a cassette of vcrpy before 1.0 (a bare list): re-record it or run vcrpy's migration")
    if not isinstance(data, dict):
        raise _unreadable(f"found a YAML/JSON {type(data).__name__}")
    if "interactions" in data:
        interactions = data["interactions"]
        if not isinstance(interactions, list) or not all(isinstance(i, dict) for i in interactions):
            raise _unreadable("`interactions` is not a list of mappings")
    elif "requests" in data and "responses" in data:
        requests, responses = data["requests"], data["responses"]
        if not isinstance(requests, list) or not isinstance(responses, list) or len(requests) != len(responses):
            raise _unreadable("`requests` and `responses` are not lists of one length")
        interactions = [{"request": q, "response": r} for q, r in zip(requests, responses, strict=True)]
    else:
        found = ", ".join(f"`{k}`" for k in list(data)[:5]) or "nothing"
        raise _unreadable(f"a mapping of {found}")
    for interaction in interactions:
        for kind in ("request", "response"):
            part = interaction.get(kind)
            if not isinstance(part, dict):
                continue
            if "parsed_body" in part:
                # pydantic-ai's serializer keeps a JSON body parsed; vcrpy wants it back as text.
                part["body"] = json.dumps(part.pop("parsed_body"))
            body = part.get("body")
            if kind == "response" and isinstance(body, dict) and "string" in body:
                body = body["string"]
            if isinstance(body, dict) and "type" in body and "content" in body:
                # cassetter (pydantic-ai's newer recordings): {type: json, content: <parsed>} or text.
                if body["type"] == "json":
                    body = json.dumps(body["content"])
                elif isinstance(body["content"], str):
                    body = body["content"]
                else:
                    raise _unreadable(f"a {kind} body of type {body['type']!r}, which is not JSON or text")
            if kind == "request":
                part["body"] = body
            else:
                part["body"] = {"string": body}
                if isinstance(part.get("status"), int):  # cassetter writes the bare code
                    part["status"] = {"code": part["status"], "message": ""}
    return {"version": 1, "interactions": interactions}


def _one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def import_cassettes(
    paths: Iterable[str | os.PathLike[str]],
    *,
    url: str | None = None,
    namespace: str | None = None,
    ttl: int | str | None = None,
    session: CacheSession | None = None,
) -> ImportReport:
    """Store every LLM success recorded in the cassettes; existing entries are replaced.

    Without ``session``, one is opened on ``url`` (else ``METRION_CACHE_URL``, else the
    embedded store) in ``refresh`` mode. Bad options raise :class:`MetrionCacheError`.
    Two recordings that land on one entry (same model and messages) with requests that
    differ otherwise (tools, thinking, ``n``...) are reported as a :class:`Collision`.
    """
    if session is None:
        session = CacheSession(url, mode="refresh", ttl=ttl, namespace=namespace)
    report = ImportReport(url=session.url, namespace=session.settings.namespace)
    stored: dict[str, tuple[str, Any]] = {}  # storage key -> (where it was recorded, its request)
    for path in find_cassettes(paths):
        name = str(path)
        try:
            interactions = load_interactions(path)
        except UnreadableCassette as error:
            report.unreadable.append((name, str(error)))
            continue
        report.cassettes.append(name)
        for request, response in interactions:
            uri = mask_query_keys(str(request.uri))  # printed: an unfiltered Gemini ?key= stays out of CI logs
            where = f"{name}: {str(request.method).upper()} {uri}"
            outcome = import_interaction(session, request, response)
            if isinstance(outcome, _Stored):
                earlier = stored.get(outcome.storage_key)
                if earlier is not None and earlier[1] != outcome.request:
                    report.collisions.append(Collision(outcome.storage_key, kept=where, replaced=earlier[0]))
                stored[outcome.storage_key] = (where, outcome.request)
            elif outcome is _STORE_FAILED:
                report.store_failures += 1
            else:
                report.skipped.append(Skipped(name, str(request.method).upper(), uri, outcome))
    report.imported = len(stored)
    return report


_STORE_FAILED = "the cache store could not be written"


@dataclass(frozen=True)
class _Stored:
    storage_key: str
    request: Any  # the request body as parsed JSON: what tells two recordings of one key apart


def import_interaction(session: CacheSession, request: Any, response: dict[str, Any]) -> _Stored | str:
    """Import one recorded exchange: where it was stored, else why it was not."""
    try:
        status, headers, body = _response_parts(response)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return f"the recorded response is not in a shape vcrpy writes ({type(error).__name__}: {error})"
    encoding = next((value for name, value in headers if name.lower() == "content-encoding"), "")
    if encoding and encoding.strip().lower() != "identity":
        return f"the recorded body is compressed with {encoding!r}, which vcrpy could not decode here"

    try:
        request_body = _request_body(request)
    except TypeError as error:
        return f"the recorded request body is not in a shape vcrpy writes ({error})"
    stats = session.stats
    requests_before, store_errors_before = stats.requests, stats.store_errors
    stored = import_recorded(
        session, str(request.method).upper(), request.path, request.headers, request_body, status, headers, body
    )
    if stats.store_errors > store_errors_before:
        return _STORE_FAILED
    if stats.requests == requests_before:
        return f"not an LLM request (the cache keeps {IMPORTED_FORMATS} calls)"
    last = session.ledger.calls[-1]
    if stored:
        variant = "stream" if last.stream else "json"
        key = f"{session.settings.namespace}:{last.wire_format}:{variant}:{last.key}"
        try:
            parsed = json.loads(request_body)
        except ValueError:
            parsed = request_body
        return _Stored(key, parsed)
    if last.status == "BYPASS":
        return "the request body has no model and messages"
    if last.status == "ERROR":
        return "the recorded request carries an invalid x-metrion-cache or Cache-Control header"
    if not 200 <= status < 300:
        return f"the provider answered HTTP {status} (only successes are cached)"
    if last.stream:
        return "the recorded stream is incomplete (no end event, or an error event)"
    return "the answer is not a whole JSON answer, or larger than the entry size limit"


def _request_body(request: Any) -> bytes:
    body = request.body_bytes if hasattr(request, "body_bytes") else request.body  # vcrpy >= 8.2 has body_bytes
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    if hasattr(body, "read"):
        return body.read()
    if not isinstance(body, (bytes, bytearray)):
        return b"".join(body)
    return bytes(body)


def _response_parts(response: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and the decoded body of a recorded response, as vcrpy's own stubs read it."""
    from vcr.filters import decode_response
    from vcr.serializers.compat import convert_body_to_bytes

    if "status_code" in response:
        # The shape older vcrpy releases wrote for httpx recordings.
        response = convert_body_to_bytes(
            {
                "headers": response["headers"],
                "body": {"string": response["content"]},
                "status": {"code": response["status_code"]},
            }
        )
    response = decode_response(response)
    headers = [
        (str(name), str(value))
        for name, values in (response.get("headers") or {}).items()
        for value in (values if isinstance(values, (list, tuple)) else [values])
    ]
    body = response["body"]["string"]
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode("utf-8")
    return int(response["status"]["code"]), headers, bytes(body)


class _Recording:
    """The provider's side of a request, played back from a recording."""

    def __init__(self, body: bytes, status: int, headers: list[tuple[str, str]], response_body: bytes) -> None:
        self.body, self.status, self.headers, self.response_body = body, status, headers, response_body

    def read_request(self) -> bytes:
        return self.body

    def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        return self.status, self.headers

    def read_body(self) -> bytes:
        return self.response_body


def stream_chunks(body: bytes) -> list[bytes]:
    """A recorded event stream as the chunks a provider sends: one per event, in LF framing.

    Recordings keep a stream whole, in whatever framing the provider used (LF, CRLF, a lone
    CR, comments between events): the one SSE decoder finds the events, and each is written
    back alone. An event the body left unfinished is passed on unfinished (no blank line
    after it), so the stream's watcher sees an incomplete stream, as it would live.
    """
    decoder = SSEDecoder()
    events = decoder.feed(body)
    if decoder.error is not None:
        return [body]  # the watcher refuses it the same way
    chunks = [_encode_event(event) for event in events]
    unfinished = decoder.close()
    chunks += [_encode_event(event)[:-1] for event in unfinished]
    return chunks


def _encode_event(event: Event) -> bytes:
    lines = [f"event: {event.event}"] if event.event is not None else []
    lines += [f"data: {line}" for line in event.data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def import_recorded(
    session: CacheSession,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    status: int,
    response_headers: list[tuple[str, str]],
    response_body: bytes,
) -> bool:
    """Store a request/response pair recorded elsewhere (a vcrpy cassette, say); True if stored.

    The same flow and driver as a live request, the recording standing in for the provider,
    so it is keyed, filtered and stored exactly as the live answer would have been. Give it a
    session in ``refresh`` mode to replace existing entries.
    """
    stored_before = session.stats.stored
    flow = session.core.exchange(method, path, {name.lower(): value for name, value in headers.items()})
    outcome = drive(session, flow, _Recording(body, status, response_headers, response_body))
    if isinstance(outcome, Tee):
        for chunk in stream_chunks(response_body):
            outcome.recorder.feed(chunk)
        end_stream(session, outcome, reached_eof=True)
    return session.stats.stored > stored_before
