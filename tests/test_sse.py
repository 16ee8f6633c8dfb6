"""Server-sent events, read one way everywhere: the decoder's rules, its size bound, and the cache's
promise that a stream carrying an error event is never stored, whatever its line endings."""

from __future__ import annotations

import itertools
import json
import uuid

import httpx2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conversion import REQUESTS, SDK_FORMATS
from test_conversion_property import STREAMS

from metrion_fixture.formats import FORMATS_BY_NAME, STORED_FORMATS_BY_NAME, ChunkWatcher, StreamWatcher
from metrion_fixture.formats.base import sse, sse_events
from metrion_fixture.formats.sse import MAX_EVENT_BYTES, Event, SSEDecoder, SSEError
from metrion_fixture.transports.httpx2 import CacheTransport

ENDINGS = {"LF": b"\n", "CRLF": b"\r\n", "CR": b"\r"}


def decode(*chunks: bytes, decoder: SSEDecoder | None = None) -> list[Event]:
    """Every event of a whole stream fed in these chunks, the end of the stream included."""
    decoder = decoder or SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.close()


def with_endings(text: str, ending: str) -> bytes:
    return text.encode().replace(b"\n", ENDINGS[ending])


# -- the rules, one at a time ----------------------------------------------------------------------------


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_line_ending_gives_the_same_events(ending):
    stream = with_endings("event: a\ndata: 1\n\ndata: 2\n\n", ending)
    assert decode(stream) == [Event("a", "1"), Event(None, "2")]


