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
import zlib
from dataclasses import dataclass, field

MAGIC = b"MFE1"
FORMAT_VERSION = 1
_U32 = struct.Struct(">I")


class CorruptEntry(ValueError):
    """A stored value that is not a whole entry of a known version."""


@dataclass(frozen=True)
class Entry:
    status: int
    headers: list[tuple[str, str]]
    chunks: list[bytes]
    stream: bool
    stored_at: float
    ttl: int
    model: str
    wire_format: str
    key: str
    # How long the provider took to produce the whole answer: what a hit saves.
    provider_seconds: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def encode(self) -> bytes:
        meta = json.dumps(
            {
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
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
        parts = [MAGIC, _U32.pack(len(meta)), meta]
        for chunk in self.chunks:
            parts.append(_U32.pack(len(chunk)))
            parts.append(chunk)
        body = b"".join(parts)
        return body + _U32.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, value: bytes) -> Entry:
        if len(value) < 12 or not value.startswith(MAGIC):
            raise CorruptEntry("not a metrion cache entry")
        body, (checksum,) = value[:-4], _U32.unpack(value[-4:])
        if zlib.crc32(body) != checksum:
            raise CorruptEntry("checksum mismatch")
        view = memoryview(body)
        (meta_length,) = _U32.unpack_from(view, 4)
        offset = 8 + meta_length
        try:
            meta = json.loads(bytes(view[8:offset]))
        except ValueError as error:
            raise CorruptEntry("unreadable metadata") from error
        if not isinstance(meta, dict) or meta.get("v") != FORMAT_VERSION:
            raise CorruptEntry("unknown entry version")
        chunks = []
        while offset + 4 <= len(body):  # fewer bytes than a length prefix: caught as truncated below
            (length,) = _U32.unpack_from(view, offset)
            offset += 4
            chunks.append(bytes(view[offset : offset + length]))
            offset += length
        if offset != len(body) or len(chunks) != meta["chunks"]:
            raise CorruptEntry("truncated entry")
        return cls(
            status=meta["status"],
            headers=[(name, value) for name, value in meta["headers"]],
            chunks=chunks,
            stream=meta["stream"],
            stored_at=meta["stored_at"],
            ttl=meta["ttl"],
            model=meta["model"],
            wire_format=meta["format"],
            key=meta["key"],
            provider_seconds=meta.get("provider_seconds", 0.0),
            extra=meta.get("extra") or {},
        )
