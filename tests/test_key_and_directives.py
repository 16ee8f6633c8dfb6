"""Pure unit tests, no network: the cache key (core/key.py), the request directives and
configuration checks (core/directives.py), and the stored entry format (core/entry.py)."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metrion_fixture
from metrion_fixture import MetrionCacheError, cache_key
from metrion_fixture.core.directives import (
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    DirectiveError,
    check_namespace,
    check_session_mode,
    check_ttl,
    parse_header_mode,
    parse_max_age,
)
from metrion_fixture.core.engine import decode_hit
from metrion_fixture.core.entry import MAGIC, CorruptEntry, Entry
from metrion_fixture.core.key import canonical_json


def independent_key(model, messages) -> str:
    """The key as the spec defines it, computed without the library."""
    text = json.dumps({"model": model, "messages": messages}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the key -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, messages",
    [
        ("claude-test", [{"role": "user", "content": "What are your delivery times?"}]),
        ("gpt-test", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
        ("m", [{"role": "user", "content": "Grüße, ça va? 配送にはどのくらいかかりますか 🚚"}]),
        ("m", [{"role": "user", "content": [{"type": "text", "text": "nested", "cache_control": {"type": "x"}}]}]),
        ("m", []),
    ],
    ids=["plain", "system", "non-ascii", "blocks", "empty"],
)
def test_cache_key_is_sha256_of_the_canonical_json(model, messages):
    """cache_key = sha256 hex of JSON with sorted keys, compact separators and raw UTF-8 (ensure_ascii=False)."""
    assert cache_key(model, messages) == independent_key(model, messages)
    assert canonical_json({"model": model, "messages": messages}).decode("utf-8") == json.dumps(
        {"model": model, "messages": messages}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def test_non_ascii_text_is_hashed_as_utf8_not_escaped():
    """Non-ASCII text enters the key as UTF-8 bytes, not as \\uXXXX escapes."""
    messages = [{"role": "user", "content": "délai de livraison ✓"}]
    escaped = json.dumps({"model": "m", "messages": messages}, sort_keys=True, separators=(",", ":"))
    assert cache_key("m", messages) != hashlib.sha256(escaped.encode()).hexdigest()
    assert "délai".encode() in canonical_json({"messages": messages})


def test_key_is_exported_at_top_level_and_is_hex_sha256():
    """metrion_fixture.cache_key is the public key function and returns 64 hex digits."""
    key = metrion_fixture.cache_key("m", [{"role": "user", "content": "x"}])
    assert len(key) == 64 and int(key, 16) >= 0


def test_key_changes_with_model_message_content_role_and_order():
    """Anything in model or messages changes the key, including message order."""
    a = {"role": "user", "content": "a"}
    b = {"role": "assistant", "content": "b"}
    base = cache_key("m", [a, b])
    assert cache_key("m2", [a, b]) != base
    assert cache_key("m", [b, a]) != base
    assert cache_key("m", [{**a, "content": "A"}, b]) != base
    assert cache_key("m", [{**a, "role": "system"}, b]) != base
    assert cache_key("m", [a]) != base


json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.text(max_size=40) | json_value},
    optional={"name": st.text(max_size=8), "extra": json_value},
)


def _reorder(value, rnd):
    """The same JSON value with every object's keys inserted in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _reorder(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_reorder(v, rnd) for v in value]
    return value


@settings(max_examples=200, deadline=None, database=None)
@given(model=st.text(min_size=1, max_size=20), messages=st.lists(message, max_size=5), rnd=st.randoms())
def test_key_is_stable_under_dict_key_order(model, messages, rnd):
    """Two messages lists that differ only in the order of dict keys have the same key."""
    shuffled = _reorder(messages, rnd)
    assert shuffled == messages
    assert cache_key(model, shuffled) == cache_key(model, messages) == independent_key(model, messages)


# -- request directives ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, None),
        ("true", "true"),
        ("TRUE", "true"),
        (" refresh ", "refresh"),
        ("False", "false"),
        ("\ttrue\t", "true"),
    ],
)
def test_header_mode_is_case_and_space_tolerant(raw, expected):
    """x-metrion-cache accepts true/refresh/false in any case with surrounding spaces; absent is None."""
    assert parse_header_mode(raw) == expected


