"""The %metrion_cache magics, run in a real IPython InteractiveShell against the simulated provider.

Cells are run the way a terminal IPython runs them (``shell.run_cell``) and, for cells that
await, the way ipykernel runs them: ``run_cell_async`` on an event loop that is already running.
"""

from __future__ import annotations

import builtins
import html
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from sdk_calls import SDKS, acall, call
from traitlets.config import Config

import metrion_fixture
from metrion_fixture.integrations import patching
from metrion_fixture.integrations.ipython import CacheReport, format_seconds
from metrion_fixture.reporting.reports import money
from metrion_fixture.runtime.activation import active_session, enabled_session

QUESTION = [{"role": "user", "content": "What are your delivery times?"}]
OTHER_QUESTION = [{"role": "user", "content": "Do you ship to Norway?"}]


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    """One InteractiveShell for the module, with its history in memory and its profile in tmp."""
    main_module = sys.modules["__main__"]
    builtins_before = set(vars(builtins))
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        instance = InteractiveShell.instance(config=config)
    sys.modules["__main__"] = main_module  # IPython installs its own __main__; keep pytest's
    yield instance
    InteractiveShell.clear_instance()
    for name in set(vars(builtins)) - builtins_before:
        delattr(builtins, name)


@pytest.fixture
def ip(shell: InteractiveShell, provider, namespace: str) -> Iterator[InteractiveShell]:
    """The shell with the extension loaded, display output captured, and helpers in its namespace."""
    shell.display_pub = CapturingDisplayPublisher()
    store = f"memory://{uuid.uuid4().hex}"
    shell.user_ns.update(
        URL=provider.url,
        STORE=store,
        NS=namespace,
        call=call,
        acall=acall,
        QUESTION=QUESTION,
        OTHER_QUESTION=OTHER_QUESTION,
    )
    run(shell, "%load_ext metrion_fixture")
    yield shell
    run(shell, "%unload_ext metrion_fixture")
    assert active_session() is None, "a session outlived the extension"
    metrion_fixture.disable()


def run(shell: InteractiveShell, source: str) -> Any:
    return shell.run_cell(source, store_history=True)


async def run_like_a_kernel(shell: InteractiveShell, source: str) -> Any:
    """What ipykernel does with a cell that awaits: run_cell_async on the kernel's running loop."""
    transformed = shell.transform_cell(source)
    assert shell.should_run_async(source, transformed_cell=transformed, preprocessing_exc_tuple=None)
    result = None
    try:
        result = await shell.run_cell_async(source, store_history=True, transformed_cell=transformed)
    finally:
        shell.events.trigger("post_execute")
        shell.events.trigger("post_run_cell", result)
    return result


def reports(shell: InteractiveShell) -> list[dict[str, str]]:
    """The report lines displayed so far (their text/plain and text/html forms), then forget them."""
    outputs = shell.display_pub.outputs
    found = [o["data"] for o in outputs if o["data"].get("text/plain", "").startswith("metrion cache:")]
    outputs.clear()
    return found


def texts(shell: InteractiveShell) -> list[str]:
    return [report["text/plain"] for report in reports(shell)]


def missed_line(sdk: str, messages: Any = QUESTION) -> str:
    """The exact report of a cell whose one call missed: it names the model and the key to look up."""
    model = "claude-test" if sdk == "anthropic" else "gpt-test"
    key = metrion_fixture.cache_key(model, messages)
    return f"metrion cache: 0 from cache, 1 from the provider; missed: {model} (key {key[:12]})"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", SDKS)
