"""The call ledger in the store and the metrion-cache stats / ls / show / purge commands."""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from provider_sdk_calls import call as provider_call
from sdk_calls import call

import metrion_fixture
from metrion_fixture.cli import main
from metrion_fixture.core.entry import Entry
from metrion_fixture.core.stats import CallRecord
from metrion_fixture.demo.faq_bot import DEMO_NAMESPACE, run_demo
from metrion_fixture.reporting import prices
from metrion_fixture.reporting.reports import answer_text, dollars, money, plural
from metrion_fixture.runtime import ledger
from metrion_fixture.runtime.ledger import PREFIX, StoredLedger, read_records, retention_seconds, trim
from metrion_fixture.stores import open_store
from metrion_fixture.testing.provider import make_answer


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'cache.sqlite3'}"


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def stats_json(capsys, url: str, *extra: str) -> dict:
    code, out = run(capsys, "stats", "--url", url, "--json", *extra)
    assert code == 0
    return json.loads(out)


def record(**fields) -> CallRecord:
    base = dict(
        key="k" * 64,
        wire_format="openai_chat",
        model="gpt-4o",
        status="MISS",
        stream=False,
        latency=0.1,
        http_status=200,
        at=time.time(),
        provider="openai",
        input_tokens=10,
        output_tokens=5,
        cost_usd=0.001,
    )
    return CallRecord(**{**base, **fields})


# -- the ledger ---------------------------------------------------------------------------------------------


def test_stats_add_up_to_the_call_records_of_every_session(provider, url, capsys):
    """Calls of separate sessions on one store all reach the ledger; the totals match their records."""
    records = []
    for namespace in ("team-a", "team-b"):
        with metrion_fixture.cache(url, namespace=namespace) as session:
            call("openai", provider.url, model="gpt-4o")
            call("openai", provider.url, model="gpt-4o")
            call("anthropic", provider.url, model="claude-test", stream=True)
            provider_call("gemini", provider.url, model="gemini-2.5-flash")
        records += session.calls
    total = stats_json(capsys, url)["total"]
    assert total["requests"] == len(records) == 8
    assert total["hits"] == sum(r.status == "HIT" for r in records) == 2
    assert total["input_tokens"] == sum(r.input_tokens or 0 for r in records) > 0
    assert total["output_tokens"] == sum(r.output_tokens or 0 for r in records) > 0
    assert total["saved_output_tokens"] == sum(r.saved_output_tokens for r in records) > 0
    assert total["cost_usd"] == pytest.approx(sum(r.cost_usd or 0 for r in records))
    assert total["saved_usd"] == pytest.approx(sum(r.saved_usd or 0 for r in records)) and total["saved_usd"] > 0
    assert total["unpriced_spent"] == 2, "claude-test has no price: unknown, not $0"
    assert total["hit_rate"] == pytest.approx(2 / 8)
    one = stats_json(capsys, url, "--namespace", "team-a")["total"]
    assert one["requests"] == 4


def test_stats_by_model_provider_and_day_and_since(url, capsys):
    """--by groups the rows; --since keeps only the recent calls."""
    store = open_store(url)
    sink = StoredLedger(store, "ns", retention_seconds())
    sink.add(record(model="gpt-4o", at=time.time() - 10 * 86400))
    sink.add(
        record(
            model="gemini-2.5-flash",
            provider="google",
            status="HIT",
            input_tokens=0,
            output_tokens=0,
            cost_usd=0.0,
            saved_input_tokens=10,
            saved_output_tokens=5,
            saved_usd=0.002,
            saved_seconds=1.5,
        )
    )
    assert sink.flush() == 2
    by_model = stats_json(capsys, url, "--by", "model")
    assert [g["group"] for g in by_model["groups"]] == ["gemini-2.5-flash", "gpt-4o"]
    assert [g["group"] for g in stats_json(capsys, url, "--by", "provider")["groups"]] == ["google", "openai"]
    assert len(stats_json(capsys, url, "--by", "day")["groups"]) == 2
    recent = stats_json(capsys, url, "--since", "7d")["total"]
    assert (recent["requests"], recent["hits"], recent["saved_usd"], recent["saved_seconds"]) == (1, 1, 0.002, 1.5)
    code, out = run(capsys, "stats", "--url", url, "--by", "model")
    assert code == 0 and "hit rate" in out and "gemini-2.5-flash" in out and "$0.0020" in out and "1.5 s" in out


