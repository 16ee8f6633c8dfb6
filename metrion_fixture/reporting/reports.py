"""What the cache did and holds, for the ``metrion-cache`` stats / ls / show / purge commands.

Everything here reads the store: the ledger of calls (see :mod:`.ledger`) and the
entries themselves. Nothing here is on the request path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.entry import CorruptEntry, Entry
from ..formats import STORED_FORMATS_BY_NAME
from ..formats.base import sse_events
from ..runtime.ledger import PREFIX as LEDGER_PREFIX
from ..runtime.ledger import read_records
from ..stores.base import Store

GROUPINGS = ("model", "provider", "day", "namespace", "source")


@dataclass
class Totals:
    """Sums over a set of call records. Dollars are None when no call of the set had a price."""

    group: str = "total"
    requests: int = 0
    hits: int = 0
    misses: int = 0
    bypassed: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    saved_input_tokens: int = 0
    saved_output_tokens: int = 0
    saved_usd: float | None = None
    saved_seconds: float = 0.0
    # Calls with tokens whose model has no price: their dollars are unknown (never counted as $0).
    unpriced_spent: int = 0
    unpriced_saved: int = 0

    @property
    def hit_rate(self) -> float | None:
        cacheable = self.hits + self.misses
        return self.hits / cacheable if cacheable else None

    def add(self, record: dict[str, Any]) -> None:
        self.requests += 1
        status = record.get("status")
        if status == "HIT":
            self.hits += 1
        elif status in ("MISS", "REFRESH"):
            self.misses += 1
        elif status == "BYPASS":
            self.bypassed += 1
        else:
            self.errors += 1
        self.input_tokens += record.get("input_tokens") or 0
        self.output_tokens += record.get("output_tokens") or 0
        self.saved_input_tokens += record.get("saved_input_tokens") or 0
        self.saved_output_tokens += record.get("saved_output_tokens") or 0
        self.saved_seconds += record.get("saved_seconds") or 0.0
        cost, saved = record.get("cost_usd"), record.get("saved_usd")
        if cost is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost
        elif record.get("input_tokens") is not None:
            self.unpriced_spent += 1
        if saved is not None:
            self.saved_usd = (self.saved_usd or 0.0) + saved
        elif record.get("saved_input_tokens") or record.get("saved_output_tokens"):
            self.unpriced_saved += 1

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "hit_rate": self.hit_rate}


@dataclass
class Report:
    since: float | None
    by: str | None
    groups: list[Totals] = field(default_factory=list)
    total: Totals = field(default_factory=Totals)

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "by": self.by,
            "groups": [group.as_dict() for group in self.groups],
            "total": self.total.as_dict(),
        }


def group_of(record: dict[str, Any], by: str) -> str:
    if by == "day":
        return time.strftime("%Y-%m-%d", time.gmtime(record.get("at") or 0))
    return str(record.get(by) or "?")


def summarize(records: Iterable[dict[str, Any]], by: str | None = None, since: float | None = None) -> Report:
    report = Report(since=since, by=by)
    groups: dict[str, Totals] = {}
    for record in records:
        report.total.add(record)
        if by:
            name = group_of(record, by)
            groups.setdefault(name, Totals(group=name)).add(record)
    report.groups = [groups[name] for name in sorted(groups)]
    return report


def stats(store: Store, namespace: str | None = None, since: float | None = None, by: str | None = None) -> Report:
    return summarize(read_records(store, namespace, since), by=by, since=since)


# -- formatting ---------------------------------------------------------------------------------------------


def money(value: float) -> str:
    """Dollars, printed the one way every surface prints them.

    Four decimals below a dollar, two from a dollar up; an amount too small to show is
    ``<$0.0001``, never ``$0.0000`` (which would read as free); exactly nothing is ``$0.00``.
    """
    if value == 0:
        return "$0.00"
    if value < 0:
        return "-" + money(-value)
    if value < 0.00005:
        return "<$0.0001"
    if value < 0.99995:
        return f"${value:.4f}"
    return f"${value:,.2f}"


def dollars(value: float | None, unpriced: int = 0) -> str:
    """A sum of dollars that may be unknown: ``unpriced`` calls had no price, so they add "unknown", never $0."""
    if value is None or (value == 0 and unpriced):
        return "unknown" if unpriced else "$0.00"
    return money(value) + (" + unknown" if unpriced else "")


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 answer``, ``2 answers``, ``0 misses``: a count with its noun in the right number."""
    if count == 1:
        return f"1 {word}"
    if many is None:
        if word.endswith(("s", "sh", "ch", "x")):
            many = word + "es"
        elif word.endswith("y") and word[-2:-1] not in ("a", "e", "o", "u"):
            many = word[:-1] + "ies"
        else:
            many = word + "s"
    return f"{count:,} {many}"


