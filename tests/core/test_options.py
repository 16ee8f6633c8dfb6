"""The cache's options: one dataclass, its checks, the layered resolver, and every option on every surface.

The surface tests iterate over SAMPLES, which must name every field of CacheOptions: a new option
without a sample fails here first, and with one it must be accepted by the marker, the command line,
the ini file, the magic, enable(), cache(), CacheSession and the CLI's import, or a test fails.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from typing import Any, get_type_hints

# Imported before any pytester run, as in test_pytest_plugin: modules first imported during an
# in-process run are dropped when its test ends.
import httpcore  # noqa: F401
import httpcore2  # noqa: F401
import pytest
from test_magic import ip, run, shell  # noqa: F401 - the IPython shell fixtures

import metrion_fixture
import metrion_fixture.stores.redis
import metrion_fixture.stores.sqlite
import metrion_fixture.transports.httpx
import metrion_fixture.transports.httpx2  # noqa: F401
from metrion_fixture import CacheSession, MetrionCacheError
from metrion_fixture.cli import main as cli_main
from metrion_fixture.core import scope as scope_module
from metrion_fixture.core.options import (
    DEFAULT_RETENTION_SECONDS,
    MODE_ENV,
    OPTIONS,
    RETENTION_ENV,
    SCOPE_ENV,
    SOURCE_ENV,
    SOURCES,
    STORE_PREVIEWS_ENV,
    URL_ENV,
    CacheOptions,
    CacheOptionValues,
    InvalidOption,
    Layer,
    argument_layer,
    environment_layer,
    flag_layer,
    mask_password,
    resolve,
)
from metrion_fixture.integrations import cassettes
from metrion_fixture.integrations import pytest_plugin as plugin
from metrion_fixture.runtime import ledger
from metrion_fixture.runtime import session as session_module
from metrion_fixture.runtime.activation import active_session, enabled_session

pytest_plugins = ["pytester"]

NAMES = tuple(option.name for option in OPTIONS)
OPTION = {option.name: option for option in OPTIONS}
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
STORE = f"memory://options-{uuid.uuid4().hex}"

# One valid value per option, other than its default: (as Python passes it, as a person types it, as kept).
SAMPLES: dict[str, tuple[Any, str, Any]] = {
    "mode": ("refresh", "refresh", "refresh"),
    "ttl": ("2h", "2h", 7200),
    "namespace": ("options-ns", "options-ns", "options-ns"),
    "url": (STORE, STORE, STORE),
    "scope": ("credential", "credential", "credential"),
    "max_entry_bytes": (4096, "4096", 4096),
    "max_records": (7, "7", 7),
    "store_cooldown": (2.5, "2.5", 2.5),
    "single_flight_wait": (1.5, "1.5", 1.5),
    "ledger_retention": ("12h", "12h", 43200),
    "source": ("nightly-eval", "nightly-eval", "nightly-eval"),
    "store_previews": (True, "true", True),
}
PYTHON_VALUES = {name: sample[0] for name, sample in SAMPLES.items()}
TEXT_VALUES = {name: sample[1] for name, sample in SAMPLES.items()}
EXPECTED = {name: sample[2] for name, sample in SAMPLES.items()}
NUMERIC = tuple(name for name, kind in get_type_hints(CacheOptions).items() if kind in (int, float))
ENV_NAMES = tuple(option.env for option in OPTIONS if option.env)


@pytest.fixture(autouse=True)
def no_cache_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def kept(options: CacheOptions) -> dict[str, Any]:
    return {name: getattr(options, name) for name in NAMES}


# -- the dataclass: defaults, normalization, checks ---------------------------------------------------


def test_every_option_has_a_sample_for_the_surface_tests():
    """SAMPLES names every field: a new option must be tried on every surface below."""
    assert set(SAMPLES) == set(NAMES)
    assert all(EXPECTED[name] != OPTION[name].default for name in NAMES), "samples differ from the defaults"


def test_the_typed_dict_has_one_key_per_option():
    """CacheOptionValues, the type of **options in enable() / cache() / CacheSession, lists every field."""
    assert set(CacheOptionValues.__annotations__) == set(NAMES)


def test_the_defaults():
    """An option not given is its documented default; url None lets the session pick the store."""
    assert kept(CacheOptions()) == {
        "mode": "true",
        "ttl": 7 * 86400,
        "namespace": "metrion",
        "url": None,
        "scope": "shared",
        "max_entry_bytes": 16 * 1024 * 1024,
        "max_records": 10_000,
        "store_cooldown": 10.0,
        "single_flight_wait": 30.0,
        "ledger_retention": 30 * 86400,
        "source": None,
        "store_previews": False,
    }


def test_none_means_the_default():
    assert CacheOptions(**dict.fromkeys(NAMES)) == CacheOptions()


@pytest.mark.parametrize(
    ("name", "given", "expected"),
    [
        ("mode", " REFRESH ", "refresh"),
        ("ttl", "1h", 3600),
        ("ttl", "90m", 5400),
        ("ttl", 7200.0, 7200),
        ("ttl", 400 * 86400, 365 * 86400),
        ("scope", "Credential", "credential"),
        ("scope", "", "shared"),
        ("url", " memory://x ", "memory://x"),
        ("url", "   ", None),
        ("max_entry_bytes", 1024.0, 1024),
        ("max_records", 0, 0),
        ("store_cooldown", 5, 5.0),
        ("store_cooldown", 0, 0.0),
        ("single_flight_wait", 1, 1.0),
        ("single_flight_wait", 3600, 3600.0),
        ("ledger_retention", "12h", 43200),
        ("ledger_retention", "0", 0),
        ("ledger_retention", 0, 0),
        ("source", " nightly eval ", "nightly eval"),
        ("source", "  ", None),
        ("store_previews", False, False),
    ],
)
def test_values_are_normalized(name, given, expected):
    """Durations become seconds, names lower case, numbers their kind; what is kept is what the session uses."""
    value = getattr(CacheOptions(**{name: given}), name)
    assert value == expected and type(value) is type(expected)


BAD_VALUES = {
    "mode": (["bogus", "false", "", 1], "unknown cache mode"),
    "ttl": ([0, -1, "abc", "1.5h", 1.5, [60]], "invalid ttl"),
    "namespace": (["", "a:b", "has space", "A" * 65, 5], "invalid namespace"),
    "url": ([5, b"memory://", ["memory://"]], "invalid url"),
    "scope": (["per-user", "me", 1], "invalid cache scope"),
    "max_entry_bytes": ([0, -1, "1024", 1.5], "invalid max_entry_bytes"),
    "max_records": ([-1, 1.5, "10", 10**10], "invalid max_records"),
    "store_cooldown": ([-1, -0.5, "soon", "10"], "cool-down"),
    "single_flight_wait": ([-1, 3601, "soon", "1"], "invalid single_flight_wait"),
    "ledger_retention": (["soon", -1, 1.5, "-1"], "invalid ledger_retention"),
    "source": (["two\nlines", "x" * 201, 5, ["a"]], "invalid source"),
    "store_previews": (["maybe", 1, "true", 0.0], "invalid store_previews"),
}


def test_every_option_has_bad_values_below():
    assert set(BAD_VALUES) == set(NAMES)


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, (values, _) in BAD_VALUES.items() for value in values]
)
def test_each_check_refuses_a_bad_value_at_once_saying_what_to_change(name, value):
    """Construction refuses a bad value with InvalidOption (a MetrionCacheError, a ValueError) naming the option."""
    with pytest.raises(InvalidOption) as raised:
        CacheOptions(**{name: value})
    error = raised.value
    assert isinstance(error, MetrionCacheError) and isinstance(error, ValueError)
    assert error.option == name and error.value == value
    assert BAD_VALUES[name][1] in str(error) and "; use " in str(error)


def test_the_numeric_options_are_found():
    assert set(NUMERIC) == {
        "ttl",
        "max_entry_bytes",
        "max_records",
        "store_cooldown",
        "single_flight_wait",
        "ledger_retention",
    }


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", NUMERIC)
def test_nan_and_infinities_are_refused_for_every_numeric_option(name, value):
    """store_cooldown=float('nan') used to be accepted: no numeric option takes NaN or an infinity."""
    with pytest.raises(InvalidOption) as raised:
        CacheOptions(**{name: value})
    assert raised.value.option == name


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize("name", NUMERIC)
def test_nan_and_infinities_are_refused_as_text_too(name, text):
    """Typed on a command line, in an ini file or the environment, 'nan' is no number either."""
    with pytest.raises(InvalidOption, match=f"^{OPTION[name].flag}: "):
        resolve(flag_layer({name: text}))


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("name", [name for name in NAMES if name != "store_previews"])
def test_booleans_are_refused_for_every_option(name, value):
    """True is an int to Python, never a TTL, a size or a mode here (only store_previews is a yes/no)."""
    with pytest.raises(InvalidOption):
        CacheOptions(**{name: value})


def test_options_are_frozen_and_replace_checks_again():
    options = CacheOptions(ttl="1h")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.ttl = 5  # type: ignore[misc]
    assert options.replace(ttl="2h", namespace=None).ttl == 7200
    assert options.replace(namespace=None).namespace == "metrion"
    with pytest.raises(InvalidOption, match="cool-down"):
        options.replace(store_cooldown=math.nan)


def test_replace_keeps_what_a_blank_or_none_change_does_not_give():
    options = CacheOptions(url="memory://kept", scope="credential")
    assert options.replace(url="", scope="  ", ttl=None) is options
    with pytest.raises(TypeError, match="ttl_seconds"):
        options.replace(ttl_seconds=60)  # type: ignore[call-arg]


def test_an_invalid_option_survives_pickling():
    """Errors cross process boundaries (multiprocessing, xdist): the fields come along."""
    import pickle

    with pytest.raises(InvalidOption) as raised:
        resolve(flag_layer({"ttl": "soon"}))
    copy = pickle.loads(pickle.dumps(raised.value))
    assert (copy.option, copy.value, str(copy)) == ("ttl", "soon", str(raised.value))


def test_repr_hides_a_store_password():
    options = CacheOptions(url="redis://:s3cret@cache.example.com:6379/0?password=other")
    assert "s3cret" not in repr(options) and "other" not in repr(options)
    assert "redis://:***@cache.example.com:6379/0?password=***" in repr(options)
    assert mask_password("memory://plain") == "memory://plain"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Issue 14, item 7: unencoded characters a URL parser would cut the password at.
        ("redis://:pa#ss-7f3k@h:1/0", "redis://:***@h:1/0"),
        ("redis://:pa/ss-7f3k@h:1/0", "redis://:***@h:1/0"),
        ("redis://:pa?ss-7f3k@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:p@ss:w#rd-7f3k@h:1/0", "redis://user:***@h:1/0"),
        ("redis://ab/c+d==@h/0", "redis://***@h/0"),  # a lone userinfo that cannot be a user name
        ("rediss://default:pw@h:6380?password=x#y&db=1", "rediss://default:***@h:6380?password=***&db=1"),
        # An @ in a query value or in a path is not the end of a userinfo.
        ("redis://h:6379/0?client_name=a@b", "redis://h:6379/0?client_name=a@b"),
        ("redis://:pw@h/0?client_name=a@b", "redis://:***@h/0?client_name=a@b"),
        ("sqlite:////home/me@work/cache.sqlite3", "sqlite:////home/me@work/cache.sqlite3"),
        ("unix://:pw@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("not a url :pw@", "not a url :pw@"),
    ],
)
def test_mask_password_on_the_raw_string(url, shown):
    assert mask_password(url) == shown


# -- the resolver: precedence, origins, messages --------------------------------------------------------


def layers_setting(name: str, values: dict[str, str]) -> list[Layer]:
    """One layer per source, strongest first, each setting ``name`` to its own value."""
    text = {"command line", "ini", "environment"}
    return [
        Layer(source, {name: values[source]}, text=source in text, name_in_messages=lambda option, s=source: s)
        for source in SOURCES
        if source in values
    ]


@pytest.mark.parametrize(
    ("name", "values"),
    [
        (
            "namespace",
            {
                "argument": "from-argument",
                "marker": "from-marker",
                "command line": "from-cli",
                "ini": "from-ini",
                "environment": "from-env",
                "default": "from-default-layer",
            },
        ),
        ("ttl", {"argument": "1h", "marker": "2h", "command line": "3h", "ini": "4h", "environment": "5h"}),
    ],
)
def test_precedence_argument_marker_command_line_ini_environment_default(name, values):
    """The strongest layer that sets an option wins; each weaker one shows when the stronger ones are gone."""
    layers = layers_setting(name, values)
    while layers:
        resolved = resolve(*layers)
        origin = resolved.origin(name)
        assert origin.source == layers[0].source and origin.given == values[layers[0].source]
        assert origin.where == layers[0].source
        assert getattr(resolved.options, name) == getattr(CacheOptions(**{name: values[layers[0].source]}), name)
        layers = layers[1:]
    resolved = resolve()
    assert resolved.origin(name).source == "default" and getattr(resolved.options, name) == OPTION[name].default


def test_each_option_resolves_on_its_own():
    """Options do not travel together: each comes from the strongest layer that sets it."""
    resolved = resolve(
        argument_layer({"ttl": "1h"}),
        flag_layer({"ttl": "2h", "namespace": "flag-ns"}),
        environment_layer({SCOPE_ENV: "credential", URL_ENV: "memory://env"}),
    )
    sources = {name: origin.source for name, origin in resolved.origins.items()}
    assert sources["ttl"] == "argument" and sources["namespace"] == "argument" and sources["scope"] == "environment"
    assert sources["url"] == "environment" and sources["mode"] == "default"
    assert (resolved.options.ttl, resolved.options.namespace, resolved.options.url) == (3600, "flag-ns", "memory://env")


def test_a_bad_value_names_where_it_came_from():
    """Messages say which source gave the bad value: the flag, the variable; a call's argument needs no name."""
    with pytest.raises(InvalidOption, match=r"^\$METRION_CACHE_SCOPE: invalid cache scope 'me'") as raised:
        resolve(environment_layer({SCOPE_ENV: "me"}))
    assert raised.value.origin is not None and raised.value.origin.source == "environment"
    with pytest.raises(InvalidOption, match=r"^--ttl: invalid ttl 'soon'"):
        resolve(flag_layer({"ttl": "soon"}))
    with pytest.raises(InvalidOption, match=r"^unknown cache mode 'bogus'"):
        resolve(argument_layer({"mode": "bogus"}))