def test_the_ledger_expires_after_its_retention_and_can_be_turned_off(url, monkeypatch):
    """Ledger batches expire (30 days by default, METRION_CACHE_LEDGER_RETENTION or the option); 0 keeps none."""
    store = open_store(url)
    assert retention_seconds() == 30 * 86400
    monkeypatch.setenv(ledger.RETENTION_ENV, "2d")
    session = metrion_fixture.CacheSession(url, namespace="ret")
    session.publish(record())
    session.flush_ledger()
    (key,) = store.keys(f"{PREFIX}ret:")
    assert 86400 < store.ttl(key) <= 2 * 86400
    off = metrion_fixture.CacheSession(url, namespace="off", ledger_retention=0)
    off.publish(record())
    assert off.flush_ledger() == 0 and store.keys(f"{PREFIX}off:") == []
    with pytest.raises(metrion_fixture.MetrionCacheError):
        metrion_fixture.CacheSession(url, ledger_retention="soon")


def test_a_test_suite_s_sessions_fill_the_same_ledger_batches(url):
    """A session per test, each ending as a covered block: their records go in one batch, not one each,
    written by the ledger thread (no test waits on the store), and all of them are there."""
    from metrion_fixture.api import covering_process

    namespace = f"suite-{time.monotonic_ns()}"
    sessions = [metrion_fixture.CacheSession(url, namespace=namespace, source=f"test_{n}") for n in range(20)]
    assert len({id(session.ledger.sink) for session in sessions}) == 1
    for number, session in enumerate(sessions):
        with covering_process(session, ledger_now=False):  # as the pytest plugin covers each test
            session.publish(record(latency=float(number), source=session.source))
    store = open_store(url)
    deadline = time.monotonic() + 30  # a bound for a broken thread, not a timing: it writes within a second
    while sessions[0].ledger.sink.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    batches = store.keys(f"{PREFIX}{namespace}:")
    assert 1 <= len(batches) <= 3, f"{len(batches)} batches for 20 blocks ended within a second or so"
    assert sorted(r["latency"] for r in read_records(store, namespace)) == [float(n) for n in range(20)]
    other = metrion_fixture.CacheSession(url, namespace=namespace + "-other")
    assert other.ledger.sink is not sessions[0].ledger.sink  # another namespace: batches of its own


def test_the_ledger_is_bounded_oldest_batches_first(url, monkeypatch):
    """Batches are written when full (by the ledger's thread) and the oldest are dropped beyond the bound."""
    store = open_store(url)
    monkeypatch.setattr(ledger, "BATCH_SIZE", 3)
    sink = StoredLedger(store, "bound", retention_seconds())
    for number in range(9):
        sink.add(record(latency=float(number)))
    deadline = time.monotonic() + 30  # a bound for a broken thread, not a timing: it is woken at once
    while sink.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.pending == [] and len(store.keys(f"{PREFIX}bound:")) == 3, "written in batches as they fill"
    assert trim(store, "bound", keep=2) == 1
    assert sorted(r["latency"] for r in read_records(store, "bound")) == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def test_a_failing_store_keeps_ledger_records_never_fails_a_request(url):
    """A ledger write that fails raises nothing and keeps its records for a later write."""

    class Broken:
        def set(self, *args):
            raise ConnectionError("down")

    sink = StoredLedger(Broken(), "x", retention_seconds())
    sink.add(record())
    assert sink.flush() == 0 and len(sink.pending) == 1 and sink.dropped == 0


