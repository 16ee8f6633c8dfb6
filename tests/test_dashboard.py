"""The dashboard (metrion-cache dashboard, serve's /_metrion/) and metrion-cache report --html.

The figures are checked against sums computed here from the records the test made (the calls'
own CallRecords plus ledger lines written for earlier days), never against the code under test.
The browser test drives Debian's chromium through Playwright and never downloads a browser.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import requests
from sdk_calls import call

import metrion_fixture
from metrion_fixture.cli import main
from metrion_fixture.integrations.dashboard import DashboardApp
from metrion_fixture.integrations.server import ProxyApp
from metrion_fixture.reporting.reports import dollars, duration, plural, tokens
from metrion_fixture.runtime.ledger import PREFIX, read_records, trim
from metrion_fixture.stores import open_store
from metrion_fixture.testing.provider import make_answer

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("METRION_TEST_ARTIFACTS") or ROOT / "test-artifacts")
CHROMIUM = "/usr/bin/chromium"
DAY = 86400
EARLIER_SOURCE = "scripts/nightly_eval.py"


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'cache.sqlite3'}"


def write_ledger(url: str, namespace: str, records: list[dict[str, Any]]) -> None:
    """Ledger lines as the ledger writes them (one batch of JSON lines), for calls of earlier days."""
    lines = "\n".join(json.dumps(record) for record in records).encode()
    open_store(url).set(f"{PREFIX}{namespace}:{time.time_ns():020d}-0-{uuid.uuid4().hex[:8]}", lines, 30 * DAY)


def earlier_call(days_ago: float, status: str, **fields: Any) -> dict[str, Any]:
    """One record of an earlier day: a priced gpt-4o call (a hit spends nothing and saves its cost)."""
    hit = status == "HIT"
    spent = {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0} if hit else {}
    base = {
        "key": uuid.uuid4().hex * 2,
        "wire_format": "openai_chat",
        "model": "gpt-4o",
        "status": status,
        "stream": False,
        "latency": 0.004 if hit else 1.2,
        "http_status": 200,
        "saved_seconds": 1.1 if hit else 0.0,
        "at": time.time() - days_ago * DAY,
        "provider": "openai",
        "input_tokens": 420,
        "output_tokens": 180,
        "cost_usd": 0.00285,
        "saved_input_tokens": 420 if hit else 0,
        "saved_output_tokens": 180 if hit else 0,
        "saved_usd": 0.00285 if hit else None,
        "source": EARLIER_SOURCE,
        **spent,
    }
    return {**base, **fields}


def make_run(provider, url: str) -> list[dict[str, Any]]:
    """A run with hits and misses: two namespaces, three models, streamed and not, a bypass; plus earlier days.

    Returns every record the test made, as the ledger holds them (dicts with their namespace).
    """
    provider.latency = 0.15  # the provider's time, which each hit saves
    made: list[dict[str, Any]] = []
    # A named source with prompt previews, as a batch script would set them; the evals keep the test's node id.
    with metrion_fixture.cache(url, namespace="support-bot", source="support_bot.py", store_previews=True) as bot:
        for _ in range(2):
            call("openai", provider.url, model="gpt-4o", messages=ask("What are your delivery times?"))
            call("openai", provider.url, model="gpt-4o-mini", stream=True, messages=ask("Do you ship abroad?"))
            call("anthropic", provider.url, model="claude-haiku-4-5", messages=ask("How do I return an item?"))
        call("anthropic", provider.url, model="claude-haiku-4-5", stream=True, messages=ask("Is there a warranty?"))
        call(
            "openai",
            provider.url,
            model="gpt-4o",
            messages=ask("Track my order"),
            extra_headers={"x-metrion-cache": "false"},
        )
    made += [{**vars(record), "namespace": "support-bot"} for record in bot.calls]
    with metrion_fixture.cache(
        url, namespace="support-bot", source="support_bot.py", mode="replay", store_previews=True
    ) as replay:
        with pytest.raises(openai.BadRequestError, match="replay"):
            call("openai", provider.url, model="gpt-4o", messages=ask("A question never recorded"))
    made += [{**vars(record), "namespace": "support-bot"} for record in replay.calls]
    with metrion_fixture.cache(url, namespace="evals") as evals:
        for _ in range(3):
            call("openai", provider.url, model="gpt-4o", messages=ask("Summarise the refund policy."))
    made += [{**vars(record), "namespace": "evals"} for record in evals.calls]
    provider.latency = 0.0
    earlier = [
        earlier_call(days, status)
        for days, statuses in ((1, "HHHM"), (2, "HHM"), (3, "HMMM"), (5, "HHHHHM"), (6, "MM"), (12, "HM"))
        for status in ("HIT" if letter == "H" else "MISS" for letter in statuses)
    ]
    write_ledger(url, "evals", earlier)
    return made + [{**record, "namespace": "evals"} for record in earlier]


def expected(records: list[dict[str, Any]], since: float | None) -> dict[str, Any]:
    """The Savings card's figures, summed here from the records."""
    chosen = [record for record in records if since is None or record["at"] >= since]
    hits = [record for record in chosen if record["status"] == "HIT"]
    misses = [record for record in chosen if record["status"] in ("MISS", "REFRESH")]
    saved_prices = [record["saved_usd"] for record in hits if record["saved_usd"] is not None]
    return {
        "requests": len(chosen),
        "hits": len(hits),
        "misses": len(misses),
        "saved_usd": sum(saved_prices) if saved_prices else None,
        "saved_input_tokens": sum(record["saved_input_tokens"] for record in hits),
        "saved_output_tokens": sum(record["saved_output_tokens"] for record in hits),
        "saved_seconds": sum(record["saved_seconds"] for record in hits),
        "hit_rate": len(hits) / (len(hits) + len(misses)),
    }


