"""Every cache option in one frozen dataclass, checked when it is made, and where each value came from.

An option is one field of :class:`CacheOptions`: its default, the check that refuses a bad value
(saying what to change), and, as field metadata, how people set it outside Python: an environment
variable, a pytest flag and ini key, the magic's and the CLI's flag. The library API, the pytest
plugin, the ``%metrion_cache`` magic and the CLI derive their options from these fields, so a new
option is a new field (and its key in :class:`CacheOptionValues`, for type checkers).

Values come in layers, strongest first: a call's arguments, a pytest marker, the command line,
an ini file, the environment, the default. :func:`resolve` takes the layers a surface has and
returns the options with the origin of each value, which messages and the pytest header name.
No I/O here: callers pass the environment in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from ..errors import MetrionCacheError
from .breaker import DEFAULT_COOLDOWN_SECONDS
from .directives import (
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_NAMESPACE,
    DEFAULT_SINGLE_FLIGHT_WAIT,
    DEFAULT_TTL_SECONDS,
    check_namespace,
    check_session_mode,
    check_ttl,
)
from .scope import SCOPE_ENV, check_scope
from .stats import DEFAULT_MAX_RECORDS

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "DEFAULT_RETENTION_SECONDS",
    "DEFAULT_SINGLE_FLIGHT_WAIT",
    "MODE_ENV",
    "OPTIONS",
    "OPTION_NAMES",
    "RETENTION_ENV",
    "SCOPE_ENV",
    "SOURCES",
    "REPORT_ENV",
    "SOURCE_ENV",
    "STORE_PREVIEWS_ENV",
    "URL_ENV",
    "CacheOptionValues",
    "CacheOptions",
    "InvalidOption",
    "Layer",
    "Option",
    "OptionSpec",
    "Origin",
    "ResolvedOptions",
    "argument_layer",
    "check_on_call",
    "check_report",
    "environment_layer",
    "flag_layer",
    "mask_password",
    "options_from_arguments",
    "resolve",
]

URL_ENV = "METRION_CACHE_URL"
MODE_ENV = "METRION_CACHE_MODE"
RETENTION_ENV = "METRION_CACHE_LEDGER_RETENTION"
SOURCE_ENV = "METRION_CACHE_SOURCE"
STORE_PREVIEWS_ENV = "METRION_CACHE_STORE_PREVIEWS"
REPORT_ENV = "METRION_CACHE_REPORT"  # enable()'s summary line at exit: 0 turns it off
MAX_SOURCE_CHARS = 200
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600
MAX_SINGLE_FLIGHT_WAIT = 3600.0
MAX_RECORDS_LIMIT = 1_000_000_000  # a deque needs a machine-size bound; this is far beyond any memory anyway

# Strongest first. "argument" is a call's keyword arguments, or the flags of the magic or the CLI.
SOURCES = ("argument", "marker", "command line", "ini", "environment", "default")

_SPEC = "metrion_option"


class InvalidOption(MetrionCacheError):
    """A bad option value: which option, what was wrong, and where the value came from."""

    def __init__(self, option: str, value: object, problem: str, origin: Origin | None = None) -> None:
        self.option, self.value, self.problem, self.origin = option, value, problem, origin
        where = origin.where if origin is not None else None
        super().__init__(f"{where}: {problem}" if where else problem)

    def __reduce__(self) -> tuple[type[InvalidOption], tuple[str, object, str, Origin | None]]:
        return type(self), (self.option, self.value, self.problem, self.origin)  # ValueError's would lose the fields


@dataclass(frozen=True)
class OptionSpec:
    """How one option is checked, and how people set it outside Python."""

    check: Callable[[Any], Any]  # the value as given -> the value kept; raises MetrionCacheError
    help: str
    metavar: str
    from_text: Callable[[str], object] = str  # a command line's, ini file's or environment's text -> a value to check
    env: str | None = None
    # Read by the pytest plugin only: a mode in the environment is for the tests that use the cache,
    # not for every enable() / cache() the code under test (or a script next to it) makes.
    env_for_pytest_only: bool = False
    pytest_flag: str | None = None  # when not --metrion-cache-NAME
    # A blank string is "not given" even from Python: url="" and scope="" have always meant the
    # environment's value, else the default (``enable(url=os.environ.get("MY_URL", ""))``).
    blank_is_unset: bool = False
    # For a yes/no option: the value its flag means when given alone (``--store-previews``).
    flag_alone: str | None = None


def _option(default: Any, **spec: Any) -> Any:
    return field(default=default, metadata={_SPEC: OptionSpec(**spec)})


# -- the checks ---------------------------------------------------------------------------------------


def _check_url(url: object) -> str:
    if not isinstance(url, str):
        raise MetrionCacheError(
            f"invalid url {url!r}; use a store URL such as sqlite:///path, redis://host:6379/0 or memory://name"
        )
    return url.strip()


def _number(value: object, *, whole: bool) -> float | int | None:
    """A finite number (a whole one if ``whole``), or None; booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if whole:
            return int(value) if value.is_integer() else None
    return value