def test_a_cr_ending_one_chunk_and_a_lf_starting_the_next_are_one_line_break():
    """Were they two, the blank line between them would end the event right after "a"."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\r\n") == [Event(None, "a\nb")]


def test_a_lone_cr_then_a_chunk_starting_with_data_is_a_line_break():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\r") == [Event(None, "a")]
    assert decoder.feed(b"\ndata: b\r\r") == [Event(None, "b")]  # that LF followed a CR: no blank line of its own


def test_a_lf_alone_in_a_chunk_after_a_cr_is_swallowed():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [Event(None, "a")]


def test_comments_are_skipped():
    assert decode(b": keep-alive\n\n:\ndata: x\n: inside an event\n\n") == [Event(None, "x")]


def test_data_lines_join_with_line_feeds_and_the_event_field_names_the_event():
    assert decode(b"event: delta\ndata: one\ndata:\ndata: three\n\n") == [Event("delta", "one\n\nthree")]


def test_a_field_without_colon_has_an_empty_value():
    assert decode(b"data\n\n") == [Event(None, "")]
    assert decode(b"data\ndata\n\n") == [Event(None, "\n")]
    assert decode(b"event\ndata: x\n\n") == [Event("", "x")]


def test_only_one_space_after_the_colon_is_dropped():
    assert decode(b"data:  two\n\ndata:none\n\ndata: a: b\n\n") == [
        Event(None, " two"),
        Event(None, "none"),
        Event(None, "a: b"),
    ]


def test_id_retry_and_unknown_fields_are_ignored():
    assert decode(b"id: 7\nretry: 100\nfoo: bar\ndata: x\n\nid: 8\n\n") == [Event(None, "x")]


def test_an_event_field_without_data_is_still_an_event():
    """A browser drops it; the cache must see it, or `event: error` alone would pass unseen."""
    assert decode(b"event: error\n\n") == [Event("error", "")]


def test_a_blank_line_with_no_open_event_is_no_event():
    assert decode(b"\n\n\r\n\r\r") == []


def test_close_returns_the_unfinished_last_event():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: whole\n\ndata: cut") == [Event(None, "whole")]
    assert decoder.close() == [Event(None, "cut")]
    assert decode(b"event: end\ndata: x\r") == [Event("end", "x")]
    assert decode(b"data: x\n\n: a comment without its line break") == [Event(None, "x")]


def test_a_character_cut_between_chunks_arrives_whole():
    data = 'data: {"text": "é€😀"}\n\n'.encode()
    for cut in range(len(data)):
        assert decode(data[:cut], data[cut:]) == [Event(None, '{"text": "é€😀"}')]


def test_invalid_utf8_is_replaced_not_raised():
    assert decode(b"data: \xff\xfe ok\n\n") == [Event(None, "\ufffd\ufffd ok")]


def test_a_byte_order_mark_is_dropped_only_at_the_start():
    bom = "\ufeff".encode()
    assert decode(bom[:1], bom[1:] + b"data: x\n\n") == [Event(None, "x")]
    assert decode(b"data: x\n\n" + bom + b"data: y\n\n") == [Event(None, "x")]  # field "\ufeffdata" is unknown


def test_events_unpack_as_event_and_data():
    (event, data), *_ = decode(b"event: a\ndata: b\n\n")
    assert (event, data) == ("a", "b")
    assert sse_events([b"event: a\r", b"data: b\r\r"]) == [("a", "b")]


# -- any stream, cut anywhere ------------------------------------------------------------------------------

line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=8)
events_strategy = st.lists(
    st.tuples(
        st.one_of(st.none(), line_text),
        st.lists(line_text, max_size=3),
        st.lists(line_text, max_size=2),  # comments
    ).filter(lambda parts: parts[0] is not None or parts[1]),
    max_size=8,
)


def render(events, ending: bytes) -> bytes:
    lines = []
    for name, data, comments in events:
        lines += [":" + comment for comment in comments]
        if name is not None:
            lines.append("event: " + name)
        lines += ["data: " + line for line in data]
        lines.append("")
    return b"".join(line.encode() + ending for line in lines)


@settings(max_examples=400, deadline=None, database=None)
@given(
    events_strategy,
    st.sampled_from(list(ENDINGS)),
    st.lists(st.integers(0, 10_000), max_size=12),
    st.booleans(),
)
def test_any_split_into_chunks_gives_the_events_of_the_whole(events, ending, cuts, cut_every_crlf):
    data = render(events, ENDINGS[ending])
    points = {cut % (len(data) + 1) for cut in cuts}
    if cut_every_crlf:  # between every CR and the LF after it
        points |= {index + 1 for index in range(len(data)) if data[index : index + 2] == b"\r\n"}
    bounds = [0, *sorted(points), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    expected = [Event(name, "\n".join(lines)) for name, lines, _ in events]

    assert decode(data) == expected
    assert decode(*pieces) == expected
    assert decode(*(data[i : i + 1] for i in range(len(data)))) == expected
    assert sse_events(pieces) == expected


# -- the size bound ------------------------------------------------------------------------------------------


def test_the_default_bound_is_16_mib():
    assert MAX_EVENT_BYTES == 16 * 1024 * 1024
    assert SSEDecoder().max_event_bytes == MAX_EVENT_BYTES


def test_an_event_within_the_bound_is_read():
    decoder = SSEDecoder(max_event_bytes=100)
    assert decode(b"data: " + b"x" * 90 + b"\n\n", decoder=decoder) == [Event(None, "x" * 90)]
    assert decoder.error is None


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: " + b"x" * 200 + b"\n\n"],  # one line, in one chunk
        [b"x" * 30] * 5,  # one line that never ends, in pieces
        [b"data: " + b"x" * 40 + b"\n"] * 3 + [b"\n"],  # many short lines, one event
        [b": " + b"x" * 200 + b"\n"],  # even a comment
    ],
    ids=["long-line", "unfinished-line", "many-lines", "comment"],
)
def test_an_event_or_line_over_the_bound_is_an_error_and_nothing_more_is_read(chunks):
    decoder = SSEDecoder(max_event_bytes=100)
    assert decode(*chunks, decoder=decoder) == []
    assert decoder.error is not None and "100 bytes" in decoder.error
    assert decoder.feed(b"data: small\n\n") == [] and decoder.close() == []


def test_events_before_the_oversized_one_are_still_returned():
    decoder = SSEDecoder(max_event_bytes=100)
    assert decoder.feed(b"data: ok\n\ndata: " + b"x" * 200 + b"\n\n") == [Event(None, "ok")]
    assert decoder.error is not None


def test_a_stream_with_an_event_over_16_mib_fails_the_watcher_and_the_parse():
    watcher = StreamWatcher(FORMATS_BY_NAME["anthropic_messages"])
    megabyte = b"x" * (1024 * 1024)
    watcher.feed(b"event: content_block_delta\ndata: ")
    for _ in range(17):
        watcher.feed(megabyte)
    assert watcher.failed
    watcher.feed(b"\n\nevent: message_stop\ndata: {}\n\n")
    assert watcher.failed and not watcher.ended
    with pytest.raises(SSEError):
        sse_events([b"data: " + megabyte * 17 + b"\n\n"])
    assert issubclass(SSEError, ValueError)  # conversions and usage treat it as "not readable"


# -- the watchers -------------------------------------------------------------------------------------------------


def watch(wire_format, *chunks: bytes, close: bool = True) -> tuple[bool, bool]:
    watcher = wire_format.stream_watcher()
    for chunk in chunks:
        watcher.feed(chunk)
    if close:
        watcher.close()
    return watcher.ended, watcher.failed


@pytest.mark.parametrize("name", sorted(FORMATS_BY_NAME))
def test_every_http_format_watches_with_the_sse_watcher(name):
    assert isinstance(FORMATS_BY_NAME[name].stream_watcher(), StreamWatcher)


def test_the_grpc_watcher_reads_nothing_and_never_fails():
    grpc = STORED_FORMATS_BY_NAME["xai_grpc"]
    watcher = grpc.stream_watcher()
    assert isinstance(watcher, ChunkWatcher) and not isinstance(watcher, StreamWatcher)
    assert watch(grpc, b"event: error\ndata: {}\n\n", b'data: {"error": 1}\r\r', b"\x00\xff" * 1000) == (False, False)
    assert grpc.has_stream_terminator is False  # so a clean end of the gRPC stream is its completion


def test_a_gemini_error_with_cr_endings_fails_the_watcher():
    gemini = FORMATS_BY_NAME["gemini"]
    ok = sse(None, {"candidates": [{"content": {"parts": [{"text": "4"}]}, "finishReason": "STOP"}]}, crlf=True)
    ok = ok.replace(b"\r\n", b"\r")
    error = sse(None, {"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}, crlf=True)
    assert watch(gemini, ok, ok) == (True, False)
    partial = sse(None, {"candidates": [{"content": {"parts": [{"text": "4"}]}}]}, crlf=True).replace(b"\r\n", b"\r")
    assert watch(gemini, partial, error.replace(b"\r\n", b"\r"), ok) == (False, True)


def test_closing_inside_an_event_fails_the_watcher():
    anthropic = FORMATS_BY_NAME["anthropic_messages"]
    final = b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"}}\n\n'
    stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert watch(anthropic, final) == (True, False)
    assert watch(anthropic, stop) == (False, False)  # the trailer alone proves nothing
    assert watch(anthropic, final[:-1]) == (False, True)  # the final state never finished
    assert watch(anthropic, final + stop[:-1]) == (True, False)  # only the trailer was cut short
    assert watch(anthropic, final + stop + b": bye") == (True, False)  # a comment is no event
    assert watch(FORMATS_BY_NAME["gemini"], b'data: {"error": {"code": 500}}') == (False, True)


def test_an_error_is_final_whatever_follows():
    anthropic = FORMATS_BY_NAME["anthropic_messages"]
    error = b'event: error\rdata: {"type":"error"}\r\r'
    assert watch(anthropic, error, b'event: message_stop\rdata: {"type":"message_stop"}\r\r') == (False, True)


@pytest.mark.parametrize(
    ("name", "body", "storable"),
    [
        ("anthropic_messages", b'{"type": "message", "content": []}', True),
        ("openai_chat", b'{"object": "chat.completion"}', True),
        ("gemini", b"[1, 2]", False),
        ("openai_responses", b'{"object": "resp', False),
        ("anthropic_messages", b"<html>Bad Gateway</html>", False),
        ("gemini", b"\xff\xfe", False),
        ("openai_chat", b"", False),
        ("xai_grpc", b"\x12\x03abc", True),
        ("xai_grpc", b"", False),
    ],
)
def test_storable_body(name, body, storable):
    assert STORED_FORMATS_BY_NAME[name].storable_body(body) is storable


# -- the promise, end to end: a 200 stream with an error event is never stored -----------------------------------

ERROR_EVENTS = {  # what each format's stream_event calls an error, as the provider sends it
    "anthropic_messages": sse(
        "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    ),
    "openai_chat": sse(None, {"error": {"message": "The server had an error", "type": "server_error"}}),
    "openai_responses": sse("error", {"type": "error", "code": "server_error", "message": "The server had an error"}),
    "gemini": sse(None, {"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}}, crlf=True),
}


def cr_only(chunks: list[bytes]) -> list[bytes]:
    return [chunk.replace(b"\r\n", b"\r").replace(b"\n", b"\r") for chunk in chunks]


def provider_stream(name: str, *, error: bool) -> list[bytes]:
    """A provider's stream of a short answer with CR-only line endings: one chunk per event, the
    format's error event after the first when asked (the terminator, if the format has one, still last)."""
    chunks = STREAMS[name](["Delivery ", "takes two days."], [], (10, 5))
    if error:
        chunks = [chunks[0], ERROR_EVENTS[name], *chunks[1:]]
    return cr_only(chunks)


