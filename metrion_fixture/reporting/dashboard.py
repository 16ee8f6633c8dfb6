"""The figures of the dashboard (``metrion-cache dashboard``, ``serve``'s ``/_metrion/``) and the HTML report.

Everything here reads the same ledger as ``metrion-cache stats`` (:func:`.reports.stats`) and
returns plain JSON-ready dicts: the dashboard's API sends them as they are, and
``metrion-cache report --html`` embeds them in the same page (:func:`render_page`), so the
browser and the file show the same figures, formatted once, here (money, tokens, durations
come from :mod:`.reports`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any

from ..core.directives import check_ttl
from ..core.engine import storage_key
from ..core.options import mask_password
from ..errors import MetrionCacheError
from ..runtime.ledger import PREFIX as LEDGER_PREFIX
from ..runtime.ledger import batch_written_at, read_batch, read_records
from ..stores.base import Store
from .reports import StoredEntry, Totals, answer_text, dollars, duration, entries, plural, summarize, tokens

__all__ = [
    "BatchCache",
    "DEFAULT_LOG_LIMIT",
    "FILTERS",
    "PERIODS",
    "call_detail",
    "ledger_records",
    "logs",
    "period_since",
    "render_page",
    "report_data",
    "savings",
]

# The periods the Savings card offers; any other duration ("12h", "90d") is read by check_ttl.
PERIODS: dict[str, str] = {"today": "Today (UTC)", "7d": "Last 7 days", "30d": "Last 30 days", "all": "All time"}
FILTERS = ("namespace", "model", "source", "status")
DEFAULT_LOG_LIMIT = 200
MAX_LOG_LIMIT = 5000
# The chart has one bar per day; a longer period shows its most recent days.
MAX_CHART_DAYS = 92
# An answer shown in the page: beyond this it is cut, and says so (metrion-cache show prints it whole).
MAX_ANSWER_CHARS = 20_000
# A report holds every listed call's answer: shorter ones keep the file small enough to mail.
MAX_REPORT_ANSWER_CHARS = 4_000
_DAY = 86400
_TEMPLATE = "dashboard.html"
_DATA_SLOT = "/*METRION_DATA*/null"


def period_since(period: str, now: float) -> float | None:
    """The start of ``period`` ("today" is since 00:00 UTC, the days of ``stats --by day``; "all" is None)."""
    if period == "all":
        return None
    if period == "today":
        return now - now % _DAY
    try:
        return now - check_ttl(period)
    except MetrionCacheError:
        choices = ", ".join(PERIODS)
        raise MetrionCacheError(f"invalid period {period!r}; use {choices}, or a duration like 12h or 90d") from None


def period_label(period: str) -> str:
    return PERIODS.get(period) or f"Last {period}"


def _rate(totals: Totals) -> str:
    return "–" if totals.hit_rate is None else f"{totals.hit_rate:.0%}"


Unwritten = Callable[[], list[dict[str, Any]]]
# A failed ledger write is retried under the same key, possibly with more records: a batch this
# young is read again on each look, an older one is taken from memory.
_SETTLED_SECONDS = 600.0
# About 1.5 KB each in memory: past this many, batches are read again on each look instead.
MAX_CACHED_RECORDS = 100_000


class BatchCache:
    """The ledger batches a dashboard has read, by key: each refresh reads and parses only the new ones.

    Without it every refresh of the page parsed the whole ledger (seconds for 100,000 calls).
    """

    def __init__(self) -> None:
        self._batches: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()  # the app answers requests in threads

    def records(self, store: Store, namespace: str | None, since: float | None) -> list[dict[str, Any]]:
        keys = store.keys(LEDGER_PREFIX if namespace is None else f"{LEDGER_PREFIX}{namespace}:")
        with self._lock:
            known = dict(self._batches)
        room = MAX_CACHED_RECORDS - sum(len(batch) for batch in known.values())
        settled = time.time() - _SETTLED_SECONDS
        records: list[dict[str, Any]] = []
        for key in keys:
            written = batch_written_at(key)
            if since is not None and written < since:
                continue
            batch = known.get(key)
            if batch is None or written > settled:
                batch = read_batch(store, key)
                if written <= settled and len(batch) <= room:
                    known[key] = batch
                    room -= len(batch)
            records += [record for record in batch if since is None or record.get("at", 0) >= since]
        if namespace is None:  # the whole ledger was listed: forget the batches trimmed or expired since
            present = set(keys)
            known = {key: batch for key, batch in known.items() if key in present}
        with self._lock:
            self._batches = known
        records.sort(key=lambda record: record.get("at", 0))
        return records


def ledger_records(
    store: Store,
    namespace: str | None = None,
    since: float | None = None,
    unwritten: Unwritten | None = None,
    batches: BatchCache | None = None,
) -> list[dict[str, Any]]:
    """The ledger's records, oldest first, with ``unwritten()``'s: a live process's calls not yet in the store.

    The unwritten ones are taken first: a batch written meanwhile is then in both, and counted once.
    """
    waiting = unwritten() if unwritten is not None else []
    records = batches.records(store, namespace, since) if batches is not None else read_records(store, namespace, since)
    if not waiting:
        return records
    seen = {(record.get("key"), record.get("at"), record.get("status")) for record in records}
    for record in waiting:
        kept = (namespace is None or record.get("namespace") == namespace) and (
            since is None or record.get("at", 0) >= since
        )
        if kept and (record.get("key"), record.get("at"), record.get("status")) not in seen:
            records.append(record)
    records.sort(key=lambda record: record.get("at", 0))
    return records


def savings(
    store: Store,
    period: str = "7d",
    namespace: str | None = None,
    *,
    now: float | None = None,
    unwritten: Unwritten | None = None,
    batches: BatchCache | None = None,
) -> dict[str, Any]:
    """The Savings card: what the cache saved in ``period``, its hit rate, and the hits, misses and dollars per day."""
    now = time.time() if now is None else now
    since = period_since(period, now)
    records = ledger_records(store, namespace, since, unwritten, batches)
    records = [record for record in records if record.get("at", 0) <= now]
    return savings_of(records, period, since, now)


def savings_of(records: list[dict[str, Any]], period: str, since: float | None, now: float) -> dict[str, Any]:
    report = summarize(records, by="day", since=since)
    total = report.total
    by_day = {group.group: group for group in report.groups}
    first = since if since is not None else (records[0].get("at", now) if records else now)
    days = []
    day = max(first - first % _DAY, now - now % _DAY - (MAX_CHART_DAYS - 1) * _DAY)
    while day <= now:
        name = time.strftime("%Y-%m-%d", time.gmtime(day))
        totals = by_day.get(name) or Totals(group=name)
        days.append(
            {
                "day": name,
                "hits": totals.hits,
                "misses": totals.misses,
                "other": totals.bypassed + totals.errors,
                "saved_usd": totals.saved_usd,
                "saved_usd_text": dollars(totals.saved_usd, totals.unpriced_saved),
            }
        )
        day += _DAY
    return {
        "period": period,
        "label": period_label(period),
        "since": since,
        "until": now,
        "totals": total.as_dict(),
        "text": {
            "saved_usd": dollars(total.saved_usd, total.unpriced_saved),
            "spent_usd": dollars(total.cost_usd, total.unpriced_spent),
            "saved_tokens": tokens(total.saved_input_tokens + total.saved_output_tokens),
            "saved_input_tokens": tokens(total.saved_input_tokens),
            "saved_output_tokens": tokens(total.saved_output_tokens),
            "spent_tokens": tokens(total.input_tokens + total.output_tokens),
            "saved_seconds": duration(total.saved_seconds),
            "hit_rate": _rate(total),
        },
        "days": days,
    }


def _chosen(record: Mapping[str, Any], name: str) -> str:
    return str(record.get(name) or "")


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    cached = record.get("status") == "HIT"
    input_tokens, output_tokens = record.get("input_tokens"), record.get("output_tokens")
    cost = record.get("cost_usd")
    saved_usd = record.get("saved_usd")
    saved_tokens = (record.get("saved_input_tokens") or 0) + (record.get("saved_output_tokens") or 0)
    # A call with tokens but no price is "unknown", never $0; a call without tokens (bypassed, an error) is "–".
    if cost is None:
        cost_text = "unknown" if input_tokens is not None else "–"
    else:
        cost_text = dollars(cost)
    return {
        "at": record.get("at", 0.0),
        "namespace": _chosen(record, "namespace"),
        "source": _chosen(record, "source"),
        "preview": _chosen(record, "preview"),
        "model": _chosen(record, "model"),
        "provider": _chosen(record, "provider"),
        "wire_format": _chosen(record, "wire_format"),
        "stream": bool(record.get("stream")),
        "status": _chosen(record, "status"),
        "refusal": _chosen(record, "refusal"),  # why the cache answered an ERROR itself (replay_miss, ...)
        "http_status": record.get("http_status"),
        "cached": cached,
        "latency": record.get("latency") or 0.0,
        "latency_text": _milliseconds(record.get("latency") or 0.0),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tokens_text": "–" if input_tokens is None else f"{tokens(input_tokens)} / {tokens(output_tokens or 0)}",
        "cost_usd": cost,
        "cost_text": cost_text,
        "saved_usd": saved_usd,
        "saved_input_tokens": record.get("saved_input_tokens") or 0,
        "saved_output_tokens": record.get("saved_output_tokens") or 0,
        "saved_seconds": record.get("saved_seconds") or 0.0,
        "saved_usd_text": dollars(saved_usd, 0 if saved_usd is not None else 1) if cached else "",
        "saved_more_text": (
            f"{plural(saved_tokens, 'token')} · {duration(record.get('saved_seconds') or 0.0)}" if cached else ""
        ),
        "key": _chosen(record, "key"),
    }


def _milliseconds(seconds: float) -> str:
    if seconds < 0.01:  # a hit: tenths of a millisecond tell it apart from a fast provider
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else duration(seconds)


def logs_of(
    records: list[dict[str, Any]],
    filters: Mapping[str, str | None] | None = None,
    limit: int = DEFAULT_LOG_LIMIT,
) -> dict[str, Any]:
    """The latest calls first, those matching every given filter (namespace, model, source, status)."""
    wanted = {name: value for name, value in (filters or {}).items() if name in FILTERS and value}
    choices: dict[str, set[str]] = {name: set() for name in FILTERS}
    matched = []
    for record in records:
        for name in FILTERS:
            value = _chosen(record, name)
            if value:
                choices[name].add(value)
        if all(_chosen(record, name) == value for name, value in wanted.items()):
            matched.append(record)
    limit = max(1, min(limit, MAX_LOG_LIMIT))
    latest = sorted(matched, key=lambda record: record.get("at", 0), reverse=True)[:limit]
    return {
        "rows": [_row(record) for record in latest],
        "matched": len(matched),
        "limit": limit,
        "filters": wanted,
        "choices": {name: sorted(values) for name, values in choices.items()},
    }


def logs(
    store: Store,
    filters: Mapping[str, str | None] | None = None,
    limit: int = DEFAULT_LOG_LIMIT,
    *,
    since: float | None = None,
    unwritten: Unwritten | None = None,
    batches: BatchCache | None = None,
) -> dict[str, Any]:
    """The Logs table: the latest ``limit`` calls of the ledger, newest first, filtered."""
    namespace = (filters or {}).get("namespace") or None
    return logs_of(ledger_records(store, namespace, since, unwritten, batches), filters, limit)


def _detail(stored: StoredEntry, now: float, most: int = MAX_ANSWER_CHARS) -> dict[str, Any]:
    entry = stored.entry
    text = answer_text(entry)
    expires_at = None if stored.expires_in is None else now + stored.expires_in
    return {
        "found": True,
        "storage_key": stored.storage_key,
        "key": entry.key,
        "namespace": stored.namespace,
        "wire_format": entry.wire_format,
        "stream": entry.stream,
        "model": entry.model,
        "bytes": entry.size,
        "stored_at": entry.stored_at,
        "expires_at": expires_at,
        "expires_text": "never" if stored.expires_in is None else f"in {duration(stored.expires_in)}",
        "answer": text[:most],
        "truncated": len(text) > most,
    }


_NOT_STORED = (
    "No stored answer for this call: it was not stored (a bypassed call, an error, max-age=0), "
    "or it has expired or been purged since."
)


def call_detail(
    store: Store, namespace: str, wire_format: str, stream: bool, key: str, *, now: float | None = None
) -> dict[str, Any]:
    """The stored answer behind one call of the Logs: its key, text and expiry (or why there is none)."""
    now = time.time() if now is None else now
    own, other = ("stream", "json") if stream else ("json", "stream")
    # The call's own variant first; a hit may have been served from the other one, converted.
    for variant in (own, other):
        prefix = storage_key(namespace, wire_format, variant, key)
        for stored in entries(store, namespace, prefix=prefix):
            return _detail(stored, now)
    return {"found": False, "key": key, "namespace": namespace, "message": _NOT_STORED}


def _call_id(row: Mapping[str, Any]) -> str:
    return f"{row['namespace']}|{row['wire_format']}|{int(row['stream'])}|{row['key']}"


def report_data(
    store: Store,
    period: str = "30d",
    namespace: str | None = None,
    *,
    limit: int = 500,
    now: float | None = None,
) -> dict[str, Any]:
    """Everything the HTML report shows: the Savings and the Logs of ``period``, with each row's stored answer."""
    now = time.time() if now is None else now
    since = period_since(period, now)
    records = [record for record in read_records(store, namespace, since) if record.get("at", 0) <= now]
    listed = logs_of(records, {"namespace": namespace}, limit)
    found: dict[str, StoredEntry] = {}
    for each in entries(store, namespace):
        entry = each.entry
        found.setdefault(f"{each.namespace}|{entry.wire_format}|{int(entry.stream)}|{entry.key}", each)
    details: dict[str, Any] = {}
    for row in listed["rows"]:
        call_id = _call_id(row)
        twin = f"{row['namespace']}|{row['wire_format']}|{int(not row['stream'])}|{row['key']}"
        stored = found.get(call_id) or found.get(twin)
        missing = {"found": False, "key": row["key"], "message": _NOT_STORED}
        details[call_id] = _detail(stored, now, MAX_REPORT_ANSWER_CHARS) if stored else missing
    return {
        "mode": "report",
        "generated_at": now,
        "store": mask_password(store.url),
        "savings": savings_of(records, period, since, now),
        "logs": listed,
        "details": details,
    }


def render_page(data: Mapping[str, Any] | None = None) -> str:
    """The dashboard page; with ``data`` (:func:`report_data`) a self-contained report that needs no server."""
    page = resources.files(__package__).joinpath(_TEMPLATE).read_text(encoding="utf-8")
    if data is None:
        return page
    # Inside <script>: no "</script>" or "<!--" may end it early, whatever a prompt or an answer holds.
    embedded = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace("\u2028", "\\u2028")
    return page.replace(_DATA_SLOT, embedded.replace("\u2029", "\\u2029"), 1)


def parse_filters(query: Mapping[str, str], names: Iterable[str] = FILTERS) -> dict[str, str]:
    return {name: query[name] for name in names if query.get(name)}
