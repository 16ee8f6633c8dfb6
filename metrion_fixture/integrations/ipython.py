"""``%metrion_cache``: the cache in IPython and Jupyter (``%load_ext metrion_fixture``).

The line magic turns the process-wide cache on and off (:func:`metrion_fixture.enable`
/ :func:`metrion_fixture.disable`), arms a refresh for the next cell, shows the status
and clears the namespace. The cell magic caches one cell only, by opening a
:func:`metrion_fixture.cache` block for the length of the cell.

A kernel's event loop is always running, so a cell magic cannot run its body with
``shell.run_cell`` when the body awaits (IPython would start a second loop). An input
transformer therefore turns the ``%%metrion_cache OPTIONS`` line into a call that opens
the block, leaves the body as it is (so top-level ``await`` runs on the kernel's loop
like in any cell), and the ``post_run_cell`` event closes the block. After each cell
that made cached calls, a one-line report is displayed: HTML with a badge in Jupyter,
plain text in a terminal.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from ..api import covering_process, disable, enable
from ..core.options import OPTIONS, URL_ENV, CacheOptions, InvalidOption, environment_layer, flag_layer, resolve
from ..core.stats import CallRecord, Ledger, Stats
from ..errors import MetrionCacheError
from ..reporting.charts import daily_calls_svg
from ..reporting.dashboard import period_label, savings
from ..reporting.reports import Report, money, plural, render_report
from ..reporting.reports import stats as ledger_stats
from ..reporting.run_summary import combined
from ..runtime import sources
from ..runtime.activation import active_session, enabled_session
from ..runtime.session import CacheSession
from ..stores import default_store_url, open_store
from ..stores.base import Store
from ..stores.sqlite import SQLiteStore

__all__ = [
    "CacheReport",
    "LedgerReport",
    "MetrionCacheMagics",
    "begin_cell",
    "load_ipython_extension",
    "unload_ipython_extension",
]

MAGIC = "metrion_cache"
ACTIONS = ("on", "off", "refresh", "status", "clear", "stats")
USAGE = (
    "%metrion_cache on|off|refresh|status|clear "
    + " ".join(f"[{option.flag} {option.spec.metavar}]" for option in OPTIONS)
    + " (or %%metrion_cache [options] on the first line of a cell)"
)
_SESSION_OPTIONS = tuple(option.name for option in OPTIONS)
_OPTIONS_TAKEN = {
    "on": _SESSION_OPTIONS,
    "off": (),
    "refresh": (),
    "status": (),
    "clear": ("url", "namespace"),
    "stats": ("url", "namespace"),
}
_FLAG = {option.name: option.flag for option in OPTIONS}


def _option_arguments(magic: Any) -> Any:
    """One flag per option of :class:`CacheOptions`, after the action, in the order of its fields."""
    for option in reversed(OPTIONS):  # IPython adds the arguments in the reverse order of their decorators
        env = option.env if option.env and not option.spec.env_for_pytest_only else None
        magic = argument(
            option.flag,
            dest=option.name,
            **option.flag_arguments,
            help=option.spec.help + (f"; env: {env}" if env else ""),
        )(magic)
    return magic


# -- the report ------------------------------------------------------------------------------------

# The pill of a cell's report: what its calls did, at a glance. Colors pass WCAG AA with white text.
PILLS: dict[str, str] = {
    "cached": "#1a7f37",  # every answer from the cache
    "partly cached": "#9a6700",  # some from the cache, some from the provider
    "provider": "#57606a",  # every answer from the provider
    "refused": "#cf222e",  # the cache refused a call (a replay miss, a bad header, a store down in replay)
}
KEY_CHARS = 12  # enough for `metrion-cache show KEY` (8 or more)
NAMED_AT_MOST = 3  # calls named in the line; the list under it has them all


@dataclass(frozen=True)
class CacheReport:
    """What one cell's calls did: HTML with a pill and a list of the calls in Jupyter, one line of text elsewhere."""

    from_cache: int = 0
    from_provider: int = 0
    refreshed: int = 0  # of from_provider: calls that replaced their cached answer
    errors: int = 0  # answered by the cache itself with an error (a replay miss, a bad header)
    saved_seconds: float = 0.0  # provider time of the answers served from the cache, summed over calls
    saved_tokens: int = 0  # input + output tokens of the answers served from the cache
    saved_usd: float = 0.0  # their list price, for models in the price table
    wall_seconds: float | None = None  # how long the cell ran
    records: tuple[CallRecord, ...] = ()  # the cell's calls, oldest first

    @property
    def calls(self) -> int:
        return self.from_cache + self.from_provider + self.errors

    @property
    def pill(self) -> str:
        """cached, partly cached, provider or refused."""
        if self.errors:
            return "refused"
        if self.from_cache:
            return "partly cached" if self.from_provider else "cached"
        return "provider"

    def _parts(self) -> list[str]:
        provider = f"{self.from_provider} from the provider"
        if self.refreshed:
            provider += f" ({self.refreshed} refreshed)"
        parts = [f"{self.from_cache} from cache", provider]
        if self.errors:
            parts.append(f"{self.errors} refused by the cache")
        if self.from_cache:
            cell = f" (cell {format_seconds(self.wall_seconds)})" if self.wall_seconds is not None else ""
            parts.append(f"{format_seconds(self.saved_seconds)} of provider time saved{cell}")
        if self.saved_tokens:
            dollars = f" ({money(self.saved_usd)})" if self.saved_usd else ""
            parts.append(f"{plural(self.saved_tokens, 'token')} saved{dollars}")
        return parts

    def _named(self) -> list[str]:
        """``missed: MODEL (key 9f86d081884c)`` and ``refused: ...``: the calls that did not come from the cache."""
        named = []
        for status, label in (("MISS", "missed"), ("ERROR", "refused")):
            found = [record for record in self.records if record.status == status]
            if not found:
                continue
            names = [f"{record.model} (key {record.key[:KEY_CHARS]})" for record in found[:NAMED_AT_MOST]]
            if len(found) > NAMED_AT_MOST:
                names.append(f"{len(found) - NAMED_AT_MOST} more")
            named.append(f"{label}: {', '.join(names)}")
        return named

    @property
    def text(self) -> str:
        return "; ".join(["metrion cache: " + ", ".join(self._parts()), *self._named()])

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:  # the text/plain form a terminal IPython prints
        return self.text

    def _repr_html_(self) -> str:
        label = self.pill
        badge = (
            f'<span class="metrion-cache-pill" data-state="{label}" style="background:{PILLS[label]};color:#fff;'
            f'border-radius:4px;padding:1px 6px;font-size:0.85em;font-weight:600;font-family:sans-serif">{label}</span>'
        )
        body = html.escape(self.text.removeprefix("metrion cache: "))
        return (
            f'<div class="metrion-cache-report" style="font-family:sans-serif;font-size:0.9em">'
            f"{badge} <span>metrion cache: {body}</span>{self._calls_html()}</div>"
        )

    def _calls_html(self) -> str:
        if not self.records:
            return ""
        cell = 'style="padding:1px 8px;text-align:{}"'
        head = "".join(
            f"<th {cell.format(align)}>{name}</th>"
            for name, align in (
                ("model", "left"),
                ("key", "left"),
                ("status", "left"),
                ("latency", "right"),
                ("tokens in / out", "right"),
                ("cost", "right"),
            )
        )
        rows = []
        for record in self.records:
            values = [
                (html.escape(record.model), "left"),
                (f"<code>{html.escape(record.key[:KEY_CHARS])}</code>", "left"),
                (record.status, "left"),
                (format_seconds(record.latency), "right"),
                (html.escape(call_tokens(record)), "right"),
                (html.escape(call_cost(record)), "right"),
            ]
            rows.append(
                f'<tr data-status="{record.status}">'
                + "".join(f"<td {cell.format(align)}>{value}</td>" for value, align in values)
                + "</tr>"
            )
        return (
            f'<details style="margin-top:2px"><summary>{plural(len(self.records), "call")}</summary>'
            f'<table style="border-collapse:collapse;font-size:0.95em"><tr>{head}</tr>{"".join(rows)}</table></details>'
        )


