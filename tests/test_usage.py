"""Token usage of every provider's answers, what calls cost, and what hits saved."""

from __future__ import annotations

import json

import pytest
from provider_sdk_calls import call as provider_call
from sdk_calls import call as sdk_call

from metrion_fixture import MetrionCacheError
from metrion_fixture.core.entry import Entry
from metrion_fixture.formats import FORMATS_BY_NAME, Usage
from metrion_fixture.reporting.prices import PRICES_ENV, cost_usd, price_for, provider_of, use_prices


def sse(*events: tuple[str | None, object]) -> list[bytes]:
    out = []
    for event, data in events:
        payload = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode())
    return out


def body(obj: object) -> list[bytes]:
    return [json.dumps(obj).encode()]


# -- reading usage, format by format --------------------------------------------------------------------


def test_anthropic_usage_counts_prompt_cache_reads_and_writes():
    """Anthropic reports cached prompt tokens apart from input_tokens; all of them are input."""
    usage = {
        "input_tokens": 10,
        "output_tokens": 7,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1000,
    }
    found = FORMATS_BY_NAME["anthropic_messages"].usage(body({"type": "message", "usage": usage}), stream=False)
    assert found == Usage(input_tokens=1110, output_tokens=7, cache_read_tokens=1000, cache_write_tokens=100)


def test_anthropic_stream_usage_takes_the_message_delta_totals():
    """message_start has the prompt side; message_delta carries the final output total (and may update input)."""
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 3}},
    }
    chunks = sse(
        ("message_start", start),
        ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 42}}),
        ("message_stop", {"type": "message_stop"}),
    )
    found = FORMATS_BY_NAME["anthropic_messages"].usage(chunks, stream=True)
    assert found == Usage(input_tokens=15, output_tokens=42, cache_read_tokens=3)


def test_openai_chat_usage_plain_and_from_the_final_stream_chunk():
    """OpenAI Chat: usage in the body, or in the final chunk of a stream; none without include_usage."""
    chat = FORMATS_BY_NAME["openai_chat"]
    usage = {
        "prompt_tokens": 20,
        "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 4},
    }
    assert chat.usage(body({"usage": usage}), stream=False) == Usage(20, 9, cache_read_tokens=8, reasoning_tokens=4)
    chunk = {"choices": [{"delta": {"content": "x"}}], "usage": None}
    final = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    assert chat.usage(sse((None, chunk), (None, final), (None, "[DONE]")), stream=True) == Usage(3, 2)
    assert chat.usage(sse((None, chunk), (None, "[DONE]")), stream=True) is None