def test_on_caches_reruns_and_reports_each_cell(ip, provider, sdk, stream):
    """`on` caches every call of the kernel; each cell that made calls gets a one-line report."""
    ip.user_ns.update(SDK=sdk, STREAM=stream)
    cell = "answer = call(SDK, URL, stream=STREAM)"

    assert run(ip, "%metrion_cache on --url $STORE --namespace $NS").success
    run(ip, cell)
    first = ip.user_ns["answer"]
    miss_reports = reports(ip)
    run(ip, cell)
    second = ip.user_ns["answer"]
    hit_reports = reports(ip)
    run(ip, "x = 1 + 1")

    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert second.text == first.text and provider.call_count == 1
    assert [r["text/plain"] for r in miss_reports] == [missed_line(sdk)]
    [hit] = hit_reports
    assert hit["text/plain"].startswith("metrion cache: 1 from cache, 0 from the provider, ")
    assert hit["text/plain"].endswith(" saved")
    assert ">cached</span>" in hit["text/html"] and "1 from cache, 0 from the provider" in hit["text/html"]
    assert ">cached</span>" not in miss_reports[0]["text/html"]
    assert reports(ip) == [], "a cell without LLM calls gets no report"


def test_report_counts_several_calls_in_one_cell(ip, provider):
    """The report adds up every call of the cell: hits, misses and refreshes."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "call('anthropic', URL)")
    reports(ip)

    run(ip, "for sdk in ('anthropic', 'openai', 'anthropic'):\n    call(sdk, URL)")

    assert texts(ip)[0].startswith("metrion cache: 2 from cache, 1 from the provider, ")
    assert provider.call_count == 2


def test_off_stops_caching(ip, provider):
    """After `off` calls go straight to the provider, unmarked, and no report is shown."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "call('anthropic', URL)")
    assert run(ip, "%metrion_cache off").success
    reports(ip)

    run(ip, "answer = call('anthropic', URL)")

    assert ip.user_ns["answer"].cache is None
    assert provider.call_count == 2
    assert active_session() is None and not patching.installed()
    assert reports(ip) == []


def test_status_shows_store_mode_ttl_namespace_and_counts(ip, provider, capsys):
    """`status` names the store, mode, TTL and namespace, the entries and this session's counts."""
    run(ip, "%metrion_cache status")
    assert capsys.readouterr().out.startswith("metrion cache: off")

    run(ip, "%metrion_cache on --url $STORE --namespace $NS --ttl 2h")
    run(ip, "call('anthropic', URL)\ncall('anthropic', URL)")
    capsys.readouterr()
    run(ip, "%metrion_cache status")
    out = capsys.readouterr().out

    store, namespace = ip.user_ns["STORE"], ip.user_ns["NS"]
    assert out.startswith("metrion cache: on\n")
    for expected in (
        f"store      {store}",
        "mode       true",
        "ttl        2 h",
        f"namespace  {namespace}",
        "entries    1",
        "calls      2 in this kernel (1 from cache, 1 missed, 0 refreshed",
    ):
        assert expected in out


def test_clear_deletes_this_namespace_and_says_how_many(ip, provider, capsys):
    """`clear` deletes the active namespace's entries, says how many, and leaves others alone."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "call('anthropic', URL)\ncall('anthropic', URL, messages=OTHER_QUESTION)")
    store = enabled_session().store
    store.set("someone-else:anthropic_messages:json:abc", b"{}", 60)
    capsys.readouterr()

    run(ip, "%metrion_cache clear")
    out = capsys.readouterr().out
    run(ip, "answer = call('anthropic', URL)")

    assert out.strip() == f"metrion cache: cleared 2 entries of namespace {ip.user_ns['NS']!r} from {store.url}"
    assert ip.user_ns["answer"].cache == "MISS"
    assert store.get("someone-else:anthropic_messages:json:abc") == b"{}"


@pytest.mark.parametrize("sdk", SDKS)
def test_refresh_sends_the_next_cell_to_the_provider(ip, provider, sdk):
    """`refresh`: the next cell's calls go to the provider and replace the entry; later cells hit."""
    ip.user_ns["SDK"] = sdk
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "first = call(SDK, URL)")
    run(ip, "%metrion_cache refresh")
    run(ip, "x = 'a cell in between would take the refresh; this one makes no call'")
    reports(ip)
    run(ip, "%metrion_cache refresh")

    run(ip, "second = call(SDK, URL)")
    refresh_reports = texts(ip)
    run(ip, "third = call(SDK, URL)")

    statuses = [ip.user_ns[name].cache for name in ("first", "second", "third")]
    assert statuses == ["MISS", "REFRESH", "HIT"]
    assert provider.call_count == 2
    assert refresh_reports == ["metrion cache: 0 from cache, 1 from the provider (1 refreshed)"]
    assert active_session() is enabled_session() and active_session().mode == "true"
    assert enabled_session().stats.refreshes == 1, "refreshed calls count in the session's stats"


