"""The stored form of one provider answer: bytes and JSON, never pickle.

Layout: ``MAGIC | u32 meta length | meta JSON | (u32 length | chunk)* | u32 crc32``.
A streamed answer keeps its chunk boundaries so a hit replays the same chunks
in the same order; a non-streamed answer is a single chunk. The checksum and
the counts in the metadata make a truncated or corrupted value detectable, so
it is treated as a miss instead of being replayed.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

MAGIC = b"MFE1"
FORMAT_VERSION = 1
_U32 = struct.Struct(">I")
_META_DECODER = json.JSONDecoder()


class CorruptEntry(ValueError):
    """A stored value that is not a whole entry of a known version."""


# Copying a value's chunks out costs about 0.1 us each: nothing for a usual answer, but for a
# stream of thousands of events it would delay the first one. Past this many, decode only
# checks the framing and notes where each chunk starts; chunks are copied as they are read.
_CUT_LAZILY_FROM = 256


class Chunks(Sequence[bytes]):
    """The chunks of a long stored stream, copied out of the value as they are replayed.

    ``Entry.decode`` has already checked the checksum and walked every length prefix, so
    this is exactly the list of chunks: length, indexing, slicing, iteration, equality
    with a list; it just spends nothing on chunk 2,000 before chunk 1 has been sent.
    """

    __slots__ = ("_value", "_starts")

    def __init__(self, value: bytes, starts: list[int]) -> None:
        # starts[i]: where chunk i's bytes begin; the last item is one prefix past the end.
        self._value, self._starts = value, starts

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __iter__(self) -> Iterator[bytes]:
        value, starts = self._value, self._starts
        for index in range(len(starts) - 1):
            yield value[starts[index] : starts[index + 1] - 4]

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("chunk index out of range")
        return self._value[self._starts[index] : self._starts[index + 1] - 4]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, Chunks)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # a list is not hashable either

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass(frozen=True)
class Entry:
    status: int
    headers: list[tuple[str, str]]
    chunks: Sequence[bytes]  # a list, or Chunks for a long stream read back from the store
    stream: bool
    stored_at: float
    ttl: int
    model: str
    wire_format: str
    key: str
    # How long the provider took to produce the whole answer: what a hit saves.
    provider_seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)
    # Where it was written: namespace, wire format, mode and scope in one string. A read checks
    # it, so an entry copied or moved under another storage key is a miss (empty: written by a
    # version that did not record it, a miss too).
    storage_key: str = ""

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def encode(self) -> bytes:
        fields = {
            "v": FORMAT_VERSION,
            "status": self.status,
            "headers": self.headers,
            "stream": self.stream,
            "stored_at": self.stored_at,
            "ttl": self.ttl,
            "model": self.model,
            "format": self.wire_format,
            "key": self.key,
            "provider_seconds": self.provider_seconds,
            "chunks": len(self.chunks),
            "size": self.size,
            "extra": self.extra,
            "at": self.storage_key,
        }
        try:
            meta = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (a model name cut inside an emoji): escaped, same value
            meta = json.dumps(fields, separators=(",", ":")).encode("ascii")
        parts = [MAGIC, _U32.pack(len(meta)), meta]
        for chunk in self.chunks:
            parts.append(_U32.pack(len(chunk)))
            parts.append(chunk)
        body = b"".join(parts)
        return body + _U32.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, value: bytes) -> Entry:
        # On the hit path: no copy of the value, chunks sliced straight out of it.
        if len(value) < 12 or not value.startswith(MAGIC):
            raise CorruptEntry("not a metrion cache entry")
        end = len(value) - 4
        (checksum,) = _U32.unpack_from(value, end)
        if zlib.crc32(memoryview(value)[:end]) != checksum:
            raise CorruptEntry("checksum mismatch")
        (meta_length,) = _U32.unpack_from(value, 4)
        offset = 8 + meta_length
        if offset > end:
            raise CorruptEntry("truncated entry")
        try:
            meta = _META_DECODER.decode(value[8:offset].decode("utf-8"))
        except ValueError as error:  # UnicodeDecodeError is one too
            raise CorruptEntry("unreadable metadata") from error
        if not isinstance(meta, dict) or meta.get("v") != FORMAT_VERSION:
            raise CorruptEntry("unknown entry version")
        count = meta["chunks"]
        if isinstance(count, int) and count > _CUT_LAZILY_FROM:
            # A long stream: the same walk and checks as below, without copying the chunks yet.
            starts: list[int] = []
            note, unpack = starts.append, _U32.unpack_from
            while offset + 4 <= end:
                (length,) = unpack(value, offset)
                offset += 4
                note(offset)
                offset += length
            if offset != end or len(starts) != count:
                raise CorruptEntry("truncated entry")
            note(end + 4)
            chunks: Sequence[bytes] = Chunks(value, starts)
        elif count == 1 and offset + 4 <= end:  # a non-streamed answer: one chunk, no loop
            (length,) = _U32.unpack_from(value, offset)
            offset += 4
            chunks = [value[offset : offset + length]]
            offset += length
        else:
            chunks = []
            append, unpack = chunks.append, _U32.unpack_from
            while offset + 4 <= end:  # fewer bytes than a length prefix: caught as truncated below
                (length,) = unpack(value, offset)
                offset += 4
                append(value[offset : offset + length])
                offset += length
        if offset != end or len(chunks) != count:
            raise CorruptEntry("truncated entry")
        # The frozen dataclass's __init__ sets each field through object.__setattr__; filling
        # the instance dict at once does the same for a fraction of the cost on every hit.
        entry = object.__new__(cls)
        entry.__dict__.update(
            status=meta["status"],
            headers=[(name, text) for name, text in meta["headers"]],
            chunks=chunks,
            stream=meta["stream"],
            stored_at=meta["stored_at"],
            ttl=meta["ttl"],
            model=meta["model"],
            wire_format=meta["format"],
            key=meta["key"],
            provider_seconds=meta.get("provider_seconds", 0.0),
            extra=meta.get("extra") or {},
            storage_key=meta.get("at") or "",
        )
        return entry


class RecentEntries:
    """Entries decoded lately, found again by their exact bytes.

    The same answer read again (a test suite or a notebook asking the same question) comes
    back as the same bytes, which decode to the same entry: this hands back that entry
    instead of checking the checksum and walking the framing of the value again (200 us for
    a 2,000-event stream, all of it before the first event). Found by length and stored
    checksum, then confirmed by comparing the whole value, so a different value is never
    taken for a remembered one. Entries handed out are shared: nothing may change them.
    """

    def __init__(self, max_entries: int = 256, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._max_entries, self._max_bytes = max_entries, max_bytes
        self._entries: dict[tuple[int, bytes], tuple[bytes, Entry]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def decode(self, value: bytes) -> Entry:
        """``Entry.decode(value)``, from memory when this value was decoded lately."""
        found = self._entries.get((len(value), value[-4:]))
        if found is not None and found[0] == value:  # the same object, or a memcmp of equal length
            return found[1]
        entry = Entry.decode(value)
        if len(value) <= self._max_bytes // 4:
            self._remember((len(value), value[-4:]), bytes(value), entry)
        return entry

    def _remember(self, slot: tuple[int, bytes], value: bytes, entry: Entry) -> None:
        with self._lock:
            old = self._entries.pop(slot, None)
            if old is not None:
                self._bytes -= len(old[0])
            self._entries[slot] = (value, entry)
            self._bytes += len(value)
            while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
                oldest = next(iter(self._entries))  # dicts keep insertion order: first in, first out
                self._bytes -= len(self._entries.pop(oldest)[0])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