def test_responses_usage_from_the_body_and_from_response_completed():
    """OpenAI Responses: usage in the response, or in the response.completed event of a stream."""
    responses = FORMATS_BY_NAME["openai_responses"]
    usage = {
        "input_tokens": 30,
        "output_tokens": 11,
        "input_tokens_details": {"cached_tokens": 5},
        "output_tokens_details": {"reasoning_tokens": 6},
    }
    expected = Usage(30, 11, cache_read_tokens=5, reasoning_tokens=6)
    assert responses.usage(body({"object": "response", "usage": usage}), stream=False) == expected
    chunks = sse(
        ("response.created", {"type": "response.created", "response": {"usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "x"}),
        ("response.completed", {"type": "response.completed", "response": {"usage": usage}}),
    )
    assert responses.usage(chunks, stream=True) == expected


def test_gemini_usage_counts_thoughts_as_output_and_takes_the_last_chunk():
    """Gemini: usageMetadata (running totals in a stream), thoughts billed as output."""
    gemini = FORMATS_BY_NAME["gemini"]
    meta = {"promptTokenCount": 40, "candidatesTokenCount": 12, "thoughtsTokenCount": 30, "cachedContentTokenCount": 16}
    assert gemini.usage(body({"usageMetadata": meta}), stream=False) == Usage(
        40, 42, cache_read_tokens=16, reasoning_tokens=30
    )
    chunks = sse((None, {"usageMetadata": {"promptTokenCount": 40}}), (None, {"usageMetadata": meta}))
    assert gemini.usage(chunks, stream=True) == Usage(40, 42, cache_read_tokens=16, reasoning_tokens=30)


@pytest.mark.parametrize("name", sorted(FORMATS_BY_NAME))
def test_answers_without_usage_report_none_rather_than_zero(name):
    """No usage in the answer (or garbage) is unknown, never 0 tokens."""
    wire_format = FORMATS_BY_NAME[name]
    assert wire_format.usage([b'{"id": "x"}'], stream=False) is None
    assert wire_format.usage([b"not json"], stream=False) is None


# -- prices -----------------------------------------------------------------------------------------------


def test_prices_come_from_the_shipped_table_with_snapshot_names():
    """Dated snapshots share their base model's price; near names that are other models do not."""
    assert price_for("claude-sonnet-4-20250514") == price_for("claude-sonnet-4")
    assert price_for("gpt-4o-2024-08-06").model == "gpt-4o"
    assert price_for("gemini-2.0-flash-001").model == "gemini-2.0-flash"
    assert price_for("mistral-small-latest").model == "mistral-small"
    assert price_for("gpt-5-pro") is None and price_for("claude-test") is None
    assert all(price.checked for price in [price_for("gpt-5"), price_for("gemini-2.5-pro")])
    # 1M input + 1M output tokens of gpt-4o: $2.50 + $10.00
    assert cost_usd("gpt-4o", Usage(1_000_000, 1_000_000)) == pytest.approx(12.5)
    # cached reads are billed at the cache-read price
    assert cost_usd("claude-sonnet-4", Usage(1_000_000, 0, cache_read_tokens=1_000_000)) == pytest.approx(0.3)


def test_unknown_models_have_no_cost_but_a_provider():
    """An unpriced model's cost is unknown (None), never $0."""
    assert cost_usd("my-finetune", Usage(100, 100)) is None
    assert cost_usd("gpt-4o", None) is None
    assert provider_of("grok-code-fast-1") == "xai" and provider_of("my-finetune", "openai") == "openai"


def test_a_price_file_extends_and_overrides_the_table(tmp_path, monkeypatch):
    """METRION_CACHE_PRICES names a TOML file whose entries add to and replace the shipped ones."""
    prices = tmp_path / "prices.toml"
    prices.write_text(
        '[models."my-finetune"]\nprovider = "openai"\ninput = 1.0\noutput = 2.0\nchecked = "2026-01-01"\n'
        '[models."gpt-4o"]\ninput = 100.0\noutput = 100.0\n'
    )
    monkeypatch.setenv(PRICES_ENV, str(prices))
    assert cost_usd("my-finetune", Usage(1_000_000, 1_000_000)) == pytest.approx(3.0)
    assert cost_usd("gpt-4o", Usage(1_000_000, 0)) == pytest.approx(100.0)
    assert price_for("gpt-4o").provider == "openai", "a provider left out is found from the name"
    monkeypatch.delenv(PRICES_ENV)
    assert cost_usd("my-finetune", Usage(1, 1)) is None


def test_use_prices_checks_the_file_at_once(tmp_path):
    """A price file that is not valid TOML or lacks numbers is refused with its name."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[models."x"]\ninput = "cheap"\noutput = 1\n')
    with pytest.raises(MetrionCacheError, match="bad.toml"):
        use_prices(bad)
    with pytest.raises(MetrionCacheError, match="missing.toml"):
        use_prices(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text('[models."house-model"]\ninput = 4\noutput = 8\n')
    try:
        use_prices(good)
        assert cost_usd("house-model", Usage(1_000_000, 0)) == pytest.approx(4.0)
    finally:
        use_prices(None)
    assert price_for("house-model") is None


# -- what calls record -----------------------------------------------------------------------------------


def _call(sdk: str, url: str, stream: bool, **options):
    if sdk in ("anthropic", "openai"):
        return sdk_call(sdk, url, stream=stream, **options)
    return provider_call(sdk, url, stream=stream, **options)


def _sdk_tokens(sdk: str, usage) -> tuple[int, int]:
    if sdk == "gemini":
        return usage.prompt_token_count, usage.candidates_token_count + (usage.thoughts_token_count or 0)
    if sdk in ("openai", "mistral"):
        return usage.prompt_tokens, usage.completion_tokens
    return usage.input_tokens, usage.output_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sdk", ["anthropic", "openai", "gemini", "mistral", "responses"])
def test_a_miss_records_the_tokens_the_sdk_saw_and_a_hit_records_them_as_saved(provider, memory_session, sdk, stream):
    """MISS: the provider's tokens and their cost; HIT: 0 tokens and $0.00 spent, the stored answer's tokens saved."""
    first = _call(sdk, provider.url, stream)
    _call(sdk, provider.url, stream)
    miss, hit = memory_session.calls
    tokens = _sdk_tokens(sdk, first.usage)
    assert (miss.status, hit.status) == ("MISS", "HIT")
    assert (miss.input_tokens, miss.output_tokens) == tokens and tokens[1] > 0
    assert (hit.input_tokens, hit.output_tokens, hit.cost_usd) == (0, 0, 0.0)
    assert (hit.saved_input_tokens, hit.saved_output_tokens) == tokens
    assert hit.saved_usd == miss.cost_usd
    assert miss.provider == hit.provider == {"responses": "openai", "gemini": "google"}.get(sdk, sdk)
    stats = memory_session.stats
    assert (stats.input_tokens, stats.output_tokens, stats.saved_input_tokens, stats.saved_output_tokens) == (
        *tokens,
        *tokens,
    )


def test_priced_models_cost_dollars_and_unpriced_ones_cost_unknown(provider, memory_session):
    """A priced model's calls carry dollars from the table; an unpriced one None, counted as unpriced."""
    for _ in range(2):
        sdk_call("openai", provider.url, model="gpt-4o")
        sdk_call("openai", provider.url, model="gpt-house-model")
    priced_miss, unpriced_miss, priced_hit, unpriced_hit = memory_session.calls
    expected = cost_usd("gpt-4o", Usage(priced_miss.input_tokens, priced_miss.output_tokens))
    assert priced_miss.cost_usd == expected and expected > 0
    assert priced_hit.saved_usd == expected and priced_hit.cost_usd == 0.0
    assert unpriced_miss.cost_usd is None and unpriced_hit.saved_usd is None
    assert unpriced_miss.input_tokens > 0
    stats = memory_session.stats
    assert stats.cost_usd == pytest.approx(expected) and stats.saved_usd == pytest.approx(expected)
    assert stats.unpriced == 2


def test_usage_is_kept_with_the_entry_and_a_hit_reads_it_from_there(provider, memory_session):
    """The usage is computed once when storing and kept in the entry's metadata: hits do not re-read the answer."""
    sdk_call("anthropic", provider.url, model="claude-sonnet-4")
    record = memory_session.calls[-1]
    key = f"{memory_session.settings.namespace}:anthropic_messages:json:{record.key}"
    entry = Entry.decode(memory_session.store.get(key))
    assert entry.extra["usage"] == {"input_tokens": record.input_tokens, "output_tokens": record.output_tokens}
    # Change the kept usage only: the hit reports it, so it did not parse the body.
    doctored = Entry(**{**entry.__dict__, "extra": {"usage": {"input_tokens": 1000, "output_tokens": 2000}}})
    memory_session.store.set(key, doctored.encode(), 60)
    sdk_call("anthropic", provider.url, model="claude-sonnet-4")
    hit = memory_session.calls[-1]
    assert (hit.saved_input_tokens, hit.saved_output_tokens) == (1000, 2000)
    assert hit.saved_usd == pytest.approx((1000 * 3 + 2000 * 15) / 1_000_000)


def test_bypassed_calls_have_unknown_tokens(provider, memory_session):
    """A call the cache let through without reading (x-metrion-cache: false) has no token count."""
    sdk_call("openai", provider.url, extra_headers={"x-metrion-cache": "false"})
    record = memory_session.calls[-1]
    assert record.status == "BYPASS" and record.input_tokens is None and record.cost_usd is None


# -- where savings are shown ----------------------------------------------------------------------------------


def test_the_pytest_summary_shows_tokens_and_dollars_saved(provider, memory_session):
    """The plugin's summary line adds the tokens (and dollars) hits saved, taken from the session stats."""
    from metrion_fixture.integrations.pytest_plugin import _empty_totals, _State, summary_lines  # noqa: PLC0415
    from metrion_fixture.reporting.reports import money  # noqa: PLC0415

    for _ in range(2):
        sdk_call("openai", provider.url, model="gpt-4o")
    state = _State.__new__(_State)  # only its totals are used here
    state.totals = _empty_totals()
    state.finish("test_x", memory_session)
    stats = memory_session.stats
    line = summary_lines(state.totals, verbose=False)[1]
    assert f"tokens saved {stats.saved_input_tokens:,} in / {stats.saved_output_tokens:,} out" in line
    assert f"({money(stats.saved_usd)}) at list prices" in line and stats.saved_usd > 0


def test_the_notebook_report_shows_tokens_and_dollars_saved():
    """A cell's report line names the tokens its hits saved and their price."""
    from metrion_fixture.integrations.ipython import CacheReport  # noqa: PLC0415

    report = CacheReport(from_cache=2, from_provider=1, saved_seconds=1.0, saved_tokens=1234, saved_usd=0.0021)
    assert "1,234 tokens saved ($0.0021)" in report.text
    assert "tokens saved" not in CacheReport(from_provider=1).text