def send_twice(name: str, chunks: list[bytes]) -> tuple[list[int], list[tuple[str, bytes]], CacheTransport, str]:
    """The same streamed request twice through a cache on its own store: provider calls, (status, bytes) seen."""
    sdk = next(sdk for sdk, format_name in SDK_FORMATS.items() if format_name == name)
    path, body = REQUESTS[sdk]
    body = {**body, "stream": True}
    path = path.replace(":generateContent", ":streamGenerateContent")
    calls: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=iter(chunks))

    namespace = f"sse-{uuid.uuid4().hex[:12]}"
    transport = CacheTransport(httpx2.MockTransport(handler), url=f"memory://{uuid.uuid4().hex}", namespace=namespace)
    seen = []
    with httpx2.Client(transport=transport) as client:
        for _ in range(2):
            with client.stream("POST", "https://provider.test" + path, json=body) as response:
                assert response.status_code == 200
                seen.append((response.headers["x-metrion-cache"], b"".join(response.iter_raw())))
    return calls, seen, transport, namespace


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_a_cr_only_stream_with_an_error_event_is_never_stored(name):
    chunks = provider_stream(name, error=True)
    assert b"\n" not in b"".join(chunks) and cr_only([ERROR_EVENTS[name]])[0] in chunks

    calls, seen, transport, namespace = send_twice(name, chunks)

    assert len(calls) == 2
    assert seen == [("MISS", b"".join(chunks))] * 2  # the caller still gets the provider's bytes
    assert transport.session.store.keys(namespace + ":") == []


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_the_same_cr_only_stream_without_the_error_is_stored_and_replayed(name):
    chunks = provider_stream(name, error=False)
    assert b"\n" not in b"".join(chunks)

    calls, seen, transport, namespace = send_twice(name, chunks)

    assert len(calls) == 1
    assert seen == [("MISS", b"".join(chunks)), ("HIT", b"".join(chunks))]
    assert len(transport.session.store.keys(namespace + ":")) == 1


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_a_cr_only_stream_is_converted_like_any_other(name):
    """Usage and stream-to-body conversion read CR-only streams through the same decoder."""
    wire_format = FORMATS_BY_NAME[name]
    chunks = STREAMS[name](["Delivery ", "takes two days."], [], (10, 5))
    assert wire_format.body_from_stream(cr_only(chunks)) == wire_format.body_from_stream(chunks)
    assert wire_format.usage(cr_only(chunks), True) == wire_format.usage(chunks, True)
    assert "Delivery takes two days." in json.dumps(json.loads(wire_format.body_from_stream(cr_only(chunks)) or b""))