@pytest.mark.parametrize("raw", ["yes", "1", "", "  ", "off", "replay", "true,true", "tru e"])
def test_invalid_header_mode_is_a_directive_error(raw):
    """Other values (including session-only modes off/replay) are rejected with a message naming the header."""
    with pytest.raises(DirectiveError, match=r"^metrion cache: invalid x-metrion-cache header"):
        parse_header_mode(raw)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (None, None),
        ("", None),
        ("no-cache", None),
        ("max-age=60", 60),
        ("MAX-AGE = 60", 60),
        ('max-age="120"', 120),
        ("no-store, max-age=30, private", 30),
        ("max-age=0", 0),
        (f"max-age={MAX_TTL_SECONDS}", MAX_TTL_SECONDS),
        (f"max-age={MAX_TTL_SECONDS + 1}", MAX_TTL_SECONDS),
        ("max-age=99999999999", MAX_TTL_SECONDS),
    ],
)
def test_max_age_parsing(raw, expected):
    """Cache-Control max-age gives whole seconds capped at 365 days; 0 stays 0; absent is None."""
    assert parse_max_age(raw) == expected


@pytest.mark.parametrize(
    "raw", ["max-age=abc", "max-age=-1", "max-age=", "max-age=1.5", "max-age=1e3", "max-age=²", "max-age=٣"]
)
def test_malformed_max_age_is_a_directive_error(raw):
    """A max-age that is not a whole ASCII number of seconds is rejected."""
    with pytest.raises(DirectiveError, match=r"^metrion cache: invalid Cache-Control max-age"):
        parse_max_age(raw)


def test_ttl_constants():
    """The default TTL is 7 days and the cap is 365 days."""
    assert DEFAULT_TTL_SECONDS == 604800
    assert MAX_TTL_SECONDS == 365 * 86400


@pytest.mark.parametrize(
    "ttl, seconds",
    [
        (1, 1),
        (3600, 3600),
        (60.0, 60),
        ("3600", 3600),
        ("90m", 5400),
        ("12h", 43200),
        (" 7d ", 604800),
        ("45s", 45),
        (10**12, MAX_TTL_SECONDS),
        ("400d", MAX_TTL_SECONDS),
    ],
)
def test_ttl_option_accepts_seconds_and_durations(ttl, seconds):
    """The ttl option takes seconds or '90m'/'12h'/'7d' durations, capped at 365 days."""
    assert check_ttl(ttl) == seconds


@pytest.mark.parametrize("ttl", [0, -1, "0", "abc", "-5", "1.5h", 1.5, True, False, None, "7w", [60]])
def test_bad_ttl_option_raises(ttl):
    """Zero, negative, fractional, boolean and unparseable TTLs are configuration errors."""
    with pytest.raises(MetrionCacheError, match="invalid ttl"):
        check_ttl(ttl)


@pytest.mark.parametrize(
    "mode, expected", [("true", "true"), ("REFRESH", "refresh"), (" off ", "off"), ("replay", "replay")]
)
def test_session_modes(mode, expected):
    """Session modes are true/refresh/off/replay, case and space tolerant."""
    assert check_session_mode(mode) == expected


@pytest.mark.parametrize("mode", ["false", "on", "", None, True, "readonly"])
def test_unknown_session_mode_raises(mode):
    """Anything else (including the header-only 'false') is a configuration error."""
    with pytest.raises(MetrionCacheError, match="unknown cache mode"):
        check_session_mode(mode)


@pytest.mark.parametrize("namespace", ["a", "proj-1", "x.y_z", "A" * 64])
def test_valid_namespaces(namespace):
    """Namespaces are 1-64 letters, digits, '.', '_' or '-'."""
    assert check_namespace(namespace) == namespace


@pytest.mark.parametrize("namespace", ["", "A" * 65, "has space", "colon:ns", "slash/ns", "ünï", 5, None, "a*"])
def test_bad_namespaces_raise(namespace):
    """Anything else, notably ':' which separates storage key parts, is rejected."""
    with pytest.raises(MetrionCacheError, match="invalid namespace"):
        check_namespace(namespace)


def test_metrion_cache_error_is_a_value_error():
    """MetrionCacheError subclasses ValueError, so generic validation handlers catch it."""
    assert issubclass(MetrionCacheError, ValueError)


# -- the stored entry --------------------------------------------------------------------------------


def make_entry(**changes) -> Entry:
    fields = {
        "status": 200,
        "headers": [("content-type", "text/event-stream; charset=utf-8"), ("request-id", "req_1")],
        "chunks": [b"event: a\ndata: {}\n\n", b"", b"data: \xe2\x9c\x93\n\n", b"x" * 1000],
        "stream": True,
        "stored_at": 1700000000.5,
        "ttl": 3600,
        "model": "claude-test",
        "wire_format": "anthropic_messages",
        "key": "k" * 64,
        "provider_seconds": 0.25,
        "extra": {"note": "é"},
    }
    fields.update(changes)
    return Entry(**fields)