def test_refresh_with_the_cache_off_is_an_error(ip, provider, capsys):
    """`refresh` needs the cache on: it says so in one line and arms nothing."""
    run(ip, "%metrion_cache refresh")
    line = one_line_error(capsys)
    run(ip, "answer = call('anthropic', URL)")

    assert line.startswith("UsageError: metrion cache: the cache is off")
    assert ip.user_ns["answer"].cache is None and active_session() is None


def test_cell_magic_caches_only_that_cell_then_restores_the_session(ip, provider, namespace):
    """`%%metrion_cache` caches its cell on its own options; the session active before comes back."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    outer = enabled_session()
    cell = (
        "%%metrion_cache --url memory://cell-magic-test --namespace $NS-cell --ttl 1h\nanswer = call('anthropic', URL)"
    )

    run(ip, cell)
    first = ip.user_ns["answer"]
    assert active_session() is outer
    run(ip, cell)
    second = ip.user_ns["answer"]
    cell_reports = texts(ip)
    run(ip, "answer = call('anthropic', URL)")
    outside = ip.user_ns["answer"]

    assert (first.cache, second.cache, outside.cache) == ("MISS", "HIT", "MISS")
    assert provider.call_count == 2
    assert outer.stats.misses == 1 and outer.stats.hits == 0, "the cell's calls are not the outer session's"
    cell_store = metrion_fixture.CacheSession("memory://cell-magic-test").store
    assert cell_store.ttl(f"{namespace}-cell:anthropic_messages:json:{first.headers['x-metrion-cache-key']}") <= 3600
    assert cell_reports[0] == missed_line("anthropic")
    assert cell_reports[1].startswith("metrion cache: 1 from cache, 0 from the provider")


def test_cell_magic_with_the_cache_off_leaves_it_off(ip, provider):
    """With the cache off, only the `%%metrion_cache` cell is cached; afterwards nothing is."""
    run(ip, "%%metrion_cache --url $STORE --namespace $NS\nin_cell = call('openai', URL)")
    in_cell_reports = texts(ip)
    run(ip, "after = call('openai', URL)")

    assert ip.user_ns["in_cell"].cache == "MISS"
    assert ip.user_ns["after"].cache is None
    assert active_session() is None and not patching.installed()
    assert in_cell_reports == [missed_line("openai")]
    assert reports(ip) == []


def test_cell_magic_block_closes_when_the_cell_fails(ip, provider):
    """A cell that raises still ends its `%%metrion_cache` block."""
    result = run(ip, "%%metrion_cache --url $STORE --namespace $NS\ncall('anthropic', URL)\n1 / 0")

    assert isinstance(result.error_in_exec, ZeroDivisionError)
    assert active_session() is None
    assert texts(ip) == [missed_line("anthropic")]


def test_run_cell_magic_called_directly(ip, provider, capsys):
    """`run_cell_magic()` (no cell of its own to rewrite) runs the body cached, once reported."""
    body = "answer = call('anthropic', URL)"
    run(ip, f"get_ipython().run_cell_magic('metrion_cache', '--url ' + STORE + ' --namespace ' + NS, {body!r})")
    first = ip.user_ns["answer"]
    run(ip, f"get_ipython().run_cell_magic('metrion_cache', '--url ' + STORE + ' --namespace ' + NS, {body!r})")

    assert (first.cache, ip.user_ns["answer"].cache) == ("MISS", "HIT")
    assert active_session() is None
    found = texts(ip)
    assert len(found) == 2 and found[0] == missed_line("anthropic")


async def test_run_cell_magic_cannot_await_inside_a_running_loop(ip, provider, capsys):
    """Called directly, the cell magic cannot run an awaiting body on a running loop: it says so."""
    source = "get_ipython().run_cell_magic('metrion_cache', '', 'await acall(\\'anthropic\\', URL)')"

    run(ip, source)

    assert "start the cell itself with %%metrion_cache" in one_line_error(capsys)
    assert provider.call_count == 0 and active_session() is None


@pytest.mark.parametrize("cell_magic", [False, True], ids=["on", "cell-magic"])
@pytest.mark.parametrize("sdk", SDKS)
async def test_async_clients_with_top_level_await_on_a_running_loop(ip, provider, sdk, cell_magic):
    """In a kernel the loop is already running: cells that await the async SDKs are cached there,
    with `on` and with `%%metrion_cache` (whose body must run on that loop, not a nested one)."""
    ip.user_ns["SDK"] = sdk
    if cell_magic:
        cell = "%%metrion_cache --url $STORE --namespace $NS\nanswer = await acall(SDK, URL, stream=True)"
    else:
        run(ip, "%metrion_cache on --url $STORE --namespace $NS")
        cell = "answer = await acall(SDK, URL, stream=True)"

    first = await run_like_a_kernel(ip, cell)
    miss = ip.user_ns["answer"]
    await run_like_a_kernel(ip, cell)
    hit = ip.user_ns["answer"]

    assert first.success, first.error_in_exec
    assert (miss.cache, hit.cache) == ("MISS", "HIT") and hit.text == miss.text
    assert provider.call_count == 1
    found = texts(ip)
    assert found[0] == missed_line(sdk)
    assert found[1].startswith("metrion cache: 1 from cache, 0 from the provider")
    assert active_session() is (enabled_session() if not cell_magic else None)


async def test_sync_clients_in_a_cell_while_the_loop_runs(ip, provider):
    """A cell that does not await runs synchronously even in a kernel: the sync SDKs are cached too."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "first = call('openai', URL)")
    run(ip, "second = call('openai', URL)")

    assert (ip.user_ns["first"].cache, ip.user_ns["second"].cache) == ("MISS", "HIT")
    assert provider.call_count == 1


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("%metrion_cache on --bogus", "unrecognized arguments: --bogus"),
        ("%metrion_cache on --ttl abc", "invalid ttl 'abc'"),
        ("%metrion_cache on --ttl 0", "invalid ttl '0'"),
        ("%metrion_cache on --url ftp://example.com/cache", "Unsupported cache store URL"),
        ("%metrion_cache on --url sqlite://relative", "Bad SQLite URL"),
        ("%metrion_cache on --mode yes", "unknown cache mode 'yes'"),
        ("%metrion_cache on --namespace 'two words'", "invalid namespace"),
        ("%metrion_cache on --url 'unbalanced", "cannot read the options"),
        ("%metrion_cache frobnicate", "invalid choice: 'frobnicate'"),
        ("%metrion_cache off --ttl 60", "'off' takes no --ttl option"),
        ("%%metrion_cache --ttl soon\nbody_ran = True", "invalid ttl 'soon'"),
        ("%%metrion_cache --url ftp://x\nbody_ran = True", "Unsupported cache store URL"),
        ("%%metrion_cache status\nbody_ran = True", "takes options only"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(ip, provider, capsys, source, message):
    """Bad magic input prints one clear line, no traceback; the active session stays as it was."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    before = enabled_session()
    capsys.readouterr()

    result = run(ip, source)
    line = one_line_error(capsys)
    run(ip, "answer = call('anthropic', URL)")

    assert line.startswith("UsageError: metrion cache: ") and message in line
    assert not result.success
    assert enabled_session() is before and active_session() is before
    assert "body_ran" not in ip.user_ns, "a %%metrion_cache cell with bad options must not run"
    assert ip.user_ns["answer"].cache == "MISS" and before.stats.misses == 1


def test_help_shows_the_options(ip, capsys):
    """`%metrion_cache?` documents the actions and every option."""
    run(ip, "%metrion_cache?")
    out = capsys.readouterr().out

    for expected in (
        "on,off,refresh,status,clear",
        "--url URL",
        "--ttl SECONDS",
        "--mode MODE",
        "--namespace NS",
        "%%metrion_cache",
    ):
        assert expected in out


def test_unload_disables_the_cache_and_removes_the_magic(ip, provider):
    """`%unload_ext` turns the cache off, drops a pending refresh and removes the magics."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "%metrion_cache refresh")

    run(ip, "%unload_ext metrion_fixture")
    run(ip, "answer = call('anthropic', URL)")

    assert ip.user_ns["answer"].cache is None
    assert active_session() is None and enabled_session() is None and not patching.installed()
    assert ip.find_magic("metrion_cache") is None and ip.find_cell_magic("metrion_cache") is None
    run(ip, "%load_ext metrion_fixture")  # the fixture unloads it again


def test_importing_the_package_does_not_import_ipython():
    """Scripts and test suites that import metrion_fixture do not pay for IPython."""
    code = "import sys, metrion_fixture; assert 'IPython' not in sys.modules, 'IPython imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_cells_calls_name_the_cell_even_under_one_enabled_session(ip, provider):
    """Records say which cell made them ("ipython cell 7"; in Jupyter the notebook's name); a given source wins."""
    assert run(ip, "%metrion_cache on --url $STORE --namespace $NS").success
    first = run(ip, "call('openai', URL)").execution_count
    run(ip, "call('openai', URL, messages=OTHER_QUESTION)")
    calls = enabled_session().calls
    assert [record.source for record in calls] == [f"ipython cell {first}", f"ipython cell {first + 1}"]
    ip.user_ns["active_session"] = active_session
    run(
        ip,
        "%%metrion_cache --url $STORE --namespace $NS --source faq-eval\ncall('openai', URL)\ninside = active_session()",
    )
    assert [record.source for record in ip.user_ns["inside"].calls] == ["faq-eval"]
    run(ip, "%metrion_cache off")


def test_a_notebooks_name_comes_from_the_front_end(ip, monkeypatch):
    from metrion_fixture.runtime import sources

    monkeypatch.setenv("JPY_SESSION_NAME", "/home/ana/work/churn-analysis.ipynb")
    number = ip.displayhook.prompt_count
    assert sources.cell_name(ip) == f"churn-analysis.ipynb cell {number}"
    ip.user_ns["__vsc_ipynb_file__"] = "/repo/notebooks/eval.ipynb"
    try:
        assert sources.cell_name(ip) == f"eval.ipynb cell {number}"
    finally:
        del ip.user_ns["__vsc_ipynb_file__"]


# -- the cell report: four pills, the calls that missed, the list of calls --------------------------------

PILL = re.compile(r'<span class="metrion-cache-pill" data-state="([a-z ]+)" style="background:(#[0-9a-f]{6});')
CELL_TIME = r"\d+(\.\d)? (ms|s)"


def pill_of(report: dict[str, str]) -> tuple[str, str]:
    found = PILL.search(report["text/html"])
    assert found is not None, report["text/html"]
    return found.group(1), found.group(2)


def call_rows(report: dict[str, str]) -> list[list[str]]:
    """The cells of each row of the expandable list of calls, as text."""
    rows = re.findall(r'<tr data-status="[A-Z]+">(.*?)</tr>', report["text/html"])
    return [
        [html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in rows
    ]


def test_each_cell_gets_one_of_four_pills_and_names_what_missed(ip, provider):
    """cached (green), partly cached (amber), provider (grey), refused (red): one hit and one miss is not 'cached'."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "call('anthropic', URL)")
    [provider_only] = reports(ip)
    run(ip, "call('anthropic', URL)")
    [cached] = reports(ip)
    run(ip, "call('anthropic', URL)\ncall('anthropic', URL, messages=OTHER_QUESTION)")
    [partly] = reports(ip)
    run(ip, "%metrion_cache on --url $STORE --namespace $NS --mode replay")
    reports(ip)
    failed = run(ip, "call('openai', URL, messages=[{'role': 'user', 'content': 'Never asked before'}])")
    [refused] = reports(ip)

    assert pill_of(provider_only) == ("provider", "#57606a")
    assert provider_only["text/plain"] == missed_line("anthropic")
    assert pill_of(cached) == ("cached", "#1a7f37")
    assert re.fullmatch(
        rf"metrion cache: 1 from cache, 0 from the provider, {CELL_TIME} of provider time saved \(cell {CELL_TIME}\), "
        r"46 tokens saved",
        cached["text/plain"],
    ), cached["text/plain"]
    other_key = metrion_fixture.cache_key("claude-test", OTHER_QUESTION)[:12]
    assert pill_of(partly) == ("partly cached", "#9a6700")
    assert re.fullmatch(
        rf"metrion cache: 1 from cache, 1 from the provider, {CELL_TIME} of provider time saved \(cell {CELL_TIME}\), "
        rf"46 tokens saved; missed: claude-test \(key {other_key}\)",
        partly["text/plain"],
    ), partly["text/plain"]
    assert not failed.success
    replay_key = metrion_fixture.cache_key("gpt-test", [{"role": "user", "content": "Never asked before"}])[:12]
    assert pill_of(refused) == ("refused", "#cf222e")
    assert refused["text/plain"] == (
        f"metrion cache: 0 from cache, 0 from the provider, 1 refused by the cache; refused: gpt-test (key {replay_key})"
    )


def test_the_report_lists_every_call_of_the_cell_under_details(ip, provider):
    """Model, key, status, latency, tokens and cost of each call; a hit spends 0 and says what it saved."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "call('anthropic', URL, model='claude-haiku-4-5')")
    reports(ip)
    run(ip, "call('anthropic', URL, model='claude-haiku-4-5')\ncall('openai', URL, model='gpt-4o-mini')")
    [report] = reports(ip)

    hit, miss = enabled_session().calls[-2:]
    assert "<details" in report["text/html"] and "<summary>2 calls</summary>" in report["text/html"]
    assert miss.cost_usd is not None and hit.saved_usd is not None
    rows = call_rows(report)
    assert [row[:3] for row in rows] == [
        ["claude-haiku-4-5", hit.key[:12], "HIT"],
        ["gpt-4o-mini", miss.key[:12], "MISS"],
    ]
    assert rows[0][4:] == [
        f"0 / 0 (saved {hit.saved_input_tokens} / {hit.saved_output_tokens})",
        f"$0.00 (saved {money(hit.saved_usd)})",
    ]
    assert rows[1][4:] == [f"{miss.input_tokens} / {miss.output_tokens}", money(miss.cost_usd)]
    assert re.fullmatch(CELL_TIME, rows[0][3]), rows[0][3]
    assert rows[1][5] in ("<$0.0001",) or rows[1][5].startswith("$0.0"), "never $0.0000"


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0.0, "0 s"), (0.00042, "0.4 ms"), (0.0123, "12 ms"), (1.26, "1.3 s"), (93.0, "1.6 min")]
)
def test_durations_in_the_notebook_read_as_people_write_them(seconds, shown):
    assert format_seconds(seconds) == shown