def _number_checker(*, whole: bool, low: float, high: float | None, message: str) -> Callable[[object], float | int]:
    def check(value: object) -> float | int:
        number = _number(value, whole=whole)
        if number is None or number < low or (high is not None and number > high):
            raise MetrionCacheError(message.format(value=value))
        return number if whole else float(number)

    return check


def _number_from_text(text: str) -> object:
    """Text to a number for the checks; text that is no number is handed on as it is, for the check to refuse."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _check_retention(value: object) -> int:
    try:
        if isinstance(value, bool):
            raise MetrionCacheError("a boolean is no duration")
        if value in (0, "0"):
            return 0
        return check_ttl(value)
    except MetrionCacheError:
        raise MetrionCacheError(
            f"invalid ledger_retention {value!r}; use a duration like 30d, 12h or 3600 (seconds), "
            "or 0 to keep no ledger"
        ) from None


def _check_source(value: object) -> str:
    text = value.strip() if isinstance(value, str) else None
    if not text or len(text) > MAX_SOURCE_CHARS or not text.isprintable():
        raise MetrionCacheError(
            f"invalid source {value!r}; use a name of 1 to {MAX_SOURCE_CHARS} printable characters on one line "
            "(such as 'nightly-eval'), or leave it out to name the pytest test, notebook cell or script"
        )
    return text


_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")


def _yes_no_from_text(text: str) -> object:
    """Text to a boolean; other text is handed on as it is, for the check to refuse."""
    lowered = text.strip().lower()
    return True if lowered in _YES else False if lowered in _NO else text


def _check_store_previews(value: object) -> bool:
    if not isinstance(value, bool):
        raise MetrionCacheError(
            f"invalid store_previews {value!r}; use True or False (as text: {', '.join(_YES)} / {', '.join(_NO)})"
        )
    return value


# enable()'s own arguments: not session options (no flag, ini key or marker: the pytest plugin and the
# magic have their own reports), but checked here like every option.


def check_report(report: object, environ: Mapping[str, str]) -> bool:
    """``enable(report=...)``: the argument, else ``$METRION_CACHE_REPORT`` (0, false, no, off: none), else on."""
    if report is None:
        text = environ.get(REPORT_ENV, "").strip()
        if not text:
            return True
        value = _yes_no_from_text(text)
        if not isinstance(value, bool):
            raise MetrionCacheError(
                f"${REPORT_ENV}: invalid value {text!r}; use 0 (no summary line at exit) or 1 (the default)"
            )
        return value
    if not isinstance(report, bool):
        raise MetrionCacheError(f"invalid report {report!r}; use True (a summary line at exit, the default) or False")
    return report


def check_on_call(on_call: object) -> Callable[..., object] | None:
    """``on_call=``: None, or a function that takes each call's record."""
    if on_call is not None and not callable(on_call):
        raise MetrionCacheError(
            f"invalid on_call {on_call!r}; use a function that takes a CallRecord (it is called once per call)"
        )
    return on_call


_check_max_entry_bytes = _number_checker(
    whole=True, low=1, high=None, message="invalid max_entry_bytes {value!r}; use a positive number of bytes"
)
_check_max_records = _number_checker(
    whole=True,
    low=0,
    high=MAX_RECORDS_LIMIT,
    message="invalid max_records {value!r}; use a whole number of records from 0 (keep none; stats still count "
    f"every request) to {MAX_RECORDS_LIMIT:,}",
)
_check_store_cooldown = _number_checker(
    whole=False,
    low=0,
    high=None,
    message="invalid store cool-down {value!r}; use a finite number of seconds >= 0 (0 turns the circuit breaker off)",
)
_check_single_flight_wait = _number_checker(
    whole=False,
    low=0,
    high=MAX_SINGLE_FLIGHT_WAIT,
    message=f"invalid single_flight_wait {{value!r}}; use seconds between 0 (off) and {MAX_SINGLE_FLIGHT_WAIT:g}",
)