def tokens(count: int) -> str:
    return f"{count:,}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def render_table(headers: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> str:
    """A plain text table, readable in a terminal."""
    right = set(right)
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            str(cell).rjust(width) if index in right else str(cell).ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * width for width in widths]), *(line(row) for row in rows)])


def render_report(report: Report) -> str:
    headers = [
        report.by or "",
        "requests",
        "hits",
        "hit rate",
        "tokens spent",
        "spent",
        "tokens saved",
        "saved",
        "time saved",
    ]
    rows = []
    for totals in [*report.groups, report.total]:
        rate = "-" if totals.hit_rate is None else f"{totals.hit_rate:.0%}"
        rows.append(
            [
                totals.group,
                str(totals.requests),
                str(totals.hits),
                rate,
                f"{tokens(totals.input_tokens)} in / {tokens(totals.output_tokens)} out",
                dollars(totals.cost_usd, totals.unpriced_spent),
                f"{tokens(totals.saved_input_tokens)} in / {tokens(totals.saved_output_tokens)} out",
                dollars(totals.saved_usd, totals.unpriced_saved),
                duration(totals.saved_seconds),
            ]
        )
    if not report.by:
        headers, rows = headers[1:], [row[1:] for row in rows]
    table = render_table(headers, rows, right=range(1, len(headers)) if report.by else range(len(headers)))
    note = ""
    unpriced = report.total.unpriced_spent + report.total.unpriced_saved
    if unpriced:
        note = (
            f"\n{plural(unpriced, 'call')} used models without a price: their dollars are unknown, not $0 "
            "(add them to a price file named by METRION_CACHE_PRICES)."
        )
    return table + note


# -- entries ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredEntry:
    storage_key: str
    namespace: str
    entry: Entry
    expires_in: float | None

    def summary(self) -> dict[str, Any]:
        entry = self.entry
        stored_usage = entry.extra.get("usage")
        usage: dict[str, Any] = stored_usage if isinstance(stored_usage, dict) else {}
        return {
            "storage_key": self.storage_key,
            "key": entry.key,
            "namespace": self.namespace,
            "wire_format": entry.wire_format,
            "stream": entry.stream,
            "model": entry.model,
            "status": entry.status,
            "bytes": entry.size,
            "chunks": len(entry.chunks),
            "stored_at": entry.stored_at,
            "expires_in": self.expires_in,
            "provider_seconds": entry.provider_seconds,
            "input_tokens": usage.get("input_tokens"),
            "output_tokens": usage.get("output_tokens"),
        }


def entries(store: Store, namespace: str | None = None, *, prefix: str = "") -> list[StoredEntry]:
    """Every readable entry (of one namespace, or all; or whose storage key starts with ``prefix``), oldest
    first; locks, the ledger and damage are skipped."""
    found = []
    for storage_key in store.keys(prefix or ("" if namespace is None else f"{namespace}:")):
        if storage_key.startswith(LEDGER_PREFIX):
            continue
        value = store.get(storage_key)
        if not value:
            continue
        try:
            entry = Entry.decode(value)
        except (CorruptEntry, KeyError, TypeError, ValueError, IndexError):
            continue
        found.append(StoredEntry(storage_key, storage_key.partition(":")[0], entry, store.ttl(storage_key)))
    found.sort(key=lambda stored: stored.entry.stored_at)
    return found


@dataclass
class KeyUse:
    """What the ledger says about one stored answer's key: how often it was served, last used, by whom."""

    hits: int = 0
    last_used: float | None = None
    source: str = ""
    preview: str = ""