@dataclass(frozen=True)
class LedgerReport:
    """``%metrion_cache stats``: a period of the ledger as a line, a table per model and (Jupyter) a daily chart."""

    url: str
    namespace: str | None
    figures: dict[str, Any]  # the dashboard's Savings card for the period (reporting.dashboard.savings)
    report: Report  # one row per model

    @property
    def headline(self) -> str:
        period = period_label(self.figures["period"]).lower()
        where = self.url + (f", namespace {self.namespace}" if self.namespace else "")
        total, text = self.report.total, self.figures["text"]
        if not total.requests:
            return f"metrion cache: no calls in the ledger of {where} ({period})"
        return (
            f"metrion cache: {period} in {where}: {plural(total.requests, 'call')}, {total.hits} from cache "
            f"({text['hit_rate']} hit rate); saved {text['saved_usd']}, {text['saved_tokens']} tokens and "
            f"{text['saved_seconds']} of provider time (summed over calls)"
        )

    @property
    def text(self) -> str:
        if not self.report.total.requests:
            return self.headline
        return f"{self.headline}\n{render_report(self.report)}"

    def __repr__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        table = (
            f'<pre style="font-size:0.85em;margin:4px 0">{html.escape(render_report(self.report))}</pre>'
            if self.report.total.requests
            else ""
        )
        chart = daily_calls_svg(self.figures["days"]) if self.report.total.requests else ""
        return (
            f'<div class="metrion-cache-stats" style="font-family:sans-serif;font-size:0.9em">'
            f"<div>{html.escape(self.headline)}</div>{table}{chart}</div>"
        )