def get(app, path: str, **headers: str) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8788") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def _ran(_provider_server, tmp_path_factory) -> tuple[str, list[dict[str, Any]]]:
    """One run for the tests that only read it (each run takes seconds)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('dashboard') / 'cache.sqlite3'}"
    _provider_server.reset()
    return url, make_run(_provider_server, url)


@pytest.fixture
def run(_ran) -> list[dict[str, Any]]:
    return _ran[1]


@pytest.fixture
def run_url(_ran) -> str:
    return _ran[0]


# -- the JSON --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("period, days", [("today", None), ("7d", 7), ("30d", 30), ("all", None)])
def test_savings_add_up_the_calls_of_the_period(run, run_url, period, days):
    """api/savings: calls, hits, misses, dollars, tokens and provider time saved, hit rate: the records' sums."""
    now = time.time()
    since = {"today": now - now % DAY, "all": None}.get(period, now - (days or 0) * DAY)
    want = expected(run, since)
    body = get(DashboardApp(open_store(run_url)), f"/_metrion/api/savings?period={period}").json()
    totals = body["totals"]
    assert body["period"] == period
    for name in ("requests", "hits", "misses", "saved_input_tokens", "saved_output_tokens"):
        assert totals[name] == want[name], name
    assert totals["saved_usd"] == pytest.approx(want["saved_usd"])
    assert totals["saved_seconds"] == pytest.approx(want["saved_seconds"])
    assert totals["hit_rate"] == pytest.approx(want["hit_rate"])
    assert body["text"]["saved_usd"] == dollars(want["saved_usd"])
    assert body["text"]["saved_tokens"] == tokens(want["saved_input_tokens"] + want["saved_output_tokens"])
    assert body["text"]["hit_rate"] == f"{want['hit_rate']:.0%}"
    # The chart: one bar per day of the period, each day's hits and misses from the records of that day.
    by_day: dict[str, list[int]] = {}
    for record in run:
        if since is None or record["at"] >= since:
            day = by_day.setdefault(time.strftime("%Y-%m-%d", time.gmtime(record["at"])), [0, 0])
            day[0] += record["status"] == "HIT"
            day[1] += record["status"] in ("MISS", "REFRESH")
    chart = {day["day"]: [day["hits"], day["misses"]] for day in body["days"] if day["hits"] or day["misses"]}
    assert chart == by_day
    assert body["days"][-1]["day"] == time.strftime("%Y-%m-%d", time.gmtime(now))
    if days:
        assert len(body["days"]) in (days, days + 1)  # a rolling window starts inside its first day