def key_uses(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], KeyUse]:
    """The ledger's records summed by (namespace, wire format, key), which names a stored answer in both modes."""
    uses: dict[tuple[str, str, str], KeyUse] = {}
    for record in records:
        use = uses.setdefault(
            (str(record.get("namespace")), str(record.get("wire_format")), str(record.get("key"))), KeyUse()
        )
        if record.get("status") == "HIT":
            use.hits += 1
        at = record.get("at")
        if isinstance(at, (int, float)) and (use.last_used is None or at >= use.last_used):
            use.last_used = at
            # The newest call's source and preview (older records, or previews turned off, have none).
            use.source = record.get("source") or use.source
            use.preview = record.get("preview") or use.preview
    return uses


def use_of(stored: StoredEntry, uses: dict[tuple[str, str, str], KeyUse]) -> KeyUse:
    return uses.get((stored.namespace, stored.entry.wire_format, stored.entry.key)) or KeyUse()


def ago(then: float | None, now: float | None = None) -> str:
    """How long ago, for people: ``3.0 min ago``; ``never`` for no time at all."""
    if then is None:
        return "never"
    return duration(max(0.0, (time.time() if now is None else now) - then)) + " ago"


def utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


PROMPT_WIDTH = 32  # characters of the preview or source that ls shows


def render_entries(found: list[StoredEntry], uses: dict[tuple[str, str, str], KeyUse], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = []
    for stored in found:
        info, use = stored.summary(), use_of(stored, uses)
        # The prompt's first words when previews are kept, else where the call came from.
        prompt = f'"{use.preview}"' if use.preview else use.source or "-"
        if len(prompt) > PROMPT_WIDTH:  # a table row stays one terminal line; --json has it whole
            prompt = prompt[: PROMPT_WIDTH - 1] + "…"
        rows.append(
            [
                info["key"][:12],
                prompt,
                info["model"],
                "stream" if info["stream"] else "json",
                str(use.hits),
                ago(use.last_used, now),
                duration(max(0.0, now - info["stored_at"])),
                "never" if info["expires_in"] is None else duration(info["expires_in"]),
                f"{info['bytes']:,}",
            ]
        )
    headers = ["key", "prompt / source", "model", "mode", "hits", "last used", "age", "expires in", "bytes"]
    return render_table(headers, rows, right=(4, 5, 6, 7, 8))


def answer_body(entry: Entry) -> str:
    """The stored answer as it was sent: JSON pretty-printed, a stream as its events, protobuf as its JSON form."""
    wire_format = STORED_FORMATS_BY_NAME.get(entry.wire_format)
    readable = wire_format.readable(entry.chunks, entry.stream) if wire_format is not None else None
    if readable is not None:
        return readable
    raw = b"".join(entry.chunks).decode("utf-8", "replace")
    if entry.stream:
        return raw
    try:
        return json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except ValueError:
        return raw


def answer_text(entry: Entry) -> str:
    """The answer as a person reads it, whatever its format: a stream assembled, tool calls named.

    The stored body itself (:func:`answer_body`) when the format cannot say (a damaged or foreign value).
    """
    wire_format = STORED_FORMATS_BY_NAME.get(entry.wire_format)
    text = wire_format.answer_text(entry.chunks, entry.stream) if wire_format is not None else None
    return answer_body(entry) if text is None else text


def answer_json(entry: Entry) -> Any:
    """The stored answer as JSON values: the body, a stream's events as ``{"event", "data"}``, protobuf's JSON form."""
    wire_format = STORED_FORMATS_BY_NAME.get(entry.wire_format)
    readable = wire_format.readable(entry.chunks, entry.stream) if wire_format is not None else None
    if readable is not None:  # protobuf messages: one JSON document, or one per line for a stream
        return [_json_or_text(line) for line in readable.splitlines()] if entry.stream else _json_or_text(readable)
    if entry.stream:
        try:
            return [{"event": event, "data": _json_or_text(data)} for event, data in sse_events(list(entry.chunks))]
        except ValueError:
            pass
    return _json_or_text(b"".join(entry.chunks).decode("utf-8", "replace"))


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