def call_tokens(record: CallRecord) -> str:
    """``12 / 40``; a hit adds what it saved; "–" when the provider's usage is unknown."""
    if record.status == "HIT":
        return f"0 / 0 (saved {record.saved_input_tokens:,} / {record.saved_output_tokens:,})"
    if record.input_tokens is None:
        return "–"
    return f"{record.input_tokens:,} / {record.output_tokens or 0:,}"


def call_cost(record: CallRecord) -> str:
    """``$0.0042``; a hit is ``$0.00 (saved $0.0042)``; "unknown" for a model without a price."""
    if record.status == "HIT":
        saved = "unknown" if record.saved_usd is None else money(record.saved_usd)
        return f"$0.00 (saved {saved})"
    if record.cost_usd is None:
        return "unknown" if record.input_tokens is not None else "–"
    return money(record.cost_usd)


def format_seconds(seconds: float) -> str:
    if seconds <= 0:
        return "0 s"
    if seconds < 0.01:  # a hit: tenths of a millisecond tell it from a fast provider
        return f"{seconds * 1000:.1f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def format_ttl(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


_COUNTERS = (
    "hits",
    "misses",
    "refreshes",
    "bypassed",
    "errors",
    "saved_seconds",
    "saved_input_tokens",
    "saved_output_tokens",
    "saved_usd",
)
_REQUEST_COUNTERS = 5  # the first five add up to the requests


def _snapshot(ledger: Ledger) -> tuple[float, ...]:
    return tuple(getattr(ledger.stats, name) for name in _COUNTERS)


# -- one cell's bookkeeping --------------------------------------------------------------------------


