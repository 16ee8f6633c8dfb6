"""The pytest plugin: the ``metrion_cache`` fixture and marker, options, and a summary for CI.

Registered through the ``pytest11`` entry point, so installing the package is enough.
Nothing is patched unless a test asks for the cache (the fixture or the marker) or
``--metrion-cache-all`` turns it on for every test. Each such test gets its own
:class:`~metrion_fixture.CacheSession` (its own stats and records) over a store that
is opened once per URL and shared by the whole run.

Every option of :class:`~metrion_fixture.core.options.CacheOptions` can be set, strongest
first, by the marker, the command line (``--metrion-cache-NAME``), the ini file
(``metrion_cache_NAME``), the environment (``METRION_CACHE_URL``, ``METRION_CACHE_MODE``, ...),
else its default; the flags, ini keys and marker arguments are derived from its fields.

This module is imported at every pytest start-up: it must stay cheap, so httpx,
httpx2, redis and the runtime (the core's engine, the formats, asyncio) are only
imported once a test uses the cache (``tests/test_startup.py``).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _pytest._code.code import (  # the report shapes pytest and pytest-xdist know
    ReprExceptionInfo,
    ReprFileLocation,
    ReprTracebackNative,
)
from _pytest.junitxml import xml_key

from ..core.options import (
    MODE_ENV,  # noqa: F401 - importable from here, as before
    OPTIONS,
    URL_ENV,
    InvalidOption,
    Layer,
    Option,
    ResolvedOptions,
    environment_layer,
    mask_password,
    resolve,
)
from ..errors import MetrionCacheError

if TYPE_CHECKING:
    from ..runtime.session import CacheSession
    from ..stores.base import Store

MARKER = "metrion_cache"
FIXTURE = "metrion_cache"
MARKER_KEYS = tuple(option.name for option in OPTIONS)
WORKER_OUTPUT_KEY = "metrion_cache"
_OPTION = {option.name: option for option in OPTIONS}
# What the report header names first: how the cache behaves and where it keeps its entries.
_HEADER_FIRST = ("mode", "url")

_COUNTERS = ("hits", "misses", "refreshes", "bypassed", "errors", "store_errors", "stored")
# What misses spent and hits saved, from the usage kept with each entry (dollars only for models with a price).
_SAVINGS = ("input_tokens", "output_tokens", "cost_usd", "saved_input_tokens", "saved_output_tokens", "saved_usd")
# Calls whose model has no price: their dollars are unknown, never $0.
_UNPRICED = ("unpriced_spent", "unpriced_saved")


# The summary's wording, imported when first used: reporting.reports brings the wire formats and
# the ledger (asyncio), which a run that does not use the cache never needs (tests/test_startup.py).
def dollars(value: float | None, unpriced: int = 0) -> str:
    from ..reporting.reports import dollars

    return dollars(value, unpriced)


def plural(count: int, word: str, many: str | None = None) -> str:
    from ..reporting.reports import plural

    return plural(count, word, many)


def tokens(count: int) -> str:
    from ..reporting.reports import tokens

    return tokens(count)


def duration(seconds: float) -> str:
    from ..reporting.reports import duration

    return duration(seconds)


# --- options ------------------------------------------------------------------------------------


def _dest(option: Option) -> str:
    return f"metrion_cache_{option.name}"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("metrion-cache", "LLM response cache (metrion-fixture)")
    for option in OPTIONS:
        env = f"; env: {option.env}" if option.env else ""
        group.addoption(
            option.pytest_flag,
            dest=_dest(option),
            **option.flag_arguments,
            default=None,
            help=f"{option.spec.help}. ini: {option.ini}{env}",
        )
    group.addoption(
        "--metrion-cache-require-store",
        dest="metrion_cache_require_store",
        action="store_true",
        default=False,
        help="fail the run when the cache store cannot be reached (by default the tests go on without the cache). "
        "ini: metrion_cache_require_store",
    )
    group.addoption(
        "--metrion-cache-all",
        dest="metrion_cache_all",
        action="store_true",
        default=False,
        help="use the cache in every test, without the fixture or the marker. ini: metrion_cache_all",
    )
    group.addoption(
        "--metrion-cache-warmup",
        dest="metrion_cache_warmup",
        action="store_true",
        default=False,
        help="on a Redis store, fetch at start, in one round trip, the entries each test read the last time it ran "
        "with this option (noted in the store under _warmup:NAMESPACE), instead of a round trip per test: for a "
        "Redis on another host. ini: metrion_cache_warmup",
    )
    for option in OPTIONS:
        parser.addini(option.ini, f"metrion cache {option.name} (see {option.pytest_flag})", default="")
    parser.addini(
        "metrion_cache_all", "use the cache in every test (see --metrion-cache-all)", type="bool", default=False
    )
    parser.addini(
        "metrion_cache_warmup",
        "fetch the entries each test read last time, in one round trip (see --metrion-cache-warmup)",
        type="bool",
        default=False,
    )
    parser.addini(
        "metrion_cache_require_store",
        "fail the run when the cache store is unreachable (see --metrion-cache-require-store)",
        type="bool",
        default=False,
    )


def _run_layers(config: pytest.Config) -> tuple[Layer, ...]:
    """The command line, the ini file, the environment and the plugin's own default store, strongest first."""
    default_url = f"sqlite:///{Path(config.rootpath) / '.metrion_cache' / 'cache.sqlite3'}"
    return (
        Layer(
            "command line",
            {option.name: config.getoption(_dest(option)) for option in OPTIONS},
            text=True,
            name_in_messages=lambda option: option.pytest_flag,
        ),
        Layer(
            "ini",
            {option.name: config.getini(option.ini) for option in OPTIONS},
            text=True,
            name_in_messages=lambda option: f"ini option {option.ini}",
        ),
        environment_layer(os.environ, for_pytest=True),
        Layer("default", {"url": default_url}, name_in_messages=lambda option: option.name),
    )


