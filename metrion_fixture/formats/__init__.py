"""The wire formats the cache understands, one module each.

Adding a format means writing one module with a ``WIRE_FORMAT`` instance and
listing it here; the engine asks each in turn whether a request is its own.
"""

from __future__ import annotations

from .anthropic import WIRE_FORMAT as ANTHROPIC_MESSAGES
from .base import ChunkWatcher, Prompt, StreamWatcher, Usage, WireFormat
from .gemini import WIRE_FORMAT as GEMINI
from .openai_chat import WIRE_FORMAT as OPENAI_CHAT
from .openai_responses import WIRE_FORMAT as OPENAI_RESPONSES
from .sse import Event, SSEDecoder
from .xai_grpc import WIRE_FORMAT as XAI_GRPC

WIRE_FORMATS: tuple[WireFormat, ...] = (ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES, GEMINI)
FORMATS_BY_NAME: dict[str, WireFormat] = {wire_format.name: wire_format for wire_format in WIRE_FORMATS}
# Every format an entry can be stored in, gRPC included: for the tools that read entries back.
STORED_FORMATS_BY_NAME: dict[str, WireFormat] = {**FORMATS_BY_NAME, XAI_GRPC.name: XAI_GRPC}


def wire_format_for(method: str, path: str) -> WireFormat | None:
    for wire_format in WIRE_FORMATS:
        if wire_format.matches(method, path):
            return wire_format
    return None


__all__ = [
    "ChunkWatcher",
    "Event",
    "FORMATS_BY_NAME",
    "STORED_FORMATS_BY_NAME",
    "WIRE_FORMATS",
    "Prompt",
    "SSEDecoder",
    "StreamWatcher",
    "Usage",
    "WireFormat",
    "wire_format_for",
]