def test_stats_after_the_demo_print_the_savings(tmp_path, monkeypatch, capsys):
    """The demo's calls are in the ledger: stats shows its hits, the tokens and the time they saved."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METRION_CACHE_URL", raising=False)
    rows = run_demo(latency=0.0, out=io.StringIO())
    report = stats_json(capsys, f"sqlite:///{tmp_path / '.metrion_cache' / 'cache.sqlite3'}")
    total = report["total"]
    assert (total["requests"], total["hits"]) == (len(rows), 3)
    assert total["saved_input_tokens"] == sum(r.input_tokens for r in rows if r.cache == "HIT")
    assert total["saved_output_tokens"] > 0
    # The demo's model is priced, so its savings are in dollars too, from the shipped table.
    price = prices.price_for("claude-haiku-4-5")
    expected_usd = (total["saved_input_tokens"] * price.input + total["saved_output_tokens"] * price.output) / 1e6
    assert total["saved_usd"] == pytest.approx(expected_usd) and expected_usd > 0
    code, out = run(capsys, "stats")
    assert code == 0 and "tokens saved" in out and f"{total['saved_input_tokens']} in" in out
    assert DEMO_NAMESPACE in json.dumps(
        stats_json(capsys, f"sqlite:///{tmp_path}/.metrion_cache/cache.sqlite3", "--by", "namespace")
    )


# -- ls, show, purge ------------------------------------------------------------------------------------------


QUESTION = "What are your delivery times?"  # the question sdk_calls asks by default


@pytest.fixture
def filled(provider, url):
    """Three stored answers: two models, one of them streamed."""
    with metrion_fixture.cache(url, namespace="fill") as session:
        call("openai", provider.url, model="gpt-4o")
        call("openai", provider.url, model="gpt-4o", messages=[{"role": "user", "content": "Another question?"}])
        call("anthropic", provider.url, model="claude-test", stream=True)
    return session


def test_ls_lists_the_stored_answers(filled, url, capsys):
    """ls shows every answer (model, mode, size, tokens), --model filters, --json gives the fields."""
    code, out = run(capsys, "ls", "--url", url)
    assert code == 0 and out.count("gpt-4o") == 2 and "claude-test" in out and "stream" in out and "3 answers" in out
    listed = json.loads(run(capsys, "ls", "--url", url, "--model", "gpt-4o", "--json")[1])
    assert {item["model"] for item in listed} == {"gpt-4o"} and len(listed) == 2
    assert all(item["input_tokens"] > 0 and item["expires_in"] > 0 for item in listed)


def test_show_prints_metadata_and_the_answer_and_no_secret(filled, url, capsys):
    """show KEY (or its first characters) prints the metadata and the answer; API keys are never in it."""
    key = filled.calls[-1].key
    code, out = run(capsys, "show", "--url", url, key[:10])
    assert code == 0 and key in out and "anthropic_messages" in out and out.endswith(f"\n\n{make_answer(QUESTION)}\n")
    code, raw = run(capsys, "show", "--url", url, "--raw", key)
    assert code == 0 and "event: message_stop" in raw
    assert "sk-ant-secret-test-key" not in out and "sk-openai-secret-test-key" not in out
    shown = json.loads(run(capsys, "show", "--url", url, "--json", filled.calls[0].key)[1])
    assert shown[0]["answer"]["object"] == "chat.completion", "the answer is JSON, not a string of JSON"
    assert run(capsys, "show", "--url", url, "0" * 64)[0] == 1


def test_purge_by_model_and_age_says_what_it_removed(filled, url, capsys):
    """purge --model and --older-than delete only what they name and say how many."""
    code, out = run(capsys, "purge", "--url", url, "--model", "claude-test")
    assert code == 0 and "removed 1 stored answer (model 'claude-test')" in out
    assert run(capsys, "purge", "--url", url, "--older-than", "1h")[1].startswith("metrion cache: removed 0")
    assert [item["model"] for item in json.loads(run(capsys, "ls", "--url", url, "--json")[1])] == ["gpt-4o", "gpt-4o"]
    assert stats_json(capsys, url)["total"]["requests"] == 3, "the ledger is kept"


def test_purge_all_asks_first_unless_yes(filled, url, capsys, monkeypatch):
    """purge --all asks; anything but yes (or no answer at all) deletes nothing; --yes skips the question."""
    monkeypatch.setattr("builtins.input", lambda: "n")
    assert run(capsys, "purge", "--url", url, "--all")[0] == 1

    def no_stdin():
        raise EOFError

    monkeypatch.setattr("builtins.input", no_stdin)
    assert run(capsys, "purge", "--url", url, "--all")[0] == 1
    assert len(json.loads(run(capsys, "ls", "--url", url, "--json")[1])) == 3
    code, out = run(capsys, "purge", "--url", url, "--all", "--yes")
    assert code == 0 and "removed 3 stored answers" in out
    assert json.loads(run(capsys, "ls", "--url", url, "--json")[1]) == []


def test_bad_durations_are_refused(url, capsys):
    """A --since that is not a duration is a clear error, exit code 2."""
    assert main(["stats", "--url", url, "--since", "lately"]) == 2
    assert "--since" in capsys.readouterr().err


# -- what a user sees -------------------------------------------------------------------------------------------


def test_money_and_counts_are_printed_one_way():
    """Dollars: four decimals below $1, two above, never $0.0000; counts agree with their noun."""
    assert [money(value) for value in (0.0042, 0.00001, 0.0, 0.1, 0.99999, 1234.5)] == [
        "$0.0042",
        "<$0.0001",
        "$0.00",
        "$0.1000",
        "$1.00",
        "$1,234.50",
    ]
    assert dollars(None, unpriced=2) == "unknown" and dollars(0.5, unpriced=1) == "$0.5000 + unknown"
    assert [plural(1, "answer"), plural(2, "answer"), plural(0, "miss"), plural(3, "entry"), plural(2, "day")] == [
        "1 answer",
        "2 answers",
        "0 misses",
        "3 entries",
        "2 days",
    ]


def test_stats_prints_tiny_amounts_as_less_than_a_hundredth_of_a_cent(url, capsys):
    """A saving too small for four decimals reads <$0.0001, not $0.0000 (which reads as free)."""
    sink = StoredLedger(open_store(url), "ns", retention_seconds())
    sink.add(record(status="HIT", cost_usd=0.0, input_tokens=0, output_tokens=0, saved_output_tokens=1, saved_usd=2e-7))
    sink.flush()
    code, out = run(capsys, "stats", "--url", url)
    assert code == 0 and out.startswith("metrion cache: 1 call in the ledger")
    assert "<$0.0001" in out and "$0.0000" not in out


def test_ls_shows_hits_last_use_and_where_each_answer_came_from(provider, filled, url, capsys):
    """ls: how often each answer was served and when last; the ledger's prompt preview, else the call's source."""
    with metrion_fixture.cache(url, namespace="fill") as session:
        call("openai", provider.url, model="gpt-4o")
        call("openai", provider.url, model="gpt-4o")
    assert [c.status for c in session.calls] == ["HIT", "HIT"]
    hit_key, other_key = filled.calls[0].key, filled.calls[1].key
    # Records as the ledger keeps them with a preview (store_previews) and a source.
    store = open_store(url)
    lines = [
        {"key": other_key, "wire_format": "openai_chat", "status": "HIT", "at": time.time(), "source": "batch.py"},
        {"key": hit_key, "wire_format": "openai_chat", "status": "MISS", "at": 1.0, "preview": "What are your d"},
        {
            "key": filled.calls[2].key,
            "wire_format": "anthropic_messages",
            "at": time.time() + 5,
            "source": "t.py::" + "x" * 40,
        },
    ]
    store.set(f"{PREFIX}fill:0-extra", "\n".join(json.dumps(line) for line in lines).encode(), 3600)
    code, out = run(capsys, "ls", "--url", url)
    assert code == 0
    header, _, *rows = out.splitlines()
    assert header.split() == "key prompt / source model mode hits last used age expires in bytes".split()
    row = {line.split()[0]: line for line in rows}
    assert re.search(r'"What are your d"\s+gpt-4o\s+json\s+2\s+\d+\.\d s ago', row[hit_key[:12]])
    assert re.search(r"batch\.py\s+gpt-4o\s+json\s+1\s+\d+\.\d s ago", row[other_key[:12]])
    assert f"t.py::{'x' * 25}… " in row[filled.calls[2].key[:12]], "a long source is cut to fit one line"
    assert rows[-1].startswith("3 answers, ") and rows[-1].endswith(" bytes")
    listed = {item["key"]: item for item in json.loads(run(capsys, "ls", "--url", url, "--json")[1])}
    assert (listed[hit_key]["hits"], listed[hit_key]["preview"], listed[other_key]["source"]) == (
        2,
        "What are your d",
        "batch.py",
    )
    assert listed[hit_key]["last_used"] == pytest.approx(session.calls[-1].at)


def test_show_prints_human_dates_and_text_prints_the_assembled_answer(filled, url, capsys):
    """show: dates in UTC with how long ago; --text: the answer's words, a stream assembled, in any format."""
    streamed = filled.calls[-1]
    code, out = run(capsys, "show", "--url", url, streamed.key[:12])
    assert code == 0
    assert re.search(r"^ +stored: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+\.\d s ago\)$", out, re.M)
    assert re.search(r"^ +expires: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in \d+\.\d [a-z]+\)$", out, re.M)
    assert re.search(r"^ +format: anthropic_messages, stream$", out, re.M)
    assert "stored_at" not in out, "no raw epoch field names"
    code, text = run(capsys, "show", "--url", url, "--text", streamed.key)
    assert code == 0 and text == make_answer(QUESTION) + "\n"
    assert run(capsys, "show", "--url", url, "--text", filled.calls[1].key)[1] == (
        "Here is a simulated answer to: Another question?\n"
    )
    shown = json.loads(run(capsys, "show", "--url", url, "--json", streamed.key)[1])
    assert shown[0]["text"] == make_answer(QUESTION)
    assert [event["event"] for event in shown[0]["answer"]][-1] == "message_stop"
    assert shown[0]["answer"][0]["data"]["type"] == "message_start", "each event's data is JSON too"