def _marker_layer(values: dict[str, Any]) -> Layer:
    return Layer("marker", values, name_in_messages=lambda option: f"@pytest.mark.{MARKER}({option.name}=...)")


# --- per-run state ------------------------------------------------------------------------------


class _State:
    """What the plugin knows for one pytest run (one per Config: pytester runs nest in one process)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = time.monotonic()  # the run's wall time, printed beside the provider time saved
        self.layers = _run_layers(config)
        try:
            self.base = resolve(*self.layers)
        except InvalidOption as error:
            raise pytest.UsageError(f"metrion cache: {error}") from None
        self.all_tests = bool(config.getoption("metrion_cache_all")) or bool(config.getini("metrion_cache_all"))
        self.require_store = bool(config.getoption("metrion_cache_require_store")) or bool(
            config.getini("metrion_cache_require_store")
        )
        self.warmup = bool(config.getoption("metrion_cache_warmup")) or bool(config.getini("metrion_cache_warmup"))
        self.read_by_test: dict[str, list[str]] = {}  # with the warm-up: the storage keys each test looked up
        self.stores: dict[str, Store] = {}
        self.totals = _empty_totals()
        self._empty: dict[tuple[str, str], bool] = {}  # (url, namespace): held no answer when a replay missed

    def uses_cache(self, item: pytest.Item) -> bool:
        if self.all_tests or FIXTURE in getattr(item, "fixturenames", ()):
            return True
        return item.get_closest_marker(MARKER) is not None

    def options_for(self, item: pytest.Item) -> ResolvedOptions:
        """The run's options, overridden by the markers on the test, its class and its module (closest wins)."""
        given: dict[str, Any] = {}
        for mark in reversed(list(item.iter_markers(MARKER))):
            if len(mark.args) > 1:
                pytest.fail(
                    f"metrion cache: @pytest.mark.{MARKER} takes at most one positional argument (the mode)",
                    pytrace=False,
                )
            unknown = sorted(set(mark.kwargs) - set(MARKER_KEYS))
            if unknown:
                pytest.fail(
                    f"metrion cache: unknown {MARKER} marker argument(s) {', '.join(unknown)}; "
                    f"use {', '.join(MARKER_KEYS)}",
                    pytrace=False,
                )
            values = dict(mark.kwargs)
            if mark.args:
                values["mode"] = mark.args[0]
            given.update((name, value) for name, value in values.items() if value is not None)
        if not given:
            return self.base  # the run's own options were checked at start-up
        try:
            return resolve(_marker_layer(given), *self.layers)
        except InvalidOption as error:
            problem = f"metrion cache: {error}"
        pytest.fail(problem, pytrace=False)  # outside the except block: no chained traceback

    def open_session(self, resolved: ResolvedOptions, nodeid: str = "") -> CacheSession:
        from ..runtime import sources
        from ..runtime.session import CacheSession

        options = resolved.options
        if options.source is None and nodeid:
            # The test's records name it (cut to what a source holds); a given source wins.
            options = options.replace(source=sources.fit(nodeid))
        problem = None
        try:
            session = CacheSession(options=options)
        except MetrionCacheError as error:  # an unsupported store URL: only opening the store tells
            problem = f"metrion cache: {resolved.origin('url').where or 'url'}: {error}"
        if problem is not None:
            pytest.fail(problem, pytrace=False)  # outside the except block: no chained traceback
        # open_store shares one store per URL, so a session per test is not a connection per test;
        # remembered here to be closed when the run ends.
        self.stores[session.url] = session.store
        return session

    def finish(self, nodeid: str, session: CacheSession) -> None:
        """Add one test's session to the run's totals."""
        stats, calls, totals = session.stats, session.calls, self.totals
        totals["tests"] += 1
        for name in (*_COUNTERS, *_SAVINGS):
            totals[name] = totals.get(name, 0) + getattr(stats, name, 0)
        for call in calls:
            if call.cost_usd is None and call.input_tokens is not None:
                totals["unpriced_spent"] += 1
            if call.saved_usd is None and (call.saved_input_tokens or call.saved_output_tokens):
                totals["unpriced_saved"] += 1
        totals["saved_seconds"] += stats.saved_seconds
        if session.url not in totals["urls"]:
            totals["urls"].append(session.url)
        if stats.store_errors:
            # The store failed in this test: whatever reached the provider went without the cache.
            totals["without_store"] += sum(1 for call in calls if call.status in ("MISS", "REFRESH"))
            if session.url not in totals["down_urls"]:
                totals["down_urls"].append(session.url)
        missed = [call for call in calls if call.status == "MISS"]
        if missed:
            models = sorted({call.model for call in missed})
            totals["missed_tests"].append({"nodeid": nodeid, "misses": len(missed), "models": models})
        misses = _replay_misses(session)
        empty = bool(misses) and self.store_was_empty(session)
        for call in misses:
            totals["replay_misses"].append(
                {
                    "nodeid": nodeid,
                    "model": call.model,
                    "key": call.key,
                    "store_down": call.refusal == "store_down",
                    "empty_store": empty and call.refusal == "replay_miss",
                }
            )

    def note_reads(self, nodeid: str, session: CacheSession) -> None:
        """With the warm-up: the storage keys one test looked up in the run's store, for the next run."""
        if self.warmup and session.options.url == self.base.options.url and session.settings.scope == "shared":
            from ..runtime.warmup import keys_read

            self.read_by_test[nodeid] = keys_read(session.settings.namespace, session.calls)

    def store_was_empty(self, session: CacheSession) -> bool:
        """Whether the session's store holds no answer at all in its namespace (asked once per run)."""
        where = (session.url, session.settings.namespace)
        if where not in self._empty:
            try:
                keys = session.store.keys(f"{session.settings.namespace}:")
            except Exception:  # noqa: BLE001 - a store that fails here is reported as down elsewhere
                keys = ["?"]
            from ..core.flow import LOCK_SUFFIX

            self._empty[where] = all(key.endswith(LOCK_SUFFIX) for key in keys)  # a lock is not an answer
        return self._empty[where]

    def merge(self, other: dict[str, Any]) -> None:
        """Add an xdist worker's totals."""
        totals = self.totals
        for name in ("tests", "without_store", "saved_seconds", *_COUNTERS, *_SAVINGS, *_UNPRICED):
            totals[name] = totals.get(name, 0) + other.get(name, 0)
        for name in ("urls", "down_urls"):
            totals[name].extend(url for url in other.get(name, []) if url not in totals[name])
        for name in ("missed_tests", "replay_misses"):
            totals[name].extend(other.get(name, []))
        totals["warmed"] = max(totals["warmed"], other.get("warmed", 0))  # each worker warms the whole run

    def close(self) -> None:
        for store in self.stores.values():
            try:
                store.close()
            except Exception:  # noqa: BLE001, S110 - closing a store that is down must not fail the run
                pass
        self.stores.clear()