# -- the options --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CacheOptions:
    """Every option of a cache session, checked and normalized when made (``ttl="1h"`` becomes 3600).

    A bad value raises :class:`InvalidOption` (a :class:`MetrionCacheError`) at once. ``None`` for
    an option means its default. ``url=None`` means ``METRION_CACHE_URL`` (read by :func:`resolve`),
    else the embedded store the session picks.
    """

    mode: str = _option(
        "true",
        check=check_session_mode,
        metavar="MODE",
        env=MODE_ENV,
        env_for_pytest_only=True,
        pytest_flag="--metrion-cache",
        help="true (default: read and store), refresh (call the provider, replace the entry), off (only requests "
        "with an x-metrion-cache header), replay (read only: a request that is not cached is an error, the "
        "provider is never called)",
    )
    ttl: int = _option(
        DEFAULT_TTL_SECONDS,
        check=check_ttl,
        metavar="SECONDS",
        help="how long new entries live: seconds or a duration like 90m, 12h, 7d (default 7d)",
    )
    namespace: str = _option(
        DEFAULT_NAMESPACE,
        check=check_namespace,
        metavar="NS",
        help=f"keeps these entries apart from others' (default: {DEFAULT_NAMESPACE})",
    )
    url: str | None = _option(
        None,
        check=_check_url,
        metavar="URL",
        env=URL_ENV,
        blank_is_unset=True,
        help="the store: sqlite:///relative/path or sqlite:////absolute/path, redis://HOST[:PORT][/DB], "
        "rediss://..., redis+cluster://HOST:PORT, memory://NAME (default: .metrion_cache/cache.sqlite3)",
    )
    scope: str = _option(
        "shared",
        check=check_scope,
        metavar="SCOPE",
        env=SCOPE_ENV,
        blank_is_unset=True,
        help="shared (default: entries shared within the namespace) or credential (entries private to the API "
        "key that paid for them)",
    )
    max_entry_bytes: int = _option(
        DEFAULT_MAX_ENTRY_BYTES,
        check=_check_max_entry_bytes,
        from_text=_number_from_text,
        metavar="BYTES",
        help=f"answers larger than this are passed on but not stored (default {DEFAULT_MAX_ENTRY_BYTES:,})",
    )
    max_records: int = _option(
        DEFAULT_MAX_RECORDS,
        check=_check_max_records,
        from_text=_number_from_text,
        metavar="N",
        help=f"how many recent requests a session's calls list keeps (default {DEFAULT_MAX_RECORDS:,}; "
        "its stats count them all)",
    )
    store_cooldown: float = _option(
        DEFAULT_COOLDOWN_SECONDS,
        check=_check_store_cooldown,
        from_text=_number_from_text,
        metavar="SECONDS",
        help=f"after a store failure, skip the store for this long (default {DEFAULT_COOLDOWN_SECONDS:g}; "
        "0 turns the circuit breaker off)",
    )
    single_flight_wait: float = _option(
        DEFAULT_SINGLE_FLIGHT_WAIT,
        check=_check_single_flight_wait,
        from_text=_number_from_text,
        metavar="SECONDS",
        help="how long identical concurrent misses wait for the one asking the provider "
        f"(default {DEFAULT_SINGLE_FLIGHT_WAIT:g}; 0: never wait)",
    )
    ledger_retention: int = _option(
        DEFAULT_RETENTION_SECONDS,
        check=_check_retention,
        metavar="DURATION",
        env=RETENTION_ENV,
        help="how long the call ledger in the store keeps each batch: a duration like 30d, 12h or seconds "
        "(default 30d; 0 keeps no ledger)",
    )
    source: str | None = _option(
        None,
        check=_check_source,
        metavar="NAME",
        env=SOURCE_ENV,
        blank_is_unset=True,
        help="where the calls come from, in the ledger and `metrion-cache stats --by source` (default: the "
        "pytest test's node id, the notebook and cell, or the script's name)",
    )
    store_previews: bool = _option(
        False,
        check=_check_store_previews,
        from_text=_yes_no_from_text,
        metavar="BOOL",
        env=STORE_PREVIEWS_ENV,
        flag_alone="true",
        help="keep the first 60 characters of each call's last user message in the ledger, for `metrion-cache "
        "ls` and the dashboard (default false: prompts may be private)",
    )

    def __post_init__(self) -> None:
        for option in OPTIONS:
            value = getattr(self, option.name)
            if value is None or (option.spec.blank_is_unset and isinstance(value, str) and not value.strip()):
                object.__setattr__(self, option.name, option.default)
                continue
            try:
                kept = option.spec.check(value)
            except MetrionCacheError as error:
                raise InvalidOption(option.name, value, str(error)) from None
            object.__setattr__(self, option.name, kept)

    def replace(self, **changes: Unpack[CacheOptionValues]) -> CacheOptions:
        """These options with some changed, checked again; a change of None keeps the value."""
        return _replaced(self, changes)

    def __repr__(self) -> str:  # a store URL's password must not reach logs and tracebacks
        shown = {option.name: getattr(self, option.name) for option in OPTIONS}
        if self.url is not None:
            shown["url"] = mask_password(self.url)
        return "CacheOptions(" + ", ".join(f"{name}={value!r}" for name, value in shown.items()) + ")"