@pytest.mark.parametrize("api", ["gemini", "responses"])
def test_show_text_assembles_gemini_and_responses_streams(provider, url, capsys, api):
    """--text reads every stored format, streamed or not, as the answer's text."""
    with metrion_fixture.cache(url) as session:
        provider_call(api, provider.url, model="gemini-2.5-flash" if api == "gemini" else "gpt-4o", stream=True)
        provider_call(api, provider.url, model="gemini-2.5-flash" if api == "gemini" else "gpt-4o")
    for made in session.calls:
        code, text = run(capsys, "show", "--url", url, "--text", made.key)
        assert code == 0 and text == make_answer(QUESTION) + "\n", (made.wire_format, text)
        assert "\ndata:" not in text and "{" not in text


def test_show_piped_to_head_ends_quietly(provider, url):
    """show | head: the reader leaves early; no BrokenPipeError traceback, nothing on stderr."""
    with metrion_fixture.cache(url) as session:
        call("openai", provider.url, model="gpt-4o", extra_headers={"x-simulate": "big"})
    command = (
        f"{shlex.quote(sys.executable)} -m metrion_fixture.cli show --url {shlex.quote(url)} {session.calls[0].key}"
    )
    piped = subprocess.run(
        ["bash", "-c", f"{command} | head -n 3"], capture_output=True, text=True, timeout=120, check=False
    )
    assert len(piped.stdout.splitlines()) == 3
    assert piped.stderr == "", piped.stderr