def test_logs_show_cached_calls_as_spending_nothing_and_what_they_saved(run, run_url):
    """api/logs: newest first; a hit spends 0 tokens and $0.00 and says what it saved; a miss shows its cost."""
    body = get(DashboardApp(open_store(run_url)), "/_metrion/api/logs").json()
    rows = body["rows"]
    assert body["matched"] == len(rows) == len(run)
    assert [row["at"] for row in rows] == sorted((record["at"] for record in run), reverse=True)
    by_key_and_time = {(record["key"], record["at"]): record for record in run}
    for row in rows:
        record = by_key_and_time[(row["key"], row["at"])]
        assert row["cached"] == (record["status"] == "HIT")
        assert (row["model"], row["provider"], row["wire_format"], row["stream"], row["status"]) == (
            record["model"],
            record["provider"],
            record["wire_format"],
            record["stream"],
            record["status"],
        )
        if row["cached"]:
            assert (row["input_tokens"], row["output_tokens"], row["tokens_text"], row["cost_text"]) == (
                0,
                0,
                "0 / 0",
                "$0.00",
            )
            saved_tokens = record["saved_input_tokens"] + record["saved_output_tokens"]
            assert saved_tokens > 0 and record["saved_usd"] > 0
            assert row["saved_usd_text"] == dollars(record["saved_usd"])
            assert row["saved_more_text"] == f"{tokens(saved_tokens)} tokens · {duration(record['saved_seconds'])}"
        else:
            assert row["saved_usd_text"] == row["saved_more_text"] == ""
    priced = [row for row in rows if row["status"] == "MISS"]
    assert {row["model"] for row in priced} == {"gpt-4o", "gpt-4o-mini", "claude-haiku-4-5"}
    for row in priced:
        cost = by_key_and_time[(row["key"], row["at"])]["cost_usd"]
        assert cost > 0 and row["cost_text"] == dollars(cost)
    previews = {row["preview"] for row in rows if row["namespace"] == "support-bot"}
    assert "What are your delivery times?" in previews, "store_previews: the row shows the prompt"
    assert {row["preview"] for row in rows if row["namespace"] == "evals"} == {""}, "previews are off by default"
    (refused,) = [row for row in rows if row["status"] == "ERROR"]
    assert refused["refusal"] == "replay_miss" and refused["tokens_text"] == "–" and not refused["cached"]
    bypassed = [row for row in rows if row["status"] == "BYPASS"]
    assert len(bypassed) == 1 and not bypassed[0]["cached"]


def test_logs_filter_by_namespace_model_source_and_status(run, run_url):
    """Each filter keeps exactly the matching calls; the choices list what the ledger holds."""
    app = DashboardApp(open_store(run_url))
    body = get(app, "/_metrion/api/logs").json()
    assert body["choices"]["namespace"] == ["evals", "support-bot"]
    assert body["choices"]["status"] == sorted({record["status"] for record in run})
    assert "scripts/nightly_eval.py" in body["choices"]["source"]
    cases = {
        "namespace=evals": lambda r: r["namespace"] == "evals",
        "model=gpt-4o-mini": lambda r: r["model"] == "gpt-4o-mini",
        "source=scripts/nightly_eval.py": lambda r: r.get("source") == "scripts/nightly_eval.py",
        "status=HIT": lambda r: r["status"] == "HIT",
        "source=support_bot.py": lambda r: r.get("source") == "support_bot.py",
        "namespace=support-bot&status=MISS": lambda r: r["namespace"] == "support-bot" and r["status"] == "MISS",
    }
    for query, keep in cases.items():
        rows = get(app, f"/_metrion/api/logs?{query}").json()["rows"]
        assert sorted(row["at"] for row in rows) == sorted(r["at"] for r in run if keep(r)), query
        assert rows, query
    assert len(get(app, "/_metrion/api/logs?limit=3").json()["rows"]) == 3