def test_a_bad_stronger_value_is_an_error_not_skipped():
    """A weaker layer's good value does not hide a stronger layer's bad one."""
    with pytest.raises(InvalidOption, match="--store-cooldown"):
        resolve(flag_layer({"store_cooldown": "-1"}), environment_layer({}), argument_layer({"store_cooldown": 1}))


def test_blank_text_is_not_a_value_but_a_blank_argument_is():
    """An empty flag, ini key or variable falls through; namespace='' from Python is refused, as always."""
    resolved = resolve(flag_layer({"ttl": "  ", "namespace": ""}), environment_layer({URL_ENV: ""}))
    assert resolved.options == CacheOptions()
    with pytest.raises(InvalidOption, match="invalid namespace"):
        resolve(argument_layer({"namespace": ""}))


def test_an_empty_url_argument_means_the_environment_store():
    """url='' has always meant "not given": METRION_CACHE_URL, else the default store."""
    resolved = resolve(argument_layer({"url": ""}), environment_layer({URL_ENV: "memory://env"}))
    assert resolved.options.url == "memory://env" and resolved.origin("url").source == "environment"


def test_text_is_stripped_and_numbers_read_from_it():
    resolved = resolve(flag_layer(TEXT_VALUES | {"max_records": " 7 "}))
    assert kept(resolved.options) == EXPECTED