@dataclass
class _Cell:
    """A running cell: counters at its start, and the cache blocks to close at its end."""

    info: Any  # IPython's ExecutionInfo, matched in post_run_cell; None for silent runs
    baseline: dict[int, tuple[Ledger, tuple[float, ...]]] = field(default_factory=dict)
    blocks: list[tuple[CacheSession, AbstractContextManager[CacheSession]]] = field(default_factory=list)
    refresh_requested: bool = False
    refresh_block: tuple[CacheSession, AbstractContextManager[CacheSession]] | None = None
    started: float = field(default_factory=time.monotonic)

    def watch(self, session: CacheSession | None, *, from_zero: bool = False) -> None:
        if session is None or id(session.ledger) in self.baseline:
            return
        zero = tuple(0 for _ in _COUNTERS)
        self.baseline[id(session.ledger)] = (session.ledger, zero if from_zero else _snapshot(session.ledger))

    def close(self) -> None:
        blocks = self.blocks + ([self.refresh_block] if self.refresh_block else [])
        self.blocks, self.refresh_block = [], None
        for _, block in reversed(blocks):
            block.__exit__(None, None, None)

    def report(self) -> CacheReport:
        self.watch(active_session(), from_zero=True)
        self.watch(enabled_session(), from_zero=True)
        delta = [0.0] * len(_COUNTERS)
        records: list[CallRecord] = []
        for ledger, before in self.baseline.values():
            now = _snapshot(ledger)
            for i, value in enumerate(now):
                delta[i] += value - before[i]
            made = int(sum(now[:_REQUEST_COUNTERS]) - sum(before[:_REQUEST_COUNTERS]))
            if made > 0:
                records += list(ledger.calls)[-made:]  # this cell's, the latest (the list is bounded)
        hits, misses, refreshes, bypassed, errors, saved, saved_in, saved_out, saved_usd = delta
        return CacheReport(
            from_cache=int(hits),
            from_provider=int(misses + refreshes + bypassed),
            refreshed=int(refreshes),
            errors=int(errors),
            saved_seconds=saved,
            saved_tokens=int(saved_in + saved_out),
            saved_usd=saved_usd,
            wall_seconds=time.monotonic() - self.started,
            records=tuple(sorted(records, key=lambda record: record.at)),
        )


def _open_block(session: CacheSession) -> AbstractContextManager[CacheSession]:
    block = covering_process(session)
    block.__enter__()
    return block


# -- the magics ----------------------------------------------------------------------------------------


def _error(message: object) -> UsageError:
    text = " ".join(str(message).split())
    if not text.startswith("metrion cache:"):
        text = f"metrion cache: {text}"
    return UsageError(text)