def test_a_row_opens_the_calls_key_stored_answer_and_expiry(run, run_url):
    """api/call: a cached call's stored answer holds the text the SDK got; a bypassed call has none."""
    app = DashboardApp(open_store(run_url))
    logs = get(app, "/_metrion/api/logs?namespace=support-bot&status=HIT").json()["rows"]
    plain = next(row for row in logs if row["model"] == "gpt-4o")
    query = f"namespace=support-bot&wire_format=openai_chat&stream=0&key={plain['key']}"
    detail = get(app, f"/_metrion/api/call?{query}").json()
    assert detail["found"] and detail["key"] == plain["key"] and detail["stream"] is False
    assert make_answer("What are your delivery times?") in detail["answer"]
    assert detail["expires_text"].startswith("in ") and detail["expires_at"] > time.time()
    streamed = next(row for row in logs if row["model"] == "gpt-4o-mini")
    query = f"namespace=support-bot&wire_format=openai_chat&stream=1&key={streamed['key']}"
    detail = get(app, f"/_metrion/api/call?{query}").json()
    assert detail["found"] and detail["stream"] is True
    assert detail["answer"] == make_answer("Do you ship abroad?"), "the stream's events, assembled"
    assert detail["storage_key"].startswith(f"support-bot:openai_chat:stream:{streamed['key']}")
    bypass = next(row for row in get(app, "/_metrion/api/logs?status=BYPASS").json()["rows"])
    query = f"namespace=support-bot&wire_format=openai_chat&stream=0&key={bypass['key']}"
    missing = get(app, f"/_metrion/api/call?{query}").json()
    assert missing["found"] is False and "No stored answer" in missing["message"]
    assert get(app, "/_metrion/api/call?namespace=x").status_code == 400