def test_unknown_names_and_sources_are_refused():
    with pytest.raises(TypeError, match="unknown cache option.*ttl_seconds"):
        argument_layer({"ttl_seconds": 60})
    with pytest.raises(ValueError, match="unknown option source"):
        Layer("somewhere", {})


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("Yes", True), ("on", True), ("0", False), ("off", False)])
def test_store_previews_reads_yes_and_no_as_text(text, expected):
    assert resolve(flag_layer({"store_previews": text})).options.store_previews is expected
    with pytest.raises(
        InvalidOption, match=r"^--store-previews: invalid store_previews 'maybe'; use True or False \(as text: 1, "
    ):
        resolve(flag_layer({"store_previews": "maybe"}))


def test_a_yes_no_flag_given_alone_means_yes():
    """--store-previews alone turns previews on; --store-previews false spells the default."""
    assert OPTION["store_previews"].flag_arguments == {"metavar": "BOOL", "nargs": "?", "const": "true"}
    assert OPTION["ttl"].flag_arguments == {"metavar": "SECONDS"}


# -- the environment variables -----------------------------------------------------------------------


def test_each_environment_variable_is_defined_once():
    """One name each, in core.options; the old places import it (the ledger's copy must agree)."""
    assert (URL_ENV, MODE_ENV, SCOPE_ENV, RETENTION_ENV, SOURCE_ENV, STORE_PREVIEWS_ENV) == (
        "METRION_CACHE_URL",
        "METRION_CACHE_MODE",
        "METRION_CACHE_SCOPE",
        "METRION_CACHE_LEDGER_RETENTION",
        "METRION_CACHE_SOURCE",
        "METRION_CACHE_STORE_PREVIEWS",
    )
    assert scope_module.SCOPE_ENV is SCOPE_ENV
    assert session_module.URL_ENV is URL_ENV and plugin.URL_ENV is URL_ENV and plugin.MODE_ENV is MODE_ENV
    assert ledger.RETENTION_ENV == RETENTION_ENV and ledger.DEFAULT_RETENTION_SECONDS == DEFAULT_RETENTION_SECONDS
    assert sorted(ENV_NAMES) == sorted((URL_ENV, MODE_ENV, SCOPE_ENV, RETENTION_ENV, SOURCE_ENV, STORE_PREVIEWS_ENV))