@magics_class
class MetrionCacheMagics(Magics):
    shell: Any  # the InteractiveShell; set by Magics.__init__

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._cells: list[_Cell] = []
        self._refresh_armed = False
        self._kernel_stats: list[Stats] = []  # of every session the magics made in this kernel: status adds them up

    # The docstring is the help of ``%metrion_cache?``; magic_arguments appends the options.
    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        choices=ACTIONS,
        help="on: cache every LLM call of this kernel; off: stop; refresh: the next cell's calls go to "
        "the provider and replace their cached answers; status: store, mode, TTL, namespace and this "
        "kernel's counts; clear: delete this namespace's entries; stats: the ledger of every process that "
        "used the store, as a table and a chart per day. Without an action: status. Not used by %%%%metrion_cache.",
    )
    @argument(
        "--period",
        metavar="PERIOD",
        help="for stats: today, 7d, 30d, all (the default), or a duration like 12h or 90d",
    )
    @_option_arguments
    @line_cell_magic
    def metrion_cache(self, line: str, cell: str | None = None) -> None:
        """Cache LLM calls (Anthropic, OpenAI and compatible SDKs, sync and async) in this kernel.

        %metrion_cache on [options]   every call of the kernel, until %metrion_cache off
        %metrion_cache off
        %metrion_cache refresh        the next cell calls the provider again and replaces the answers
        %metrion_cache status         store, mode, TTL, namespace, and the counts of every `on` of this kernel
        %metrion_cache clear          delete this namespace's entries (and say how many)
        %metrion_cache stats [--period 7d]   the ledger in the store (every process, every run): a table and
                                      a chart of hits and misses per day

        %%metrion_cache [options]     on the first line of a cell: only that cell is cached,
                                      top-level await included; what was active before is restored.

        After each cell that made cached calls, one line says how many answers came from the
        cache, how many from the provider, which calls missed, and what was saved; in Jupyter a
        colored pill (cached, partly cached, provider, refused) and the list of the calls.
        """
        if cell is not None:
            return self._run_cell_fallback(line, cell)
        args = self._parse(line)
        action = args.action or "status"
        given = [name for name in _SESSION_OPTIONS if getattr(args, name) is not None]
        unwanted = [_FLAG[name] for name in given if name not in _OPTIONS_TAKEN[action]]
        if args.period is not None and action != "stats":
            unwanted.append("--period")
        if unwanted:
            raise _error(f"'{action}' takes no {' or '.join(unwanted)} option; usage: {USAGE}")
        getattr(self, f"_{action}")(args)

    # -- actions

    def _on(self, args: Any) -> None:
        try:
            session = enable(options=self._session_options(args), report=False)  # each cell reports
        except MetrionCacheError as error:
            raise _error(error) from None
        self._kernel_stats.append(session.stats)
        cell = self._current_cell()
        if cell is not None:
            cell.watch(session, from_zero=True)
            if cell.refresh_block is not None:  # a refreshing cell turned the cache on anew: refresh that one
                self._end_refresh(cell)
                self._start_refresh(cell, session)
        print(f"metrion cache: on ({self._describe(session)})")

    def _off(self, args: Any) -> None:
        self._refresh_armed = False
        cell = self._current_cell()
        if cell is not None:
            cell.watch(enabled_session())  # this cell's calls before 'off' still count in its report
            self._end_refresh(cell)
        was_on = enabled_session() is not None
        disable()
        print("metrion cache: off" if was_on else "metrion cache: off (it was not on)")

    def _refresh(self, args: Any) -> None:
        if enabled_session() is None:
            raise _error(
                "the cache is off; turn it on first with %metrion_cache on, "
                "or refresh a single cell with %%metrion_cache --mode refresh"
            )
        self._refresh_armed = True
        print("metrion cache: the next cell's calls go to the provider and replace their cached answers")

    def _status(self, args: Any) -> None:
        session = active_session()
        counts = self._kernel_counts()
        if session is None:
            print("metrion cache: off (turn it on with %metrion_cache on)" + (f"\n{counts}" if counts else ""))
            return
        enabled = enabled_session()
        if session is enabled:
            state = "on"
        elif enabled is not None and session.ledger is enabled.ledger:
            state = "on, refreshing this cell"
        else:
            state = "on inside this block or cell only"
        try:
            entries = str(len(session.store.keys(f"{session.settings.namespace}:")))
        except Exception as error:  # noqa: BLE001 - a store that does not answer is reported, not raised
            entries = f"unknown (the store did not answer: {type(error).__name__}: {error})"
        lines = [
            f"metrion cache: {state}",
            f"  store      {session.url}",
            f"  mode       {session.mode}",
            f"  ttl        {format_ttl(session.settings.ttl)}",
            f"  namespace  {session.settings.namespace}",
            f"  scope      {session.settings.scope}",
            f"  source     {session.source}",
            f"  entries    {entries}",
            counts or "  calls      none yet in this kernel",
        ]
        if self._refresh_armed:
            lines.append("  next cell  refresh")
        print("\n".join(lines))

    def _kernel_counts(self) -> str:
        """The calls of every session the magics made in this kernel, whichever is on now ("" if none)."""
        active = active_session()
        stats = combined([*self._kernel_stats, *([active.stats] if active is not None else [])])
        if not stats.requests:
            return ""
        line = (
            f"  calls      {stats.requests} in this kernel ({stats.hits} from cache, {stats.misses} missed, "
            f"{stats.refreshes} refreshed, {stats.bypassed} bypassed, {stats.errors} refused), "
            f"{format_seconds(stats.saved_seconds)} of provider time saved"
        )
        saved_tokens = stats.saved_input_tokens + stats.saved_output_tokens
        if saved_tokens:
            line += f", {plural(saved_tokens, 'token')}" + (f" ({money(stats.saved_usd)})" if stats.saved_usd else "")
        if stats.store_errors:
            line += f"\n  store errors {stats.store_errors} (those calls went to the provider uncached)"
        return line

    def _stats(self, args: Any) -> None:
        period = (args.period or "all").strip()
        store, url = self._ledger_store(args)
        try:
            figures = savings(store, period, args.namespace)
            report = ledger_stats(store, args.namespace, since=figures["since"], by="model")
        except MetrionCacheError as error:
            raise _error(error) from None
        except Exception as error:  # noqa: BLE001 - a store that does not answer: one line, no traceback
            raise _error(f"could not read the ledger in {url}: {type(error).__name__}: {error}") from None
        display(LedgerReport(url=url, namespace=args.namespace, figures=figures, report=report))

    def _ledger_store(self, args: Any) -> tuple[Store, str]:
        """The store to read: --url, else the active session's, else $METRION_CACHE_URL or the default one."""
        session = active_session()
        if args.url is None and session is not None:
            return session.store, session.url
        url = args.url or os.environ.get(URL_ENV) or default_store_url()
        try:
            store = open_store(url)
        except MetrionCacheError as error:
            raise _error(error) from None
        if isinstance(store, SQLiteStore) and not store.path.exists():
            raise _error(f"no store at {store.path} (check --url or ${URL_ENV})")
        return store, store.url

    def _clear(self, args: Any) -> None:
        session = active_session()
        if session is None or args.url is not None or args.namespace is not None:
            try:
                session = CacheSession(options=self._session_options(args))
            except MetrionCacheError as error:
                raise _error(error) from None
        try:
            count = session.clear()
        except Exception as error:  # noqa: BLE001
            raise _error(f"could not clear {session.url}: {type(error).__name__}: {error}") from None
        noun = "entry" if count == 1 else "entries"
        print(f"metrion cache: cleared {count} {noun} of namespace {session.settings.namespace!r} from {session.url}")

    # -- the cell magic

    def begin_cell(self, line: str) -> None:
        """Open the ``%%metrion_cache`` block for the running cell; ``post_run_cell`` closes it."""
        args = self._parse(line)
        if args.action not in (None, "on"):
            raise _error(f"%%metrion_cache takes options only, not {args.action!r}; usage: {USAGE}")
        cell = self._current_cell()
        if cell is None:  # a silent run: no pre_run_cell; post_execute closes the block
            cell = _Cell(info=None)
            self._cells.append(cell)
        session = self._cell_session(args, cell)
        self._kernel_stats.append(session.stats)
        cell.watch(session, from_zero=True)
        cell.blocks.append((session, _open_block(session)))

    def _run_cell_fallback(self, line: str, body: str) -> None:
        # Reached only through an explicit run_cell_magic(): a cell starting with %%metrion_cache
        # is rewritten by the input transformer. The body runs as a nested cell, which cannot await
        # while the kernel's loop is running.
        args = self._parse(line)
        if args.action not in (None, "on"):
            raise _error(f"%%metrion_cache takes options only, not {args.action!r}; usage: {USAGE}")
        if _loop_running() and self._awaits(body):
            raise _error(
                "this cell awaits, which run_cell_magic() cannot do inside a running event loop; "
                "start the cell itself with %%metrion_cache instead"
            )
        cell = self._current_cell() or _Cell(info=None)
        session = self._cell_session(args, cell)
        with covering_process(session):
            self.shell.run_cell(body)

    def _awaits(self, body: str) -> bool:
        try:
            transformed = self.shell.transform_cell(body)
        except Exception:  # noqa: BLE001 - run_cell will report it
            return False
        return bool(self.shell.should_run_async(body, transformed_cell=transformed, preprocessing_exc_tuple=None))

    def _cell_session(self, args: Any, cell: _Cell) -> CacheSession:
        options = self._session_options(args)
        if cell.refresh_requested and args.mode is None:
            options = options.replace(mode="refresh")
        try:
            return CacheSession(options=options)
        except MetrionCacheError as error:
            raise _error(error) from None

    # -- IPython events

    def pre_run_cell(self, info: Any) -> None:
        cell = _Cell(info=info)
        cell.watch(active_session())
        cell.watch(enabled_session())
        if self._refresh_armed:
            self._refresh_armed = False
            cell.refresh_requested = True
            enabled = enabled_session()
            if enabled is not None:
                self._start_refresh(cell, enabled)
        self._cells.append(cell)

    def post_run_cell(self, result: Any) -> None:
        info = getattr(result, "info", None)
        index = next((i for i in range(len(self._cells) - 1, -1, -1) if self._cells[i].info is info), None)
        if index is None and result is None and self._cells:
            index = len(self._cells) - 1  # the run failed before it had a result: it is the innermost cell
        if index is None:
            return  # an empty cell: IPython skips pre_run_cell for it
        finished, self._cells[index:] = self._cells[index:], []
        for cell in reversed(finished):
            cell.close()
        report = finished[0].report()
        if report.calls:
            display(report)

    def post_execute(self) -> None:
        # Silent runs (no pre/post_run_cell) that opened a %%metrion_cache block.
        while self._cells and self._cells[-1].info is None:
            self._cells.pop().close()

    # -- helpers

    def _current_cell(self) -> _Cell | None:
        return self._cells[-1] if self._cells else None

    def _start_refresh(self, cell: _Cell, session: CacheSession) -> None:
        refreshing = session.with_mode("refresh")
        cell.refresh_block = (refreshing, _open_block(refreshing))

    def _end_refresh(self, cell: _Cell) -> None:
        if cell.refresh_block is not None:
            cell.refresh_block[1].__exit__(None, None, None)
            cell.refresh_block = None

    def _parse(self, line: str) -> Any:
        try:
            return parse_argstring(self.metrion_cache, line)
        except UsageError as error:
            raise _error(f"{error}; usage: {USAGE}") from None
        except ValueError as error:  # unbalanced quotes
            raise _error(f"cannot read the options ({error}); usage: {USAGE}") from None
        except SystemExit:
            raise _error(f"bad options; usage: {USAGE}") from None

    @staticmethod
    def _session_options(args: Any) -> CacheOptions:
        """The options the flags give, then the environment's, then the defaults."""
        given = {name: getattr(args, name) for name in _SESSION_OPTIONS}
        try:
            return resolve(flag_layer(given), environment_layer(os.environ)).options
        except InvalidOption as error:
            raise _error(error) from None

    @staticmethod
    def _describe(session: CacheSession) -> str:
        settings = session.settings
        return (
            f"store {session.url}, namespace {settings.namespace}, mode {settings.mode}, ttl {format_ttl(settings.ttl)}"
        )

    def unload(self) -> None:
        self._refresh_armed = False
        while self._cells:
            self._cells.pop().close()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# -- the input transformer ---------------------------------------------------------------------------

