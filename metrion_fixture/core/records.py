"""What the cache tells the world about one request: its status, its call record, the tokens it used."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

# What a response is tagged with (``x-metrion-cache``) and what its record says.
Status = Literal["HIT", "MISS", "REFRESH", "BYPASS", "ERROR"]
HIT: Final = "HIT"
MISS: Final = "MISS"
REFRESH: Final = "REFRESH"
BYPASS: Final = "BYPASS"
ERROR: Final = "ERROR"
STATUSES: Final[tuple[Status, ...]] = (HIT, MISS, REFRESH, BYPASS, ERROR)


@dataclass(frozen=True)
class CallRecord:
    """One request that reached the cache."""

    key: str
    wire_format: str
    model: str
    status: Status
    stream: bool
    latency: float  # seconds until the response (its headers, for streams) reached the caller
    http_status: int
    saved_seconds: float = 0.0  # on a hit: how long the provider took for the stored answer
    at: float = 0.0  # wall-clock time of the request
    # Usage and cost. None: unknown (not reported, a bypassed call, or a model without a price).
    # A hit spends 0 tokens and $0.00; the saved_* fields are what the stored answer cost.
    provider: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    saved_input_tokens: int = 0
    saved_output_tokens: int = 0
    saved_usd: float | None = None
    # Where the call came from: a pytest node id, "notebook.ipynb cell 3", a script's name, or what
    # the caller named it (``enable(source=...)``). Empty for records written before sources existed.
    source: str = ""
    # The start of the last user message, kept only with ``store_previews`` on (prompts may be private).
    preview: str = ""
    # Why the cache answered with an error of its own (status ERROR): "invalid" (a bad header or
    # option), "replay_miss" (not stored, and replay never calls the provider), "store_down" (replay
    # could not read the store). Surfaces tell a replay miss by this, never by the HTTP status.
    refusal: str = ""


@dataclass(frozen=True)
class Usage:
    """Tokens one answer used, the same way for every provider.

    ``input_tokens`` counts every prompt token, cached or not; ``cache_read_tokens`` and
    ``cache_write_tokens`` are the parts of it read from / written to the provider's
    prompt cache. ``output_tokens`` counts every generated token, reasoning included;
    ``reasoning_tokens`` is that part (Gemini thoughts, OpenAI reasoning).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: value for name, value in self.__dict__.items() if value}

    @classmethod
    def from_dict(cls, data: Any) -> Usage | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(**{name: int(data.get(name) or 0) for name in cls.__dataclass_fields__})
        except (TypeError, ValueError):
            return None