def test_every_environment_variable_is_read():
    """Each option with a variable takes its value from it; the mode's only for the pytest plugin."""
    environ = {OPTION[name].env: TEXT_VALUES[name] for name in NAMES if OPTION[name].env}
    for_pytest = resolve(environment_layer(environ, for_pytest=True))
    library = resolve(environment_layer(environ))
    for name in NAMES:
        if OPTION[name].env is None:
            continue
        assert getattr(for_pytest.options, name) == EXPECTED[name]
        assert for_pytest.origin(name).where == f"${OPTION[name].env}"
        expected = OPTION[name].default if OPTION[name].spec.env_for_pytest_only else EXPECTED[name]
        assert getattr(library.options, name) == expected


def test_the_session_reads_the_environment_and_arguments_beat_it(monkeypatch):
    monkeypatch.setenv(URL_ENV, STORE)
    monkeypatch.setenv(SCOPE_ENV, "credential")
    monkeypatch.setenv(RETENTION_ENV, "2d")
    monkeypatch.setenv(MODE_ENV, "replay")
    session = CacheSession()
    assert (session.url, session.options.scope, session.options.ledger_retention) == (STORE, "credential", 2 * 86400)
    assert session.mode == "true", "METRION_CACHE_MODE is for the pytest plugin's tests only"
    explicit = CacheSession("memory://explicit", scope="shared", ledger_retention=0)
    assert (explicit.url, explicit.options.scope, explicit.options.ledger_retention) == (
        "memory://explicit",
        "shared",
        0,
    )
    given = CacheSession(options=CacheOptions(url="memory://given"))
    assert given.options.scope == "shared", "options made beforehand are complete: the environment is not read again"


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(RETENTION_ENV, "soon")
    with pytest.raises(MetrionCacheError, match=r"^\$METRION_CACHE_LEDGER_RETENTION: invalid ledger_retention"):
        CacheSession("memory://")