def test_purge_by_key_prefix_and_json(filled, url, capsys):
    """purge --key PREFIX deletes that answer only; --json prints JSON; a prefix under 8 characters is refused."""
    key = filled.calls[1].key
    code, out = run(capsys, "purge", "--url", url, "--key", key[:10], "--json")
    purged = json.loads(out)
    assert code == 0 and purged["removed"] == 1 and purged["url"] == url and len(purged["storage_keys"]) == 1
    assert key not in [item["key"] for item in json.loads(run(capsys, "ls", "--url", url, "--json")[1])]
    code, out = run(capsys, "purge", "--url", url, "--key", filled.calls[0].key)
    assert code == 0 and out.startswith(f"metrion cache: removed 1 stored answer (key {filled.calls[0].key}), ")
    assert main(["purge", "--url", url, "--key", "abc"]) == 2
    assert "key 'abc' is too short: give at least its first 8 characters" in capsys.readouterr().err


def test_purge_all_json_asks_on_stderr_and_prints_only_json(filled, url, capsys, monkeypatch):
    """With --json the question goes to stderr, so stdout stays one JSON document."""
    monkeypatch.setattr("builtins.input", lambda: "yes")
    code, out = run(capsys, "purge", "--url", url, "--all", "--json")
    assert code == 0 and json.loads(out)["removed"] == 3


