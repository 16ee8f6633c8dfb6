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
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from ..api import covering_process, disable, enable
from ..core.options import OPTIONS, CacheOptions, InvalidOption, environment_layer, flag_layer, resolve
from ..core.stats import Ledger
from ..errors import MetrionCacheError
from ..reporting.reports import money
from ..runtime import sources
from ..runtime.activation import active_session, enabled_session
from ..runtime.session import CacheSession

__all__ = ["CacheReport", "MetrionCacheMagics", "begin_cell", "load_ipython_extension", "unload_ipython_extension"]

MAGIC = "metrion_cache"
ACTIONS = ("on", "off", "refresh", "status", "clear")
USAGE = (
    "%metrion_cache on|off|refresh|status|clear "
    + " ".join(f"[{option.flag} {option.spec.metavar}]" for option in OPTIONS)
    + " (or %%metrion_cache [options] on the first line of a cell)"
)
_SESSION_OPTIONS = tuple(option.name for option in OPTIONS)
_OPTIONS_TAKEN = {"on": _SESSION_OPTIONS, "off": (), "refresh": (), "status": (), "clear": ("url", "namespace")}
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


@dataclass(frozen=True)
class CacheReport:
    """What one cell's calls did: shown as HTML in Jupyter and as one line of text elsewhere."""

    from_cache: int = 0
    from_provider: int = 0
    refreshed: int = 0  # of from_provider: calls that replaced their cached answer
    errors: int = 0  # answered by the cache itself with an error (a replay miss, a bad header)
    saved_seconds: float = 0.0
    saved_tokens: int = 0  # input + output tokens of the answers served from the cache
    saved_usd: float = 0.0  # their list price, for models in the price table

    @property
    def calls(self) -> int:
        return self.from_cache + self.from_provider + self.errors

    def _parts(self) -> list[str]:
        provider = f"{self.from_provider} from the provider"
        if self.refreshed:
            provider += f" ({self.refreshed} refreshed)"
        parts = [f"{self.from_cache} from cache", provider]
        if self.errors:
            parts.append(f"{self.errors} refused by the cache")
        if self.from_cache:
            parts.append(f"{format_seconds(self.saved_seconds)} saved")
        if self.saved_tokens:
            dollars = f" ({money(self.saved_usd)})" if self.saved_usd else ""
            parts.append(f"{self.saved_tokens:,} tokens saved{dollars}")
        return parts

    @property
    def text(self) -> str:
        return "metrion cache: " + ", ".join(self._parts())

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:  # the text/plain form a terminal IPython prints
        return self.text

    def _repr_html_(self) -> str:
        color, label = ("#1a7f37", "cached") if self.from_cache else ("#6e7781", "provider")
        badge = (
            f'<span style="background:{color};color:#fff;border-radius:4px;padding:1px 6px;'
            f'font-size:0.85em;font-weight:600;font-family:sans-serif">{label}</span>'
        )
        body = html.escape(", ".join(self._parts()))
        return (
            f'<div class="metrion-cache-report" style="font-family:sans-serif;font-size:0.9em">'
            f"{badge} <span>metrion cache: {body}</span></div>"
        )


def format_seconds(seconds: float) -> str:
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
        for ledger, before in self.baseline.values():
            for i, now in enumerate(_snapshot(ledger)):
                delta[i] += now - before[i]
        hits, misses, refreshes, bypassed, errors, saved, saved_in, saved_out, saved_usd = delta
        return CacheReport(
            from_cache=int(hits),
            from_provider=int(misses + refreshes + bypassed),
            refreshed=int(refreshes),
            errors=int(errors),
            saved_seconds=saved,
            saved_tokens=int(saved_in + saved_out),
            saved_usd=saved_usd,
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

    # The docstring is the help of ``%metrion_cache?``; magic_arguments appends the options.
    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        choices=ACTIONS,
        help="on: cache every LLM call of this kernel; off: stop; refresh: the next cell's calls go to "
        "the provider and replace their cached answers; status: store, mode, TTL, namespace and counts; "
        "clear: delete this namespace's entries. Without an action: status. Not used by %%%%metrion_cache.",
    )
    @_option_arguments
    @line_cell_magic
    def metrion_cache(self, line: str, cell: str | None = None) -> None:
        """Cache LLM calls (Anthropic, OpenAI and compatible SDKs, sync and async) in this kernel.

        %metrion_cache on [options]   every call of the kernel, until %metrion_cache off
        %metrion_cache off
        %metrion_cache refresh        the next cell calls the provider again and replaces the answers
        %metrion_cache status
        %metrion_cache clear          delete this namespace's entries (and say how many)

        %%metrion_cache [options]     on the first line of a cell: only that cell is cached,
                                      top-level await included; what was active before is restored.

        After each cell that made cached calls, one line says how many answers came from the
        cache, how many from the provider, and the time saved.
        """
        if cell is not None:
            return self._run_cell_fallback(line, cell)
        args = self._parse(line)
        action = args.action or "status"
        given = [name for name in _SESSION_OPTIONS if getattr(args, name) is not None]
        unwanted = [_FLAG[name] for name in given if name not in _OPTIONS_TAKEN[action]]
        if unwanted:
            raise _error(f"'{action}' takes no {' or '.join(unwanted)} option; usage: {USAGE}")
        getattr(self, f"_{action}")(args)

    # -- actions

    def _on(self, args: Any) -> None:
        try:
            session = enable(options=self._session_options(args), report=False)  # each cell reports
        except MetrionCacheError as error:
            raise _error(error) from None
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
        if session is None:
            print("metrion cache: off (turn it on with %metrion_cache on)")
            return
        enabled = enabled_session()
        if session is enabled:
            state = "on"
        elif enabled is not None and session.ledger is enabled.ledger:
            state = "on, refreshing this cell"
        else:
            state = "on inside this block or cell only"
        stats = session.stats
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
            f"  entries    {entries}",
            (
                f"  calls      {stats.requests} ({stats.hits} from cache, {stats.misses} missed, "
                f"{stats.refreshes} refreshed, {stats.bypassed} bypassed, {stats.errors} refused), "
                f"{format_seconds(stats.saved_seconds)} saved"
            ),
        ]
        if stats.store_errors:
            lines.append(f"  store errors {stats.store_errors} (those calls went to the provider uncached)")
        if self._refresh_armed:
            lines.append("  next cell  refresh")
        print("\n".join(lines))

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