# -- every option on every surface: the library ------------------------------------------------------------


def test_cache_session_takes_every_option_as_a_keyword_and_as_options():
    assert kept(CacheSession(**PYTHON_VALUES).options) == EXPECTED
    assert (
        kept(CacheSession(PYTHON_VALUES["url"], **{k: v for k, v in PYTHON_VALUES.items() if k != "url"}).options)
        == EXPECTED
    )
    options = CacheOptions(**PYTHON_VALUES)
    session = CacheSession(options=options)
    assert session.options is options
    assert (session.settings.ttl, session.settings.namespace, session.settings.scope) == (
        7200,
        "options-ns",
        "credential",
    )
    assert (session.breaker.cooldown, session.single_flight_wait, session.ledger.max_records) == (2.5, 1.5, 7)
    assert session.settings.max_entry_bytes == 4096 and session.ledger.sink.retention == 43200
    assert CacheSession(options=options, ttl="3h").options.ttl == 3 * 3600, "keywords override the options given"


def test_enable_takes_every_option():
    try:
        assert kept(metrion_fixture.enable(**PYTHON_VALUES).options) == EXPECTED
        assert kept(metrion_fixture.enable(options=CacheOptions(**PYTHON_VALUES)).options) == EXPECTED
    finally:
        metrion_fixture.disable()