def _empty_totals() -> dict[str, Any]:
    # Plain types only: xdist workers send it to the controller.
    totals: dict[str, Any] = {name: 0 for name in ("tests", "without_store", *_COUNTERS, *_SAVINGS, *_UNPRICED)}
    totals.update(saved_seconds=0.0, urls=[], down_urls=[], missed_tests=[], replay_misses=[], warmed=0)
    return totals


def _replay_misses(session: CacheSession) -> list[Any]:
    # The cache's own refusals in replay mode: no entry, or the store could not be read (its record says which).
    return [call for call in session.calls if call.refusal in ("replay_miss", "store_down")]


_STATE = pytest.StashKey[_State]()
_ACTIVE = pytest.StashKey["tuple[CacheSession, ResolvedOptions]"]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}({', '.join(f'{name}=None' for name in MARKER_KEYS)}): use the metrion LLM response cache in "
        "this test (or every test of the class or module), with these settings over the command line's",
    )
    config.stash[_STATE] = _State(config)
    from ..reporting import run_summary

    run_summary.silence()  # enable() in the code under test: this run's summary is the plugin's


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    state = config.stash.get(_STATE, None)
    if state is None:
        return None
    names = (*_HEADER_FIRST, *(name for name in MARKER_KEYS if name not in _HEADER_FIRST))
    chosen = []
    for name in names:
        origin = state.base.origin(name)
        if origin.source != "default":
            given = str(origin.given).strip()
            chosen.append(f"{name}={mask_password(given) if name == 'url' else given} ({origin.source})")
    if not chosen and not state.all_tests:
        return None
    scope = "every test" if state.all_tests else "tests with the fixture or marker"
    return [f"metrion cache: {', '.join(chosen) or 'defaults'}; {scope}"]


