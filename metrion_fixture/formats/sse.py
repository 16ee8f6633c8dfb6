"""Server-sent events, read the one way the whole cache reads them.

The rules are the WHATWG HTML standard's "Parsing an event stream": lines end
with CRLF, LF or a lone CR; a line starting with ``:`` is a comment; ``event:``
names the event, each ``data:`` line adds a line to its data; one space after the
colon is not part of the value; a blank line ends the event. ``id`` and ``retry``
only matter to a client that reconnects, which a cache never does.

Two deliberate departures, both so that no error event goes unseen:

- an event with an ``event:`` field but no ``data:`` is returned (a browser would drop it);
- :meth:`SSEDecoder.close` returns the event a stream left unfinished (no blank line after
  it, perhaps not even a line break) instead of dropping it: the caller decides what an
  unfinished event means.
"""

from __future__ import annotations

from typing import NamedTuple

# One event (or one line) larger than this is not an answer worth keeping, and reading
# on would hold an unbounded amount of memory for one event.
MAX_EVENT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_new_event = tuple.__new__


class Event(NamedTuple):
    event: str | None  # the ``event:`` field, None when the event has none
    data: str  # the ``data:`` lines, joined with "\n"


class SSEError(ValueError):
    """A stream the decoder refused to read on (an event over the size bound)."""


class SSEDecoder:
    """Splits an event stream into events as its bytes arrive, in chunks cut anywhere.

    ``feed`` returns the events the chunk completed; ``close`` ends the stream. Once an
    event or line grows past ``max_event_bytes``, ``error`` says so and the decoder reads
    nothing more. Text is decoded (UTF-8, invalid bytes replaced) only per whole line or
    event, so a character cut between two chunks arrives intact.
    """

    __slots__ = (
        "max_event_bytes",
        "error",
        "_pending",
        "_pending_size",
        "_after_cr",
        "_started",
        "_event",
        "_data",
        "_size",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.error: str | None = None
        # The pieces of an unfinished line, joined only once its line break arrives: a long
        # event in small chunks then costs linear time, not a copy of the line per chunk.
        self._pending: list[bytes] = []
        self._pending_size = 0
        # The last chunk ended with CR: a LF starting the next one belongs to that line break.
        self._after_cr = False
        self._started = False
        self._event: bytes | None = None
        self._data: list[bytes] = []
        self._size = 0  # bytes of the fields read so far into the open event

    def feed(self, chunk: bytes) -> list[Event]:
        if self.error is not None or not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk[0] == 10:  # LF
                chunk = chunk[1:]
                if not chunk:
                    return []
        limit = self.max_event_bytes
        # An int, not b"\n": the bytes needle goes through the buffer protocol, ten times slower.
        if 10 not in chunk and 13 not in chunk:
            self._pending.append(chunk)
            self._pending_size += len(chunk)
            if self._pending_size + self._size > limit:
                self._fail()
            return []
        if self._pending:
            self._pending.append(chunk)
            buffer = b"".join(self._pending)
            self._pending = []
        else:
            buffer = chunk
        # bytes.splitlines breaks at LF, CRLF and lone CR, and nowhere else.
        lines = buffer.splitlines()
        last = buffer[-1]
        if last == 13:  # CR
            self._after_cr = True
            self._pending_size = 0
        elif last == 10:
            self._pending_size = 0
        else:
            tail = lines.pop()
            self._pending = [tail]
            self._pending_size = len(tail)
        too_long = None
        if len(buffer) > limit:  # only then can a line be too long: no look at each line otherwise
            too_long = next((index for index, line in enumerate(lines) if len(line) > limit), None)
            if too_long is not None:
                del lines[too_long:]  # the events before it are still good
        if not self._started and lines:
            self._started = True
            if lines[0].startswith(_BOM):
                lines[0] = lines[0][len(_BOM) :]
        events: list[Event] = []
        event, data, size = self._event, self._data, self._size
        for line in lines:
            if not line:
                if data or event is not None:
                    if size > limit:
                        self._fail()
                        return events
                    # tuple.__new__ directly: a NamedTuple's own constructor is a Python call.
                    events.append(
                        _new_event(
                            Event,
                            (
                                None if event is None else event.decode("utf-8", "replace"),
                                b"\n".join(data).decode("utf-8", "replace"),
                            ),
                        )
                    )
                    event, data, size = None, [], 0
                continue
            if line[0] == 58:  # ':' starts a comment
                continue
            field, _, value = line.partition(b":")
            if value and value[0] == 32:  # one space
                value = value[1:]
            if field == b"data":
                data.append(value)
                size += len(line)
            elif field == b"event":
                event = value
                size += len(line)
        self._event, self._data, self._size = event, data, size
        if too_long is not None or self._pending_size + size > limit:
            self._fail()
        return events

    @property
    def in_event(self) -> bool:
        """Whether the bytes fed so far stop inside an event (a line or fields not yet ended by a blank line)."""
        return bool(self._pending) or bool(self._data) or self._event is not None

    def close(self) -> list[Event]:
        """The stream is over: the event it left unfinished, if any (see the module's notes)."""
        # As if the stream ended with a line break and a blank line (a CR just read swallows one LF).
        events = self.feed(b"\n\n")
        self._after_cr = False
        return events

    def _fail(self) -> None:
        self.error = f"an event or line of the stream is larger than {self.max_event_bytes} bytes"
        self._pending, self._pending_size, self._event, self._data, self._size = [], 0, None, [], 0
