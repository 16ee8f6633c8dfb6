"""Import vcrpy / pytest-recording cassettes into the cache: ``metrion-cache import-cassettes``.

vcrpy reads the files (its own loader and serializers: YAML or JSON, the httpx and
httpx2 recordings included); each recorded exchange then goes through the same
engine as live traffic (:func:`import_recorded`), so
it is keyed, filtered and stored exactly as the live answer would have been.
Interactions that are not LLM requests, or whose answer was not a success, are
skipped and reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.flow import Tee
from ..runtime._sync.driver import drive, end_stream
from ..runtime.session import CacheSession

CASSETTE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Skipped:
    cassette: str
    method: str
    uri: str
    reason: str


@dataclass
class ImportReport:
    url: str
    namespace: str
    cassettes: list[str] = field(default_factory=list)
    imported: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (cassette, why)
    store_failures: int = 0  # interactions that could not be written to the store


def find_cassettes(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The cassette files named, and those under the folders named (``*.yaml``, ``*.yml``, ``*.json``)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CASSETTE_SUFFIXES))
        else:
            found.append(path)
    return found


def load_interactions(path: Path) -> list[tuple[Any, dict[str, Any]]]:
    """(vcr Request, response dict) pairs, read by vcrpy itself; JSON by the ``.json`` suffix, else YAML."""
    from vcr.persisters.filesystem import FilesystemPersister
    from vcr.serializers import jsonserializer, yamlserializer

    serializer = jsonserializer if path.suffix.lower() == ".json" else yamlserializer
    loaded = FilesystemPersister.load_cassette(path, serializer)
    requests, responses = loaded[0], loaded[1]
    return list(zip(requests, responses, strict=True))


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
    """
    if session is None:
        session = CacheSession(url, mode="refresh", ttl=ttl, namespace=namespace)
    report = ImportReport(url=session.url, namespace=session.settings.namespace)
    for path in find_cassettes(paths):
        name = str(path)
        try:
            interactions = load_interactions(path)
        except FileNotFoundError:
            report.unreadable.append((name, "no such cassette file (or it is empty)"))
            continue
        except Exception as error:  # noqa: BLE001 - whatever vcrpy or the YAML/JSON parser raised
            report.unreadable.append((name, f"{type(error).__name__}: {error}"))
            continue
        report.cassettes.append(name)
        for request, response in interactions:
            reason = import_interaction(session, request, response)
            if reason is None:
                report.imported += 1
            elif reason is _STORE_FAILED:
                report.store_failures += 1
            else:
                report.skipped.append(Skipped(name, str(request.method).upper(), str(request.uri), reason))
    return report


_STORE_FAILED = "the cache store could not be written"


def import_interaction(session: CacheSession, request: Any, response: dict[str, Any]) -> str | None:
    """Import one recorded exchange; None if stored, else why it was not."""
    try:
        status, headers, body = _response_parts(response)
    except (KeyError, TypeError, ValueError) as error:
        return f"the recorded response is not in a shape vcrpy writes ({type(error).__name__}: {error})"
    encoding = next((value for name, value in headers if name.lower() == "content-encoding"), "")
    if encoding and encoding.strip().lower() != "identity":
        return f"the recorded body is compressed with {encoding!r}, which vcrpy could not decode here"

    stats = session.stats
    requests_before, store_errors_before = stats.requests, stats.store_errors
    stored = import_recorded(
        session,
        str(request.method).upper(),
        request.path,
        request.headers,
        _request_body(request),
        status,
        headers,
        body,
    )
    if stats.store_errors > store_errors_before:
        return _STORE_FAILED
    if stored:
        return None
    if stats.requests == requests_before:
        return "not an LLM request (only Anthropic Messages and OpenAI Chat Completions calls are cached)"
    last = session.ledger.calls[-1]
    if last.status == "BYPASS":
        return "the request body has no model and messages"
    if last.status == "ERROR":
        return "the recorded request carries an invalid x-metrion-cache or Cache-Control header"
    if not 200 <= status < 300:
        return f"the provider answered HTTP {status} (only successes are cached)"
    if last.stream:
        return "the recorded stream is incomplete (no end event, or an error event)"
    return "the answer is larger than the entry size limit"


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
        for name, values in response["headers"].items()
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
        # Recordings keep a stream's body whole; store it an event per chunk, as a provider sends it.
        for event in response_body.split(b"\n\n"):
            if event:
                outcome.recorder.feed(event + b"\n\n")
        end_stream(session, outcome, reached_eof=True)
    return session.stats.stored > stored_before