def test_the_line_names_three_calls_at_most_and_counts_the_rest():
    records = tuple(
        metrion_fixture.CallRecord(
            key=f"{n}" * 64,
            wire_format="openai_chat",
            model=f"model-{n}",
            status="MISS",
            stream=False,
            latency=0.5,
            http_status=200,
            at=float(n),
        )
        for n in range(5)
    )
    report = CacheReport(from_provider=5, records=records, wall_seconds=2.5)
    assert report.text == (
        "metrion cache: 0 from cache, 5 from the provider; missed: model-0 (key 000000000000), "
        "model-1 (key 111111111111), model-2 (key 222222222222), 2 more"
    )
    assert report.pill == "provider"


def test_status_keeps_the_kernels_counts_across_on_and_off(ip, provider, capsys):
    """Each `on` makes a new session; status adds up every one of this kernel, and still shows them when off."""
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "call('anthropic', URL)")
    run(ip, "%metrion_cache on --url $STORE --namespace $NS --ttl 2h")
    run(ip, "call('anthropic', URL)")
    capsys.readouterr()
    run(ip, "%metrion_cache status")
    on = capsys.readouterr().out
    run(ip, "%metrion_cache off")
    capsys.readouterr()
    run(ip, "%metrion_cache status")
    off = capsys.readouterr().out

    calls = re.compile(
        r"  calls      2 in this kernel \(1 from cache, 1 missed, 0 refreshed, 0 bypassed, 0 refused\), "
        rf"{CELL_TIME} of provider time saved, 46 tokens"
    )
    assert calls.search(on), on
    assert off.startswith("metrion cache: off (turn it on with %metrion_cache on)\n") and calls.search(off), off


