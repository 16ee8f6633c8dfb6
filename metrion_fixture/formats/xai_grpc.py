"""xAI's gRPC chat API (the official ``xai-sdk``): ``xai_api.Chat/GetCompletion`` and ``GetCompletionChunk``.

It is not HTTP, so it is not listed in :data:`~metrion_fixture.formats.WIRE_FORMATS` (no URL
matches it): :mod:`metrion_fixture.integrations.grpc` intercepts the SDK's channel and plans the
call with :func:`~metrion_fixture.core.engine.plan_prompt`. Entries hold the serialized protobuf
responses (one for ``GetCompletion``, one per chunk for ``GetCompletionChunk``). Importing this
module imports neither grpc nor protobuf.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import ChunkWatcher, Prompt, Usage, WireFormat, last_user_text

SERVICE = "/xai_api.Chat/"
# The chat methods the cache serves, and whether they stream.
METHODS = {SERVICE + "GetCompletion": False, SERVICE + "GetCompletionChunk": True}


class XaiGrpc(WireFormat):
    name = "xai_grpc"
    provider = "xai"
    has_stream_terminator = False  # a gRPC stream is complete when it ends with status OK

    def matches(self, method: str, path: str) -> bool:
        return False  # never an HTTP request

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return {"code": status, "error": message}

    def preview(self, prompt: Prompt) -> str:
        return last_user_text(prompt.messages, ("ROLE_USER",))  # the messages in protobuf's JSON form

    def stream_watcher(self, shape: dict[str, Any] | None = None) -> ChunkWatcher:
        # Chunks are serialized protobuf messages: no event in them says the stream ended or failed.
        return ChunkWatcher()

    def storable_body(self, body: bytes) -> bool:
        # One serialized protobuf message, which is never JSON; an empty one is all defaults, no answer.
        return bool(body)

    def is_stream_answer(self, requested_stream: bool, headers: list[tuple[str, str]]) -> bool:
        return requested_stream  # GetCompletionChunk answers with a stream of messages, GetCompletion with one

    converts_modes = False

    def usage(self, chunks: list[bytes], stream: bool) -> Usage | None:
        found = None
        for chunk in chunks:  # a stream reports its totals in its last chunks
            message = response_class(stream).FromString(chunk)
            if message.HasField("usage"):
                found = message.usage
        if found is None:
            return None
        return Usage(
            input_tokens=found.prompt_tokens,
            output_tokens=found.completion_tokens + found.reasoning_tokens,
            cache_read_tokens=found.cached_prompt_text_tokens,
            reasoning_tokens=found.reasoning_tokens,
        )

    def readable(self, chunks: Sequence[bytes], stream: bool) -> str | None:
        # Serialized protobuf messages, shown in the JSON form protobuf defines for them.
        from google.protobuf.json_format import MessageToJson

        try:
            messages = [response_class(stream).FromString(bytes(chunk)) for chunk in chunks]
        except Exception:  # noqa: BLE001 - not our protobuf (a damaged or foreign value): show nothing special
            return None
        if stream:  # JSON Lines: one chunk per line, as it was sent
            return "\n".join(MessageToJson(message, indent=None, ensure_ascii=False) for message in messages)
        return MessageToJson(messages[0], indent=2, ensure_ascii=False) if messages else ""

    def answer_text(self, chunks: Sequence[bytes], stream: bool) -> str | None:
        try:
            messages = [response_class(stream).FromString(bytes(chunk)) for chunk in chunks]
        except Exception:  # noqa: BLE001 - not our protobuf (a damaged or foreign value): no text
            return None
        if stream:  # the first output's deltas, in order
            return "".join(
                output.delta.content for message in messages for output in message.outputs if output.index == 0
            )
        outputs = messages[0].outputs if messages else []
        return outputs[0].message.content if outputs else None


WIRE_FORMAT = XaiGrpc()


def response_class(stream: bool) -> Any:
    """The protobuf class of a chat answer: a chunk of ``GetCompletionChunk`` or ``GetCompletion``'s response."""
    from xai_sdk.proto import chat_pb2  # protobuf, imported only when used

    return chat_pb2.GetChatCompletionChunk if stream else chat_pb2.GetChatCompletionResponse