def test_cache_takes_every_option():
    with metrion_fixture.cache(**PYTHON_VALUES) as session:
        assert kept(session.options) == EXPECTED and active_session() is session
    with metrion_fixture.cache(options=CacheOptions(**PYTHON_VALUES)) as session:
        assert kept(session.options) == EXPECTED


def test_the_library_refuses_unknown_names_and_a_url_given_twice():
    with pytest.raises(TypeError, match="ttl_seconds"):
        CacheSession("memory://", ttl_seconds=60)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="ttl_seconds"):
        metrion_fixture.enable("memory://", ttl_seconds=60)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="url given twice"):
        CacheSession("memory://a", url="memory://b")
    assert active_session() is None


def test_cache_with_a_session_takes_no_options():
    """Options next to a session would be ignored: refused instead."""
    session = CacheSession("memory://")
    with pytest.raises(TypeError, match="not both"), metrion_fixture.cache(session=session, ttl="1h"):
        pytest.fail("the block must not run")
    with metrion_fixture.cache(session=session, ttl=None) as active:  # None: not given
        assert active is session


@pytest.mark.parametrize("name", NUMERIC)
def test_every_surface_refuses_nan_for_numeric_options(name):
    with pytest.raises(MetrionCacheError):
        CacheSession("memory://", **{name: math.nan})
    with pytest.raises(MetrionCacheError):
        metrion_fixture.enable("memory://", **{name: math.nan})
    with pytest.raises(MetrionCacheError), metrion_fixture.cache("memory://", **{name: math.nan}):
        pytest.fail("the block must not run")
    assert active_session() is None


# -- the pytest plugin: marker, command line, ini, environment -----------------------------------------------