def test_bad_requests_and_the_page(url):
    """A bad period is a 400 that says what to use; the page is one HTML file with no external asset."""
    app = DashboardApp(open_store(url))
    bad = get(app, "/_metrion/api/savings?period=soon")
    assert bad.status_code == 400 and "today, 7d, 30d, all" in bad.json()["error"]["message"]
    page = get(app, "/_metrion/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "no CDN: the page works offline"
    assert get(app, "/_metrion").status_code == 307
    assert get(app, "/_metrion/nope").status_code == 404


def test_a_token_guards_the_page_and_the_json(url):
    """With a token, the page and the JSON need it (header, or ?token= for a browser's first visit)."""
    app = DashboardApp(open_store(url), token="s3cret")
    assert get(app, "/_metrion/api/logs").status_code == 401
    assert get(app, "/_metrion/api/logs", **{"x-metrion-proxy-token": "wrong"}).status_code == 401
    assert get(app, "/_metrion/api/logs", **{"x-metrion-proxy-token": "s3cret"}).status_code == 200
    assert get(app, "/_metrion/?token=s3cret").status_code == 200
    assert get(app, "/_metrion/").status_code == 401


def test_without_a_token_only_this_machines_names_and_pages_are_answered(run, run_url):
    """DNS rebinding: a page whose name is re-pointed at 127.0.0.1 must not read the prompts and answers."""
    record = run[0]
    call = f"/_metrion/api/call?namespace={record['namespace']}&wire_format={record['wire_format']}&key={record['key']}"
    dashboard_app = DashboardApp(open_store(run_url))
    proxy_app = ProxyApp(metrion_fixture.CacheSession(run_url))
    for app in (dashboard_app, proxy_app):
        for path in ("/_metrion/", "/_metrion/api/logs", call):
            for host in ("evil.example", "evil.example:8788", "localhost.evil.example", "127.0.0.1.nip.io:8788"):
                refused = get(app, path, host=host)
                assert refused.status_code == 403, (path, host)
                assert "without a token" in refused.json()["error"]["message"]
            for host in ("localhost", "LOCALHOST:8788", "127.0.0.1:8788", "[::1]:8788"):
                assert get(app, path, host=host).status_code == 200, (path, host)
            cross_site = get(app, path, host="127.0.0.1:8788", origin="http://evil.example")
            assert cross_site.status_code == 403 and "evil.example" in cross_site.json()["error"]["message"]
            assert get(app, path, host="127.0.0.1:8788", origin="http://127.0.0.1:8788").status_code == 200
        assert get(app, "/_metrion/health", host="evil.example").status_code == 200, "health tells nothing"
    # With a token, the token is the guard (a proxy on a LAN name is reached by that name).
    guarded = DashboardApp(open_store(run_url), token="tok")
    assert (
        get(guarded, "/_metrion/api/logs", host="cache.lan:8788", **{"x-metrion-proxy-token": "tok"}).status_code == 200
    )
    assert get(guarded, "/_metrion/api/logs", host="cache.lan:8788").status_code == 401


def test_serve_answers_the_dashboard_beside_its_routes(run, run_url):
    """metrion-cache serve's app hands /_metrion/ to the dashboard, with the proxy's token; health stays open."""
    session = metrion_fixture.CacheSession(run_url)
    app = ProxyApp(session, token="tok")
    assert get(app, "/_metrion/health").json() == {"status": "ok"}
    assert get(app, "/_metrion/api/logs").status_code == 401
    body = get(app, "/_metrion/api/savings?period=all", **{"x-metrion-proxy-token": "tok"}).json()
    assert body["totals"]["requests"] == len(run)
    assert get(ProxyApp(session), "/_metrion/").text.startswith("<!doctype html>")
    assert get(ProxyApp(session), "/nowhere/v1").status_code == 404


def test_serve_shows_its_own_calls_before_its_ledger_batch_is_written(provider, url):
    """serve writes its ledger every few minutes: its dashboard adds the calls still waiting, once each."""
    session = metrion_fixture.CacheSession(url, namespace="proxy", mode="true")
    app = ProxyApp(session, {"openai": provider.url}, ledger_flush_seconds=0)
    body = {"model": "gpt-4o", "messages": ask("What are your delivery times?")}

    async def go() -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787") as client:
            tags = []
            for _ in range(2):
                response = await client.post("/openai/v1/chat/completions", json=body)
                tags.append(response.headers["x-metrion-cache"])
            logs = (await client.get("/_metrion/api/logs")).json()
            savings = (await client.get("/_metrion/api/savings?period=today")).json()
            return tags, logs, savings

    tags, logs, savings = asyncio.run(go())
    assert tags == ["MISS", "HIT"]
    assert read_records(open_store(url)) == [], "nothing written yet"
    assert [row["status"] for row in logs["rows"]] == ["HIT", "MISS"]
    assert (savings["totals"]["requests"], savings["totals"]["hits"]) == (2, 1)
    assert session.flush_ledger() == 2
    # A batch written between the look at the waiting records and the read of the store is in both.
    store = open_store(url)
    both = get(DashboardApp(store, unwritten=lambda: read_records(store)), "/_metrion/api/logs").json()
    assert both["matched"] == 2, "a record both written and still waiting is counted once"


def test_the_dashboard_command_refuses_an_open_address_without_a_token(url, capsys):
    """metrion-cache dashboard listens on 127.0.0.1 only, unless given a token (as serve)."""
    open_store(url).set("probe", b"1", 60)  # the store exists: the refusal is about the address
    assert main(["dashboard", "--url", url, "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err


def test_a_refresh_reads_only_the_new_ledger_batches(url, monkeypatch):
    """The dashboard keeps the batches it parsed: a refresh reads new ones only, and forgets trimmed ones."""
    from metrion_fixture.reporting import dashboard as figures

    monkeypatch.setattr(figures, "_SETTLED_SECONDS", 0.0)  # every written batch is settled at once
    reads: list[str] = []
    real = figures.read_batch
    monkeypatch.setattr(figures, "read_batch", lambda store, key: reads.append(key) or real(store, key))
    store, cache = open_store(url), figures.BatchCache()

    def requests_seen(period: str = "all") -> int:
        return figures.savings(store, period, batches=cache)["totals"]["requests"]

    write_ledger(url, "a", [earlier_call(1, "HIT")])
    assert (requests_seen(), len(reads)) == (1, 1)
    assert (requests_seen(), len(reads)) == (1, 1), "the second look reads nothing"
    write_ledger(url, "a", [earlier_call(2, "MISS"), earlier_call(0.5, "HIT")])
    assert (requests_seen(), len(reads)) == (3, 2)
    # A batch written ten days ago holds only older calls: a 7-day look does not even read it.
    old = time.time_ns() - 10 * DAY * 10**9
    lines = json.dumps(earlier_call(10.5, "MISS")).encode()
    store.set(f"{PREFIX}a:{old:020d}-0-{uuid.uuid4().hex[:8]}", lines, 30 * DAY)
    assert (requests_seen("7d"), len(reads)) == (3, 2)
    assert (requests_seen(), len(reads)) == (4, 3)
    trim(store, "a", keep=1)
    assert requests_seen() == 2, "trimmed batches are forgotten"


# -- the HTML report -------------------------------------------------------------------------------------------


def embedded(html: str) -> dict[str, Any]:
    found = re.search(r"const EMBEDDED = (.*?);\n", html)
    assert found, "the report embeds its data"
    return json.loads(found.group(1))


def test_report_html_holds_the_periods_logs_and_savings(run, run_url, tmp_path, capsys):
    """metrion-cache report --html: one file, no server, the same figures as the dashboard's JSON."""
    target = tmp_path / "report.html"
    assert main(["report", "--url", run_url, "--html", str(target), "--period", "7d"]) == 0
    want = expected(run, time.time() - 7 * DAY)
    out = capsys.readouterr().out
    assert f"wrote {target}" in out and f"{want['requests']} calls" in out and dollars(want["saved_usd"]) in out
    html = target.read_text()
    assert "</script>" in html and not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    data = embedded(html)
    assert data["savings"]["totals"]["requests"] == want["requests"]
    assert data["savings"]["totals"]["hits"] == want["hits"]
    assert data["savings"]["text"]["saved_usd"] == dollars(want["saved_usd"])
    assert len(data["logs"]["rows"]) == want["requests"]
    cached = [row for row in data["logs"]["rows"] if row["cached"]]
    assert len(cached) == want["hits"]
    live = 0
    for row in cached:
        detail = data["details"][f"{row['namespace']}|{row['wire_format']}|{int(row['stream'])}|{row['key']}"]
        assert detail["found"] == (row["source"] != EARLIER_SOURCE), row  # earlier days' calls left no entry
        if detail["found"]:
            live += 1
            assert detail["storage_key"].startswith(f"{row['namespace']}:{row['wire_format']}:")
            assert detail["key"] == row["key"] and detail["answer"]
    assert live == sum(1 for r in run if r["status"] == "HIT" and r.get("source") != EARLIER_SOURCE) > 0


def test_a_report_cuts_long_answers_and_the_dashboard_shows_them_whole(provider, url, tmp_path):
    """A report keeps each answer's first 4,000 characters (and says it cut); the live dashboard up to 20,000."""
    question = "Please repeat: " + "lorem ipsum " * 500
    with metrion_fixture.cache(url, namespace="long") as session:
        answer = call("openai", provider.url, model="gpt-4o", messages=ask(question)).text
    (record,) = session.calls
    assert len(answer) > 4000
    target = tmp_path / "report.html"
    assert main(["report", "--url", url, "--html", str(target)]) == 0
    (detail,) = embedded(target.read_text())["details"].values()
    assert detail["truncated"] and detail["answer"] == answer[:4000]
    query = f"namespace=long&wire_format=openai_chat&stream=0&key={record.key}"
    live = get(DashboardApp(open_store(url)), f"/_metrion/api/call?{query}").json()
    assert not live["truncated"] and live["answer"] == answer


def test_report_keeps_prompts_and_answers_inside_its_script(url, tmp_path):
    """A prompt or answer holding </script> cannot end the embedded data early (no HTML injection)."""
    write_ledger(url, "x", [earlier_call(0.1, "MISS", model="</script><script>alert(1)</script>", source="<b>")])
    target = tmp_path / "report.html"
    assert main(["report", "--url", url, "--html", str(target)]) == 0
    html = target.read_text()
    assert "<script>alert(1)" not in html
    assert embedded(html)["logs"]["rows"][0]["model"] == "</script><script>alert(1)</script>"


# -- a real browser ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_chromium(playwright):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium chromium-driver (.ci/run does)")
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


def card_figures(page) -> dict[str, str]:
    names = (
        *("saved-usd", "saved-tokens", "saved-input", "saved-output", "saved-time", "hit-rate"),
        *("hits", "hits-word", "misses", "misses-word"),
    )
    return {name: page.locator(f"#{name}").inner_text() for name in names}


def want_figures(want: dict[str, Any]) -> dict[str, str]:
    return {
        "saved-usd": dollars(want["saved_usd"]),
        "saved-tokens": tokens(want["saved_input_tokens"] + want["saved_output_tokens"]),
        "saved-input": tokens(want["saved_input_tokens"]),
        "saved-output": tokens(want["saved_output_tokens"]),
        "saved-time": duration(want["saved_seconds"]),
        "hit-rate": f"{want['hit_rate']:.0%}",
        "hits": f"{want['hits']:,}",
        "misses": f"{want['misses']:,}",
        # the card's nouns agree with its counts ("1 hit", "2 misses"), as reports.plural writes them
        "hits-word": plural(want["hits"], "hit").split(" ", 1)[1],
        "misses-word": plural(want["misses"], "miss").split(" ", 1)[1],
    }


def check_cached_badges(page, records: list[dict[str, Any]]) -> None:
    rows = page.locator("tr.call")
    assert rows.count() == len(records)
    hits = 0
    for index in range(rows.count()):
        row = rows.nth(index)
        badge = row.locator(".badge.cached")
        is_hit = row.get_attribute("data-status") == "HIT"
        assert badge.count() == (1 if is_hit else 0), row.inner_text()
        if is_hit:
            hits += 1
            assert badge.inner_text() == "Cached"
            assert row.locator("[data-col=tokens]").inner_text() == "0 / 0"
            assert row.locator("[data-col=cost]").inner_text() == "$0.00"
            record = next(r for r in records if r["key"] == row.get_attribute("data-key") and r["status"] == "HIT")
            assert row.locator("[data-col=saved]").inner_text().startswith(dollars(record["saved_usd"]) + " saved")
    assert hits == sum(record["status"] == "HIT" for record in records) > 0


@pytest.mark.slow
def test_the_dashboard_in_a_real_browser(provider, url, tmp_path):
    """Chromium loads the dashboard: the Cached badge on exactly the cached rows, the card equal to the ledger."""
    from playwright.sync_api import expect, sync_playwright

    records = make_run(provider, url)
    with dashboard_server(url) as base:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1360, "height": 1100}, device_scale_factor=1)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(base + "/_metrion/")
            page.wait_for_selector("body[data-loaded='1']")
            check_cached_badges(page, records)
            assert page.locator("tr.call[data-status=ERROR] .badge.error").inner_text() == "Replay miss"
            assert card_figures(page) == want_figures(expected(records, time.time() - 7 * DAY))
            for period, since in (("30d", time.time() - 30 * DAY), ("all", None)):
                page.click(f"#periods button[data-period='{period}']")
                page.wait_for_selector(f"#periods button.on[data-period='{period}']")
                assert card_figures(page) == want_figures(expected(records, since)), period
            bars = page.locator("#chart g[data-day]")
            assert bars.count() >= 13
            # A filter, then a cached row opened: its key and the stored answer.
            page.select_option("select[data-filter=namespace]", "support-bot")
            expect(page.locator("tr.call")).to_have_count(sum(r["namespace"] == "support-bot" for r in records))
            cached = page.locator("tr.call[data-status=HIT]").first
            key = cached.get_attribute("data-key")
            cached.click()
            detail = page.locator("tr.detail pre.answer")
            detail.wait_for()
            assert key and key in page.locator("tr.detail").inner_text()
            assert detail.inner_text().strip()
            page.select_option("select[data-filter=namespace]", "")
            expect(page.locator("tr.call")).to_have_count(len(records))
            # Another process's call reaches the ledger: the page's next refresh shows it. Asked for here: the
            # page's own timer backs off after a slow refresh (test_the_page_refreshes_by_itself_and_backs_off).
            late = {**earlier_call(0, "HIT", source="scripts/late.py"), "namespace": "evals"}
            write_ledger(url, "evals", [late])
            records.append(late)
            page.click("#periods button[data-period='all']")
            expect(page.locator("tr.call")).to_have_count(len(records), timeout=30_000)
            expect(page.locator("tr.call").first).to_have_attribute("data-key", late["key"])
            page.click("#periods button[data-period='30d']")
            page.wait_for_selector("#periods button.on[data-period='30d']")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=False)
            assert errors == []

            # The HTML report, opened from its file: the same badges and figures, no server.
            report = tmp_path / "report.html"
            assert main(["report", "--url", url, "--html", str(report), "--period", "30d"]) == 0
            page = browser.new_page(viewport={"width": 1360, "height": 1100})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(report.as_uri())
            page.wait_for_selector("body[data-loaded='1']")
            within = [record for record in records if record["at"] >= time.time() - 30 * DAY]
            check_cached_badges(page, within)
            expect(page.locator("#periods")).to_be_hidden()  # a report is of one period: it says which
            assert page.locator("#period-label").inner_text() == "Last 30 days"
            assert card_figures(page) == want_figures(expected(records, time.time() - 30 * DAY))
            page.select_option("select[data-filter=status]", "HIT")
            assert page.locator("tr.call").count() == sum(record["status"] == "HIT" for record in within)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            assert errors == []
            browser.close()