class CacheOptionValues(TypedDict, total=False):
    """The options as callers pass them (before checks), for ``**options: Unpack[CacheOptionValues]``.

    One key per :class:`CacheOptions` field (a test holds them equal); ``None`` means "not given".
    """

    mode: str | None
    ttl: int | str | None
    namespace: str | None
    url: str | None
    scope: str | None
    max_entry_bytes: int | None
    max_records: int | None
    store_cooldown: float | None
    single_flight_wait: float | None
    ledger_retention: int | str | None
    source: str | None
    store_previews: bool | None


@dataclass(frozen=True)
class Option:
    """One field of :class:`CacheOptions`, with the names each surface gives it."""

    name: str
    default: Any
    spec: OptionSpec

    @property
    def flag(self) -> str:
        """The magic's and the CLI's flag."""
        return "--" + self.name.replace("_", "-")

    @property
    def flag_arguments(self) -> dict[str, Any]:
        """How an argparse surface (the CLI, the magic, pytest) adds the option's flag, besides its name."""
        if self.spec.flag_alone is None:
            return {"metavar": self.spec.metavar}
        return {"metavar": self.spec.metavar, "nargs": "?", "const": self.spec.flag_alone}

    @property
    def pytest_flag(self) -> str:
        return self.spec.pytest_flag or "--metrion-cache-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return f"metrion_cache_{self.name}"

    @property
    def env(self) -> str | None:
        return self.spec.env


OPTIONS: tuple[Option, ...] = tuple(
    Option(each.name, each.default, each.metadata[_SPEC]) for each in dataclasses.fields(CacheOptions)
)
OPTION_NAMES = tuple(option.name for option in OPTIONS)


# -- layers and their resolution ----------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where an option's value came from."""

    source: str  # one of SOURCES
    given: object  # the value as that source gave it, before the check; the default's value for "default"
    where: str | None = None  # how a message names it ("--metrion-cache-ttl", "$METRION_CACHE_MODE"); None: plain


@dataclass(frozen=True)
class Layer:
    """The values one source gives: a call's arguments, a marker, a command line, an ini file, the environment.

    ``text``: the values are text a person typed (flags, ini, environment): surrounding spaces are
    dropped, a blank value is not a value, and numbers are read from the text before the check.
    ``name_in_messages`` names an option of this source in an error (e.g. ``--metrion-cache-ttl``).
    """

    source: str
    values: Mapping[str, object]
    text: bool = False
    name_in_messages: Callable[[Option], str] | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown option source {self.source!r}; use one of {', '.join(SOURCES)}")
        unknown = sorted(set(self.values) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown cache option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_NAMES)}")

    def value_of(self, option: Option) -> tuple[bool, object]:
        """(True, the value to check) if this layer sets the option, else (False, None)."""
        value = self.values.get(option.name)
        if value is None:
            return False, None
        if isinstance(value, str) and (self.text or option.spec.blank_is_unset):
            if not value.strip():
                return False, None
            if self.text:
                return True, option.spec.from_text(value.strip())
        return True, value

    def origin(self, option: Option) -> Origin:
        where = self.name_in_messages(option) if self.name_in_messages is not None else None
        return Origin(self.source, self.values[option.name], where)


@dataclass(frozen=True)
class ResolvedOptions:
    options: CacheOptions
    origins: Mapping[str, Origin]  # one per option

    def origin(self, name: str) -> Origin:
        return self.origins[name]


def resolve(*layers: Layer) -> ResolvedOptions:
    """The options from the layers, strongest first: for each option, the first layer that sets it, else the default.

    A bad value raises :class:`InvalidOption` naming where it came from.
    """
    chosen: dict[str, Any] = {}  # raw values: the construction checks them
    origins: dict[str, Origin] = {}
    for option in OPTIONS:
        for layer in layers:
            found, value = layer.value_of(option)
            if found:
                chosen[option.name], origins[option.name] = value, layer.origin(option)
                break
        else:
            origins[option.name] = Origin("default", option.default)
    try:
        options = CacheOptions(**chosen)
    except InvalidOption as error:
        raise InvalidOption(error.option, error.value, error.problem, origins[error.option]) from None
    return ResolvedOptions(options, origins)