# -- %metrion_cache stats: the ledger, as a table and a chart -------------------------------------------------


def test_stats_shows_the_ledger_as_a_table_and_a_chart(ip, provider):
    run(ip, "%metrion_cache on --url $STORE --namespace $NS")
    run(ip, "call('anthropic', URL, model='claude-haiku-4-5')")
    run(ip, "call('anthropic', URL, model='claude-haiku-4-5')\ncall('openai', URL, model='gpt-4o-mini')")
    enabled_session().flush_ledger()
    reports(ip)
    run(ip, "%metrion_cache stats")
    [shown] = reports(ip)
    run(ip, "%metrion_cache stats --period 7d --namespace $NS")
    [week] = reports(ip)

    store = ip.user_ns["STORE"]
    lines = shown["text/plain"].splitlines()
    assert re.fullmatch(
        rf"metrion cache: all time in {store}: 3 calls, 1 from cache \(33% hit rate\); saved \$0\.\d{{4}}, "
        r"\d+ tokens and \d+\.\d s of provider time \(summed over calls\)",
        lines[0],
    ), lines[0]
    assert lines[1].split()[:4] == ["model", "requests", "hits", "hit"]
    assert [line.split()[:3] for line in lines[3:]] == [
        ["claude-haiku-4-5", "2", "1"],
        ["gpt-4o-mini", "1", "0"],
        ["total", "3", "1"],
    ]
    assert week["text/plain"].startswith(
        f"metrion cache: last 7 days in {store}, namespace {ip.user_ns['NS']}: 3 calls"
    )
    chart = re.search(r"<svg .*?</svg>", shown["text/html"]).group(0)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert f'<g data-day="{today}"><title>{today}: 1 hit, 2 misses, $0.' in chart
    assert re.findall(rf'<g data-day="{today}">.*?</g>', chart)[0].count("<rect") == 2
    assert '<rect class="hits" data-count="1"' in chart and '<rect class="misses" data-count="2"' in chart
    assert "<script" not in shown["text/html"] and "http://" not in chart.replace("http://www.w3.org/2000/svg", "")