@pytest.mark.slow
def test_the_page_refreshes_by_itself_and_backs_off(url):
    """The open page asks again every 10 s, and after a refresh that took D, not before 20 x D: an open tab
    never keeps a large ledger's process busy. The page's clock is Playwright's, moved by hand: nothing
    here depends on how fast this machine is."""
    from playwright.sync_api import Route, sync_playwright

    write_ledger(url, "evals", [earlier_call(0, "HIT")])
    held: list[Route] = []
    holding = False

    def hold(route: Route) -> None:
        if holding:
            held.append(route)
        else:
            route.continue_()

    with dashboard_server(url) as base, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page()
        # Counted in the page, as each request is made (the Python side hears of requests later).
        page.add_init_script(
            "window.asked = 0; const f = window.fetch; window.fetch = (...a) => (window.asked++, f(...a));"
        )
        page.clock.install()
        page.clock.pause_at(time.time() * 1000 + 1000)  # from now on the page's time moves only when told
        page.route("**/_metrion/api/**", hold)
        page.goto(base + "/_metrion/")
        page.wait_for_selector("body[data-loaded='1']")

        def asked() -> int:
            return int(page.evaluate("window.asked"))

        def settled(before: str) -> None:
            """Wait for the refresh in flight to end (it shows the page's time), so its next timer is set."""
            deadline = time.monotonic() + 60
            while page.locator("#updated").inner_text() == before:
                if time.monotonic() > deadline:
                    pytest.fail("the refresh did not end")
                page.wait_for_timeout(50)

        assert asked() == 2  # savings and logs
        page.clock.run_for(9_000)
        assert asked() == 2, "not before 10 s"
        updated = page.locator("#updated").inner_text()
        holding = True
        page.clock.run_for(1_000)
        assert asked() == 4, "a refresh at 10 s"
        deadline = time.monotonic() + 60
        while len(held) < 2:  # the refresh's requests are held: it takes 2 s of the page's time
            if time.monotonic() > deadline:
                pytest.fail(f"{len(held)} of the refresh's 2 requests reached the route")
            page.wait_for_timeout(50)
        page.clock.run_for(2_000)
        holding = False
        for route in held:
            route.continue_()
        settled(updated)
        updated = page.locator("#updated").inner_text()
        page.clock.run_for(39_000)
        assert asked() == 4, "after a refresh of 2 s, the next one waits 40 s"
        page.clock.run_for(1_000)
        assert asked() == 6
        settled(updated)  # a quick refresh (no time passed): back to every 10 s
        page.clock.run_for(9_000)
        assert asked() == 6
        page.clock.run_for(1_000)
        assert asked() == 8
        browser.close()


@contextmanager
def dashboard_server(url: str) -> Iterator[str]:
    """``metrion-cache dashboard`` in a process of its own, as a user starts it; yields its address."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("METRION_CACHE_", "METRION_PROXY_"))}
    log = tempfile.TemporaryFile()
    command = [sys.executable, "-m", "metrion_fixture.cli", "dashboard", "--url", url, "--port", str(port)]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base + "/_metrion/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"metrion-cache dashboard did not start: {log.read().decode()}")
            time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