def argument_layer(values: Mapping[str, object]) -> Layer:
    """A Python call's keyword arguments (``enable(mode="refresh")``): None means not given."""
    return Layer("argument", values)


def flag_layer(values: Mapping[str, object]) -> Layer:
    """The flags of the magic or the CLI, as text: ``--ttl 90m``."""
    return Layer("argument", values, text=True, name_in_messages=lambda option: option.flag)


def environment_layer(environ: Mapping[str, str], *, for_pytest: bool = False) -> Layer:
    values = {
        option.name: environ[option.env]
        for option in OPTIONS
        if option.env and option.env in environ and (for_pytest or not option.spec.env_for_pytest_only)
    }
    return Layer("environment", values, text=True, name_in_messages=lambda option: f"${option.env}")


def options_from_arguments(
    url: str | None,
    options: CacheOptions | None,
    arguments: Mapping[str, object],
    environ: Mapping[str, str],
) -> CacheOptions:
    """The library API's options: ``url`` and keyword arguments over ``options``, else over the environment.

    Options already made are complete, so the environment is not read again for them.
    """
    if url is not None:
        if arguments.get("url") is not None:
            raise TypeError("url given twice: as the first argument and as url=")
        arguments = {**arguments, "url": url}
    if options is None:
        return resolve(argument_layer(arguments), environment_layer(environ)).options
    return _replaced(options, arguments)


def _replaced(options: CacheOptions, changes: Mapping[str, object]) -> CacheOptions:
    """``options`` with the changes an argument layer would give: None and a blank url keep the value."""
    layer = argument_layer(changes)  # refuses unknown names, as a call with them would
    given: dict[str, Any] = {}  # raw values: the construction checks them
    for option in OPTIONS:
        found, value = layer.value_of(option)
        if found:
            given[option.name] = value
    return dataclasses.replace(options, **given) if given else options


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# An @ inside a query value (?client_name=a@b): text after ? or & up to it reads NAME=VALUE.
_QUERY_VALUE_BEFORE = re.compile(r"[?&][A-Za-z_][A-Za-z0-9_]*=[^&]*$")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&]*")
_URL_CUTS = frozenset("/?#")


def userinfo_span(url: str) -> tuple[int, int] | None:
    """Where the user name and password of ``url`` lie (start, end of the text before its ``@``), or None.

    Read on the raw string, as written, not as a URL parser would: a password holding an unencoded
    ``#``, ``/``, ``?`` or ``@`` still ends at the last ``@`` of the authority (an ``@`` in a query
    value, as in ``?client_name=a@b``, is not one), so the whole of it is found whatever it holds.
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None
    start, end = scheme.end(), len(url)
    if url.startswith("/", start):  # sqlite:///path, unix:///path: no authority, an @ is in the path
        return None
    while True:
        at = url.rfind("@", start, end)
        if at < 0:
            return None
        in_query = _QUERY_VALUE_BEFORE.search(url, start, at)
        if in_query is None:
            return start, at
        end = in_query.start()  # the authority, if any, lies before this query


def has_unencoded_userinfo(url: str) -> bool:
    """Whether the user name or password of ``url`` holds a character a URL parser would cut it at."""
    span = userinfo_span(url)
    return span is not None and not _URL_CUTS.isdisjoint(url[span[0] : span[1]])


# An API key in a request URL's query (Gemini's ``?key=``, some gateways' ``api_key`` / ``token``).
_KEY_IN_QUERY = re.compile(r"([?&](?:key|api[-_]key|token)=)[^&\s]*", re.IGNORECASE)


def mask_query_keys(text: str) -> str:
    """A request URL (or a line holding one) fit to print: API keys in its query replaced by ``***``."""
    return _KEY_IN_QUERY.sub(r"\1***", text)


def mask_password(url: str) -> str:
    """A store URL fit to print: any password (in the userinfo or the query) replaced by ``***``.

    The one masking helper (stores and surfaces all use it). It works on the raw string and never
    parses it, so it also masks URLs that fail to parse; a user name is kept unless it is unreadable.
    """
    span = userinfo_span(url)
    if span is not None:
        start, at = span
        user, colon, _ = url[start:at].partition(":")
        if not _URL_CUTS.isdisjoint(user):
            user, colon = "***", ""
        url = f"{url[:start]}{user}{colon and ':***'}{url[at:]}"
    return _PASSWORD_PARAM.sub(r"\1***", url)