def test_entry_round_trips_with_chunk_boundaries():
    """encode/decode keeps every field and each chunk's exact bytes and boundaries (even empty ones)."""
    entry = make_entry()
    value = entry.encode()
    assert value.startswith(MAGIC)
    assert Entry.decode(value) == entry
    assert Entry.decode(value).size == sum(len(c) for c in entry.chunks)


def test_entry_is_json_not_pickle():
    """The metadata is plain JSON after the magic and the length."""
    value = make_entry().encode()
    (length,) = struct.unpack(">I", value[4:8])
    meta = json.loads(value[8 : 8 + length])
    assert meta["model"] == "claude-test" and meta["chunks"] == 4 and meta["v"] == 1


def _recrc(body: bytes) -> bytes:
    return body + struct.pack(">I", zlib.crc32(body))


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: v[:-1],  # truncated
        lambda v: v[: len(v) // 2],
        lambda v: b"XXXX" + v[4:],  # wrong magic
        lambda v: v[:20] + bytes([v[20] ^ 1]) + v[21:],  # bit flip
        lambda v: b"",
        lambda v: MAGIC,
        lambda v: _recrc(v[:-4][:-3]),  # a chunk cut short, checksum recomputed
        lambda v: _recrc(v[:-4] + b"\x00\x00"),  # stray bytes after the last chunk, checksum recomputed
        lambda v: _recrc(v[:-4] + b"\x00\x00\x00\x01z"),  # an extra chunk the metadata does not count
        lambda v: _recrc(MAGIC + struct.pack(">I", 2) + b"[]"),  # metadata not an object
        lambda v: _recrc(MAGIC + struct.pack(">I", 8) + b'{"v": 9}'),  # unknown version
    ],
    ids=[
        "cut-1",
        "half",
        "magic",
        "bitflip",
        "empty",
        "magic-only",
        "short-chunk",
        "stray-bytes",
        "extra-chunk",
        "meta-list",
        "version",
    ],
)
def test_damaged_entries_are_detected_and_read_as_a_miss(damage):
    """A damaged stored value raises CorruptEntry and is a miss (None), never an exception for the request."""
    value = damage(make_entry().encode())
    with pytest.raises(CorruptEntry):
        Entry.decode(value)
    assert decode_hit(value) is None


def test_the_same_request_reuses_its_plan_and_any_difference_makes_a_new_one() -> None:
    """plan_request remembers recent plans by their whole input; nothing that decides a plan is left out."""
    from metrion_fixture.core.engine import PlanMemo, Settings, plan_request
    from metrion_fixture.formats import wire_format_for

    path = "/v1/messages"
    wire_format = wire_format_for("POST", path)
    body = json.dumps({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]}).encode()
    settings = Settings.build(namespace="plans")
    memo = PlanMemo()
    first = plan_request(settings, wire_format, path, {}, body, memo=memo)
    assert plan_request(settings, wire_format, path, {}, bytes(bytearray(body)), memo=memo) is first
    assert first.outcome == "MISS" and first.write_ttl == settings.ttl

    refresh = plan_request(settings, wire_format, path, {"x-metrion-cache": "refresh"}, body, memo=memo)
    assert refresh.outcome == "REFRESH" and not refresh.read
    short = plan_request(settings, wire_format, path, {"cache-control": "max-age=60"}, body, memo=memo)
    assert short.write_ttl == 60
    bad = plan_request(settings, wire_format, path, {"x-metrion-cache": "maybe"}, body, memo=memo)
    assert bad.outcome == "ERROR" and bad.error is not None and bad.error.status == 400
    elsewhere = plan_request(Settings.build(namespace="other-plans"), wire_format, path, {}, body, memo=memo)
    assert elsewhere.storage_key.startswith("other-plans:") and first.storage_key.startswith("plans:")
    replay = plan_request(Settings.build(namespace="plans", mode="replay"), wire_format, path, {}, body, memo=memo)
    assert replay.read_only
    streamed = plan_request(settings, wire_format, path, {}, body[:-1] + b',"stream":true}', memo=memo)
    assert streamed.stream and streamed.key == first.key and streamed.storage_key != first.storage_key
    # Per-credential entries depend on a header outside the memo's key: never remembered.
    scoped = Settings.build(namespace="plans", scope="credential")
    key_a = plan_request(scoped, wire_format, path, {"x-api-key": "key-a"}, body, memo=memo)
    key_b = plan_request(scoped, wire_format, path, {"x-api-key": "key-b"}, body, memo=memo)
    assert key_a.storage_key != key_b.storage_key