# --- the fixture and the marker -----------------------------------------------------------------


@pytest.fixture
def metrion_cache(request: pytest.FixtureRequest) -> Iterator[CacheSession]:
    """The LLM response cache, active for this test; returns the test's ``CacheSession``.

    ``metrion_cache.stats`` (hits, misses, ...) and ``metrion_cache.calls`` cover
    this test's requests only. Settings: ``@pytest.mark.metrion_cache(...)``, then
    the command line, the ini file, the environment.
    """
    from ..api import covering_process

    state = request.config.stash[_STATE]
    resolved = state.options_for(request.node)
    session = state.open_session(resolved, request.node.nodeid)
    request.node.stash[_ACTIVE] = (session, resolved)
    try:
        # The ledger written by its thread, many tests in one batch; what is left when the run ends.
        with covering_process(session, ledger_now=False):
            yield session
    finally:
        state.finish(request.node.nodeid, session)
        state.note_reads(request.node.nodeid, session)
        del request.node.stash[_ACTIVE]  # the reports are made; do not keep every test's records to the end


@pytest.fixture(autouse=True)
def _metrion_cache_autouse(request: pytest.FixtureRequest) -> None:
    """Start the cache before the test's other fixtures, where the marker, fixture or --metrion-cache-all asks."""
    state = request.config.stash.get(_STATE, None)
    if state is None:
        return
    if state.uses_cache(request.node):
        request.getfixturevalue(FIXTURE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Sessions that outlive a test (``enable()`` in the code under test) name the running test in their records."""
    from ..runtime import sources

    sources.enter(item.nodeid)
    try:
        return (yield)
    finally:
        sources.leave(item.nodeid)


# --- replay misses: the test fails, and says how to record --------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        active = item.stash.get(_ACTIVE, None)
        misses = _replay_misses(active[0]) if active is not None else []
        if active is not None and misses:
            # The cache's record says the test asked replay for what it does not hold: its message is the
            # failure, in place of the SDK's traceback, and the short summary says "replay miss", not the
            # SDK's exception name (which reads like a provider outage in CI logs).
            session, resolved = active
            state = item.config.stash[_STATE]
            text = _replay_failure_text(item, session, resolved, state.store_was_empty(session))
            where = _test_line(item, call)
            if where is not None and call.excinfo is not None:
                text += f"\n(the test stopped at {where} on {call.excinfo.typename}: the SDK's form of this refusal)"
            report.longrepr = replay_miss_repr(text, _replay_headline(session, misses), where)
    return report


def _test_line(item: pytest.Item, call: pytest.CallInfo[None]) -> str | None:
    """``test_llm.py:12``: the test's own line the failure passed through (the SDK raised deeper down)."""
    if call.excinfo is None:
        return None
    path = getattr(item, "path", None)
    for entry in reversed(call.excinfo.traceback):
        if entry.path == path:
            return f"{item.location[0]}:{entry.lineno + 1}"
    return None


def replay_miss_repr(text: str, headline: str, where: str | None) -> ReprExceptionInfo:
    """A replay miss as a test failure: the cache's message in place of a traceback, and a headline.

    Built from pytest's own report shapes, so that pytest-xdist carries it from the workers whole:
    the headline is what pytest shows after "FAILED nodeid - " and JUnit XML's failure message.
    """
    path, _, line = (where or ":0").rpartition(":")
    lines = [row + "\n" for row in text.splitlines()]
    return ReprExceptionInfo(
        reprtraceback=ReprTracebackNative(lines), reprcrash=ReprFileLocation(path, int(line), headline)
    )


def _replay_headline(session: CacheSession, misses: list[Any]) -> str:
    if any(call.refusal == "store_down" for call in misses):
        return f"metrion cache replay: the store {session.url} could not be read"
    models = ", ".join(sorted({repr(call.model) for call in misses}))
    if len(misses) == 1:
        return f"metrion cache replay miss: model {models} (key {misses[0].key[:12]}) is not in the cache"
    return f"metrion cache replay miss: {plural(len(misses), 'answer')} not in the cache (model {models})"


def _replay_failure_text(item: pytest.Item, session: CacheSession, resolved: ResolvedOptions, empty_store: bool) -> str:
    misses = _replay_misses(session)
    answers = "\n".join(
        f"  model {call.model!r}  key {call.key}  ({call.wire_format}, {'stream' if call.stream else 'json'})"
        for call in misses
    )
    if any(call.refusal == "store_down" for call in misses):
        return (
            f"{item.nodeid}: the cache store {session.url} could not be read, and in replay mode the provider "
            f"is never called, so these requests failed:\n{answers}\n"
            f"Check that the store is running and that the URL is right "
            f"({_OPTION['url'].pytest_flag}, ini {_OPTION['url'].ini} or ${URL_ENV})."
        )
    text = (
        f"{item.nodeid} asked for {plural(len(misses), 'answer')} that "
        f"{'are' if len(misses) != 1 else 'is'} not in the cache ({session.url}, namespace "
        f"{session.settings.namespace!r}); in replay mode the provider is never called:\n{answers}\n"
    )
    if empty_store:
        text += EMPTY_STORE_HINT + "\n"
    return text + _record_hint(item, resolved, session.url)


# Replay against a store with nothing in it: in CI, most often the cache was never restored.
EMPTY_STORE_HINT = (
    "the store holds no answers at all: if this runs in CI, the step that restores the cache before pytest "
    "did not run or found nothing (e.g. actions/cache with path .metrion_cache)."
)


def _record_hint(item: pytest.Item, resolved: ResolvedOptions, session_url: str) -> str:
    mode = resolved.origin("mode")
    if mode.source == "marker":
        return (
            f"Its {MARKER} marker sets mode={mode.given!r}: set it to 'true' (or remove it) and run "
            f"with a provider key to record:\n  pytest {shlex.quote(item.nodeid)}"
        )
    command = ["pytest", f"{_OPTION['mode'].pytest_flag}=true"]
    config = item.config
    if config.getoption("metrion_cache_all"):
        command.append("--metrion-cache-all")
    for option in OPTIONS:
        origin = resolved.origin(option.name)
        if option.name != "mode" and origin.source == "command line":
            value = session_url if option.name == "url" else str(origin.given).strip()  # the URL's password masked
            command.append(f"{option.pytest_flag}={value}")
    command.append(item.nodeid)
    return "To record it, run with a provider key:\n  " + " ".join(shlex.quote(part) for part in command)


# --- the summary (and xdist totals) -------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    """With --metrion-cache-require-store, a store that does not answer stops the run before any test."""
    state = session.config.stash.get(_STATE, None)
    url = state.base.options.url if state is not None else None
    if state is None or not state.require_store or state.base.options.mode == "off" or url is None:
        return
    from ..stores import open_store

    problem = None
    try:
        store = state.stores[url] = open_store(url)
        store.get(_PROBE_KEY)
    except Exception as error:  # noqa: BLE001 - whatever the store raises, it is unreachable
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        pytest.exit(
            f"metrion cache: the store {mask_password(url)} is unreachable ({problem}) and "
            "--metrion-cache-require-store is set",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


_PROBE_KEY = "_metrion_probe"  # read, never written: any answer, even "absent", means the store is there

# Stores whose reads the warm-up can save: a Redis near cache (SQLite and memory make no round trip).
_WARMABLE = ("redis://", "rediss://", "unix://")
WARMUP_OUTPUT_KEY = "metrion_cache_warmup"


def _warmup_store(state: _State) -> Store | None:
    """The run's store, if the warm-up applies to it: on, a Redis URL, a mode that reads, a ledger kept."""
    options = state.base.options
    url = options.url
    if not state.warmup or url is None or not url.startswith(_WARMABLE) or options.mode == "off":
        return None
    if not options.ledger_retention:  # no record of the run's calls kept in the store: nor of its tests
        return None
    from ..stores import open_store

    store = state.stores[url] = open_store(url)
    return store


def pytest_collection_finish(session: pytest.Session) -> None:
    """With --metrion-cache-warmup: the entries the previous run of these tests read, fetched in one round trip.

    Covers the run's own store (a test whose marker names another reads as usual). Whatever fails (no
    index yet, a store that is down) only leaves the reads as they were.
    """
    state = session.config.stash.get(_STATE, None)
    if state is None or not state.warmup or state.base.options.mode not in ("true", "replay"):
        return
    tests = [item.nodeid for item in session.items if state.uses_cache(item)]
    if not tests:
        return
    try:
        store = _warmup_store(state)
        if store is not None:
            from ..runtime import warmup

            state.totals["warmed"] = warmup.warm(store, warmup.read_index(store, state.base.options.namespace), tests)
    except Exception:  # noqa: BLE001, S110 - the warm-up only saves time: the tests read as they would have
        pass


def _save_warmup_index(state: _State) -> None:
    """What each test of the run read, for the next run's warm-up (one read and one write of the index)."""
    if not state.read_by_test:
        return
    try:
        store = _warmup_store(state)
        if store is not None:
            from ..runtime import warmup

            options = state.base.options
            warmup.update_index(store, options.namespace, state.read_by_test, options.ledger_retention)
    except Exception:  # noqa: BLE001, S110 - the next run reads as if it had no warm-up
        pass


@pytest.hookimpl(tryfirst=True)  # before junitxml writes its file
def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    _flush_ledgers()
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[WORKER_OUTPUT_KEY] = state.totals
        workeroutput[WARMUP_OUTPUT_KEY] = state.read_by_test  # the controller writes the index once
        return
    _save_warmup_index(state)
    totals = state.totals
    if state.require_store and totals["store_errors"] and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    xml = config.stash.get(xml_key, None)
    if xml is not None and totals["tests"]:
        for name, value in junit_properties(totals).items():
            xml.add_global_property(name, value)


def _flush_ledgers() -> None:
    """The run's calls into the store's ledger now (each test's end left them to the ledger thread)."""
    ledger = sys.modules.get("metrion_fixture.runtime.ledger")  # imported only if a test used the cache
    if ledger is not None:
        ledger.flush_all()


def junit_properties(totals: dict[str, Any]) -> dict[str, int | float]:
    """The run's figures as JUnit XML properties (``metrion_cache_hits``, ..., ``metrion_cache_saved_usd``)."""
    figures: dict[str, int | float] = {
        "tests": totals["tests"],
        "requests": sum(totals[name] for name in ("hits", "misses", "refreshes", "bypassed", "errors")),
        **{name: totals[name] for name in (*_COUNTERS, *_SAVINGS, *_UNPRICED)},
        "replay_misses": len(totals["replay_misses"]),
        "saved_seconds": totals["saved_seconds"],
    }
    return {f"metrion_cache_{name}": round(value, 6) for name, value in figures.items()}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, on the controller: add a finished worker's totals."""
    state = node.config.stash.get(_STATE, None)
    data = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT_KEY)
    if state is not None and data:
        state.merge(data)
    read_by_test = getattr(node, "workeroutput", {}).get(WARMUP_OUTPUT_KEY)
    if state is not None and read_by_test:
        state.read_by_test.update(read_by_test)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or getattr(config, "workeroutput", None) is not None or not state.totals["tests"]:
        return
    terminalreporter.write_sep("-", "metrion cache")
    lines = summary_lines(
        state.totals,
        verbose=config.get_verbosity() > 0,
        require_store=state.require_store,
        wall_seconds=time.monotonic() - state.started,
    )
    for line in lines:
        terminalreporter.write_line(line)


def _tokens_line(totals: dict[str, Any]) -> str:
    spent = f"{tokens(totals['input_tokens'])} in / {tokens(totals['output_tokens'])} out"
    saved = f"{tokens(totals['saved_input_tokens'])} in / {tokens(totals['saved_output_tokens'])} out"
    return (
        f"tokens spent {spent} ({dollars(totals['cost_usd'], totals['unpriced_spent'])}), "
        f"tokens saved {saved} ({dollars(totals['saved_usd'], totals['unpriced_saved'])}) at list prices"
    )


def summary_lines(
    totals: dict[str, Any], *, verbose: bool, require_store: bool = False, wall_seconds: float | None = None
) -> list[str]:
    requests = sum(totals[name] for name in ("hits", "misses", "refreshes", "bypassed", "errors"))
    parts = [
        plural(totals["hits"], "hit"),
        plural(totals["misses"], "miss"),
        plural(totals["refreshes"], "refresh"),
        plural(totals["errors"], "error"),
    ]
    if totals["bypassed"]:
        parts.append(f"{totals['bypassed']} bypassed")
    lines = [
        (
            f"{plural(totals['tests'], 'test')} used the cache: {plural(requests, 'request')}: {', '.join(parts)}; "
            f"provider time saved {totals['saved_seconds']:.2f} s"
            # A sum over calls: with tests on several workers it can exceed the time the run saved.
            + (f" (summed over calls), wall time {duration(wall_seconds)}" if wall_seconds is not None else "")
        ),
        _tokens_line(totals),
        f"store: {', '.join(totals['urls'])}",
    ]
    if totals.get("warmed"):
        lines.append(f"warm-up: {plural(totals['warmed'], 'entry', 'entries')} read ahead in one round trip")
    if totals["store_errors"] and require_store:
        lines.append("the run fails: the cache store was unreachable and --metrion-cache-require-store is set")
    if totals["store_errors"]:
        lines.append(
            f"the cache store was unreachable ({', '.join(totals['down_urls'])}, "
            f"{plural(totals['store_errors'], 'failed read or write', 'failed reads or writes')}): "
            f"{plural(totals['without_store'], 'request')} went to the provider without it"
        )
    replay = totals["replay_misses"]
    if replay:
        store_down = sum(1 for miss in replay if miss["store_down"])
        lines.append(
            f"replay: {plural(len(replay), 'request')} could not be answered "
            f"({len(replay) - store_down} not cached, {store_down} with the store unreachable); "
            "their tests failed without calling the provider:"
        )
        lines.extend(
            f"  {miss['nodeid']}  model {miss['model']!r}  key {miss['key']}"
            + ("  (store unreachable)" if miss["store_down"] else "")
            for miss in replay
        )
        if any(miss.get("empty_store") for miss in replay):
            lines.append("replay: " + EMPTY_STORE_HINT)
    missed = totals["missed_tests"]
    if missed and verbose:
        lines.append("tests that called the provider (cache misses):")
        lines.extend(
            f"  {test['nodeid']}  {plural(test['misses'], 'miss')} ({', '.join(test['models'])})" for test in missed
        )
    elif missed:
        lines.append(f"{plural(len(missed), 'test')} called the provider (-v lists them)")
    return lines
