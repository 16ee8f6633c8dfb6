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
from ..runtime.ledger import PREFIX as LEDGER_PREFIX
from ..runtime.ledger import read_records
from ..stores.base import Store

GROUPINGS = ("model", "provider", "day", "namespace")


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


def dollars(value: float | None, unpriced: int = 0) -> str:
    if value is None or (value == 0 and unpriced):
        return "unknown" if unpriced else "$0.00"
    text = f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.6f}".rstrip("0")
    return text + (" + unknown" if unpriced else "")


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
            f"\n{unpriced} calls used models without a price: their dollars are unknown, not $0 "
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


def entries(store: Store, namespace: str | None = None) -> list[StoredEntry]:
    """Every readable entry (of one namespace, or all), oldest first; locks, the ledger and damage are skipped."""
    found = []
    for storage_key in store.keys("" if namespace is None else f"{namespace}:"):
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


def render_entries(found: list[StoredEntry], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = []
    for stored in found:
        info = stored.summary()
        used = "-" if info["input_tokens"] is None else f"{info['input_tokens']:,} / {info['output_tokens'] or 0:,}"
        rows.append(
            [
                info["key"][:16],
                info["namespace"],
                info["wire_format"],
                "stream" if info["stream"] else "json",
                info["model"],
                f"{info['bytes']:,}",
                duration(max(0.0, now - info["stored_at"])),
                "-" if info["expires_in"] is None else duration(info["expires_in"]),
                used,
            ]
        )
    headers = ["key", "namespace", "format", "mode", "model", "bytes", "age", "expires in", "tokens in / out"]
    return render_table(headers, rows, right=(5, 6, 7, 8))


def answer_text(entry: Entry) -> str:
    """The stored answer as text: JSON pretty-printed, a stream as its events, protobuf as its JSON form."""
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