PLUGIN_CHECK = """
EXPECTED = {expected!r}


def test_options(metrion_cache):
    assert {{name: getattr(metrion_cache.options, name) for name in EXPECTED}} == EXPECTED
"""
MARKED = """
import pytest

EXPECTED = {expected!r}


@pytest.mark.metrion_cache(**{values!r})
def test_marker(metrion_cache):
    assert {{name: getattr(metrion_cache.options, name) for name in EXPECTED}} == EXPECTED
"""
INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def test_the_marker_accepts_scope(pytester):
    """@pytest.mark.metrion_cache(scope="credential") reaches the test's session (it used to be refused)."""
    pytester.makeini(INI)
    values = {"url": STORE, "scope": "credential"}
    pytester.makepyfile(MARKED.format(values=values, expected=values))
    pytester.runpytest_inprocess(*QUIET, "--strict-markers").assert_outcomes(passed=1)


def test_the_marker_accepts_every_option(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(MARKED.format(values=PYTHON_VALUES, expected=EXPECTED))
    pytester.runpytest_inprocess(*QUIET, "--strict-markers").assert_outcomes(passed=1)


def test_the_command_line_accepts_every_option_and_the_header_says_so(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(PLUGIN_CHECK.format(expected=EXPECTED))
    flags = [f"{OPTION[name].pytest_flag}={TEXT_VALUES[name]}" for name in NAMES]
    result = pytester.runpytest_inprocess(*QUIET, *flags)
    result.assert_outcomes(passed=1)
    header = next(line for line in result.outlines if line.startswith("metrion cache: mode="))
    assert header.startswith(f"metrion cache: mode=refresh (command line), url={STORE} (command line), ")
    assert all(f"{name}={TEXT_VALUES[name]} (command line)" in header for name in NAMES)


def test_the_ini_file_accepts_every_option(pytester):
    pytester.makeini(INI + "".join(f"{OPTION[name].ini} = {TEXT_VALUES[name]}\n" for name in NAMES))
    pytester.makepyfile(PLUGIN_CHECK.format(expected=EXPECTED))
    pytester.runpytest_inprocess(*QUIET).assert_outcomes(passed=1)


def test_the_plugin_reads_every_environment_variable(pytester, monkeypatch):
    expected = {}
    for name in NAMES:
        if OPTION[name].env:
            monkeypatch.setenv(OPTION[name].env, TEXT_VALUES[name])
            expected[name] = EXPECTED[name]
    pytester.makeini(INI)
    pytester.makepyfile(PLUGIN_CHECK.format(expected=expected))
    result = pytester.runpytest_inprocess(*QUIET)
    result.assert_outcomes(passed=1)
    assert "mode=refresh (environment)" in result.stdout.str()


def test_the_plugin_layers_marker_over_command_line_over_ini_over_environment(pytester, monkeypatch):
    monkeypatch.setenv(RETENTION_ENV, "1h")
    pytester.makeini(INI + "metrion_cache_ledger_retention = 2h\nmetrion_cache_store_cooldown = 3\n")
    pytester.makepyfile(
        MARKED.format(
            values={"url": STORE, "single_flight_wait": 4},
            expected={"ledger_retention": 7200, "store_cooldown": 5.0, "single_flight_wait": 4.0, "max_records": 6},
        )
    )
    result = pytester.runpytest_inprocess(
        *QUIET,
        "--metrion-cache-store-cooldown=5",
        "--metrion-cache-single-flight-wait=9",
        "--metrion-cache-max-records=6",
    )
    result.assert_outcomes(passed=1)


def test_a_bad_value_for_a_new_option_names_its_flag_its_variable_or_the_marker(pytester, monkeypatch):
    pytester.makeini(INI)
    pytester.makepyfile(
        f"""
import pytest


@pytest.mark.metrion_cache(url={STORE!r}, store_cooldown=float("nan"))
def test_marker(metrion_cache):
    pass
"""
    )

    result = pytester.runpytest_inprocess(*QUIET, "--metrion-cache-single-flight-wait=inf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "metrion cache: --metrion-cache-single-flight-wait: invalid single_flight_wait inf" in result.stderr.str()

    monkeypatch.setenv(RETENTION_ENV, "soon")
    result = pytester.runpytest_inprocess(*QUIET)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "metrion cache: $METRION_CACHE_LEDGER_RETENTION: invalid ledger_retention 'soon'" in result.stderr.str()
    monkeypatch.delenv(RETENTION_ENV)

    result = pytester.runpytest_inprocess(*QUIET)
    result.assert_outcomes(errors=1)
    assert "metrion cache: @pytest.mark.metrion_cache(store_cooldown=...): invalid store cool-down nan" in (
        result.stdout.str()
    )


def test_the_plugin_registers_every_option(pytestconfig):
    """The marker's keywords, the flags and the ini keys come from the fields (this run has them all)."""
    assert set(plugin.MARKER_KEYS) == set(NAMES)
    for name in NAMES:
        pytestconfig.getoption(f"metrion_cache_{name}")  # raises for an option that was never added
        pytestconfig.getini(OPTION[name].ini)  # raises for an unknown ini key


# -- the magic ----------------------------------------------------------------------------------------


def magic_flags() -> str:
    return " ".join(f"{OPTION[name].flag} {TEXT_VALUES[name]}" for name in NAMES)


def test_the_magic_on_accepts_every_option(ip):  # noqa: F811
    assert run(ip, f"%metrion_cache on {magic_flags()}").success
    try:
        assert kept(enabled_session().options) == EXPECTED
    finally:
        run(ip, "%metrion_cache off")


def test_the_cell_magic_accepts_every_option(ip):  # noqa: F811
    ip.user_ns["active_session"] = active_session
    assert run(ip, f"%%metrion_cache {magic_flags()}\ninside = active_session()").success
    assert kept(ip.user_ns["inside"].options) == EXPECTED


def test_the_magic_refuses_nan_naming_the_flag(ip, capsys):  # noqa: F811
    capsys.readouterr()
    assert not run(ip, "%metrion_cache on --url memory:// --store-cooldown nan").success
    assert "UsageError: metrion cache: --store-cooldown: invalid store cool-down nan" in capsys.readouterr().err
    assert enabled_session() is None


def test_the_magic_help_lists_every_option(ip, capsys):  # noqa: F811
    run(ip, "%metrion_cache?")
    out = capsys.readouterr().out
    for name in NAMES:
        metavar = OPTION[name].spec.metavar
        shown = f"[{metavar}]" if OPTION[name].spec.flag_alone else metavar  # a yes/no flag may stand alone
        assert f"{OPTION[name].flag} {shown}" in out


# -- the CLI ----------------------------------------------------------------------------------------------

# An import always replaces entries (refresh) and reads each call's record back (so it keeps them).
NOT_IMPORT_FLAGS = {"mode", "max_records"}


def test_import_cassettes_takes_every_other_option(monkeypatch, tmp_path, capsys):
    seen: list[CacheSession] = []

    def fake_import(paths, *, session, **unused):
        seen.append(session)
        return cassettes.ImportReport(url=session.url, namespace=session.settings.namespace, cassettes=["x"])

    monkeypatch.setattr(cassettes, "import_cassettes", fake_import)
    names = [name for name in NAMES if name not in NOT_IMPORT_FLAGS]
    flags = [part for name in names for part in (OPTION[name].flag, TEXT_VALUES[name])]
    assert cli_main(["import-cassettes", str(tmp_path), *flags]) == 0
    (session,) = seen
    assert {name: getattr(session.options, name) for name in names} == {name: EXPECTED[name] for name in names}
    assert session.mode == "refresh"
    assert cli_main(["import-cassettes", str(tmp_path), "--store-cooldown", "nan"]) == 2
    assert "metrion-cache: --store-cooldown: invalid store cool-down nan" in capsys.readouterr().err