_CELL_MAGIC_LINE = re.compile(r"%%" + MAGIC + r"(?:[ \t]+(?P<options>.*?))?[ \t]*\r?\n?\Z", re.DOTALL)


def rewrite_cell_magic(lines: list[str]) -> list[str]:
    """``%%metrion_cache OPTIONS`` on a cell's first line becomes a call that opens the block.

    The body is left as it is, so it runs as the cell itself: top-level ``await`` on the
    kernel's loop, ``%magics``, the displayed last expression. The line count is unchanged.
    """
    if not lines:
        return lines
    match = _CELL_MAGIC_LINE.match(lines[0])
    if match is None:
        return lines
    options = match.group("options") or ""
    begin = "__import__('metrion_fixture.integrations.ipython').integrations.ipython.begin_cell"
    return [f"{begin}(get_ipython(), {options!r})\n", *lines[1:]]


# Leave it out of IPython's "is this cell complete?" check, so a terminal still waits for the body.
rewrite_cell_magic.has_side_effects = True  # type: ignore[attr-defined]


def begin_cell(shell: Any, line: str) -> None:
    """Called by a cell rewritten by :func:`rewrite_cell_magic`, from the cell's own code."""
    magics = shell.magics_manager.registry.get(MetrionCacheMagics.__name__)
    if magics is None:
        raise UsageError("metrion cache: the extension is not loaded; run %load_ext metrion_fixture")
    # $variables and {expressions} in the options, as IPython expands them for any magic line.
    magics.begin_cell(shell.var_expand(line, 1))


# -- loading -------------------------------------------------------------------------------------------

_EVENTS = ("pre_run_cell", "post_run_cell", "post_execute")


def load_ipython_extension(ipython: Any) -> None:
    sources.follow_cells(ipython)  # call records name the cell they came from
    magics = MetrionCacheMagics(ipython)
    ipython.register_magics(magics)
    for event in _EVENTS:
        ipython.events.register(event, getattr(magics, event))
    if rewrite_cell_magic not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(rewrite_cell_magic)


def unload_ipython_extension(ipython: Any) -> None:
    """Remove the magics and turn the cache off."""
    magics = ipython.magics_manager.registry.pop(MetrionCacheMagics.__name__, None)
    if magics is not None:
        for event in _EVENTS:
            try:
                ipython.events.unregister(event, getattr(magics, event))
            except ValueError:
                pass
        magics.unload()
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop(MAGIC, None)
    while rewrite_cell_magic in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(rewrite_cell_magic)
    disable()