@pytest.mark.parametrize("command", [["stats"], ["ls"], ["show", "0123456789abcdef"], ["purge", "--all", "--yes"]])
def test_commands_never_create_a_store_at_a_mistyped_path(tmp_path, capsys, command):
    """A path with no store is one clear line and exit code 1, and no file appears there."""
    missing = tmp_path / "typo" / "cache.sqlite3"
    code = main([*command, "--url", f"sqlite:///{missing}"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err == f"metrion-cache: no store at {missing} (check --url or $METRION_CACHE_URL)\n"
    assert not missing.exists() and not missing.parent.exists()


def test_an_unreachable_redis_is_one_line(capsys):
    """No Redis listening: one line on stderr naming the store, exit code 1, no traceback."""
    code = main(["stats", "--url", "redis://:hunter2@127.0.0.1:1/0"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("metrion-cache: cannot reach the store redis://:***@127.0.0.1:1/0: ")
    assert "hunter2" not in err and "Traceback" not in err


def test_no_arguments_prints_the_help(capsys):
    """metrion-cache alone prints its usage and its commands."""
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: metrion-cache") and all(name in out for name in ("stats", "ls", "show", "purge"))


def test_the_readme_and_the_notebook_use_models_that_have_a_price():
    """The first thing a user sees has dollars: every model in the README's examples and the notebook is priced."""
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    notebook = (root / "notebooks" / "quickstart.ipynb").read_text()
    models = set(re.findall(r"""model[=:] ?["']([\w.-]+)["']""", readme))
    models |= set(re.findall(r'dspy\.LM\("\w+/([\w.-]+)"', readme))
    models |= set(re.findall(r'METRION_DEMO_MODEL\\", \\"([\w.-]+)\\"', notebook))
    assert "claude-sonnet-4-5" in models and len(models) >= 3, models
    assert [model for model in sorted(models) if prices.price_for(model) is None] == []


def _entry(wire_format: str, chunks: list[bytes], stream: bool) -> Entry:
    return Entry(200, [], chunks, stream, time.time(), 60, "m", wire_format, "k" * 64)


def test_answer_text_names_tool_calls_and_reads_grok_protobuf():
    """show --text: tool calls as [tool call name(arguments)]; xAI's protobuf answers as their words."""
    from xai_sdk.proto import chat_pb2

    completion = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    message = {
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }
    gemini = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [{"text": "thinking...", "thought": True}, {"text": "Sunny"}, {"text": " in Paris."}],
                }
            }
        ]
    }
    assert answer_text(_entry("openai_chat", [json.dumps(completion).encode()], False)) == (
        '[tool call get_weather({"city":"Paris"})]'
    )
    assert answer_text(_entry("anthropic_messages", [json.dumps(message).encode()], False)) == (
        'Let me check.\n[tool call get_weather({"city": "Paris"})]'
    )
    assert answer_text(_entry("gemini", [json.dumps(gemini).encode()], False)) == "Sunny in Paris."
    chunks = [
        chat_pb2.GetChatCompletionChunk(
            outputs=[chat_pb2.CompletionOutputChunk(index=0, delta=chat_pb2.Delta(content=word))]
        ).SerializeToString()
        for word in ("Grok", " says", " hi")
    ]
    assert answer_text(_entry("xai_grpc", chunks, True)) == "Grok says hi"
    whole = chat_pb2.GetChatCompletionResponse(
        outputs=[chat_pb2.CompletionOutput(message=chat_pb2.CompletionMessage(content="Grok says hi"))]
    )
    assert answer_text(_entry("xai_grpc", [whole.SerializeToString()], False)) == "Grok says hi"
    # Bytes no format can read are shown as they are, never an exception.
    assert answer_text(_entry("openai_chat", [b"<html>bad gateway</html>"], False)) == "<html>bad gateway</html>"