def test_stats_on_an_empty_store_and_bad_input_is_one_line(ip, provider, capsys, tmp_path):
    ip.user_ns["EMPTY"] = f"memory://{uuid.uuid4().hex}"
    run(ip, "%metrion_cache stats --url $EMPTY")
    assert texts(ip) == [f"metrion cache: no calls in the ledger of {ip.user_ns['EMPTY']} (all time)"]
    capsys.readouterr()
    run(ip, "%metrion_cache stats --url $EMPTY --period fortnight")
    assert one_line_error(capsys) == (
        "UsageError: metrion cache: invalid period 'fortnight'; use today, 7d, 30d, all, or a duration like 12h or 90d"
    )
    ip.user_ns["MISSING"] = f"sqlite:///{tmp_path / 'typo' / 'cache.sqlite3'}"
    run(ip, "%metrion_cache stats --url $MISSING")
    assert one_line_error(capsys) == (
        f"UsageError: metrion cache: no store at {tmp_path / 'typo' / 'cache.sqlite3'} (check --url or $METRION_CACHE_URL)"
    )
    assert not (tmp_path / "typo").exists()
    run(ip, "%metrion_cache status --period 7d")
    assert one_line_error(capsys).startswith("UsageError: metrion cache: 'status' takes no --period option; usage: ")
