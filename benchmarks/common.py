"""What every benchmark shares: the prepared answer, SDK clients, timing and the result rows.

Absolute times on a shared 2-core machine are noise, so every measure is a ratio
against a baseline taken in the same run, and the paths being compared are timed
in interleaved rounds (a burst of noise then hurts both sides alike).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import anthropic
import httpx2

MODEL = "claude-bench"
ANSWER = {
    "id": "msg_bench",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [{"type": "text", "text": "Standard delivery takes 3-5 business days. " * 8}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 42, "output_tokens": 96},
}
ANSWER_BYTES = json.dumps(ANSWER, separators=(",", ":")).encode()
# What the provider sends along with an answer (the cache replays all but the framing).
ANSWER_HEADERS = [
    ("content-type", "application/json"),
    ("request-id", "req_0123456789abcdef01234567"),
    ("anthropic-ratelimit-requests-remaining", "999"),
]
MESSAGES = [{"role": "user", "content": "What are your delivery times?"}]


@dataclass
class Row:
    """One line of the table: a value against the baseline it is compared with."""

    measure: str
    case: str
    value: float
    baseline: float | None = None
    unit: str = "ms"
    target: str = ""  # e.g. "<= 1.30x", "< 1 ms"
    limit: float | None = None  # what the ratio (or, if ``absolute``, the value) must not exceed
    absolute: bool = False
    at_least: bool = False  # the limit is a floor (hits per second): the number must not fall below it
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def ok(self) -> bool | None:
        if self.limit is None:
            return None
        number = self.value if self.absolute or self.ratio is None else self.ratio
        return number >= self.limit if self.at_least else number <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "ok": self.ok}


def floor_transport() -> httpx2.MockTransport:
    """An in-process provider that answers with prepared bytes: the floor no cache can beat."""
    return httpx2.MockTransport(lambda request: httpx2.Response(200, headers=ANSWER_HEADERS, content=ANSWER_BYTES))


def sdk(transport: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="bench", http_client=httpx2.Client(transport=transport), max_retries=0)


def async_sdk(transport: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="bench", http_client=httpx2.AsyncClient(transport=transport), max_retries=0)


def ask(client: anthropic.Anthropic, messages: list[Any] = MESSAGES) -> Any:
    return client.messages.create(model=MODEL, max_tokens=100, messages=messages)


def timed(call: Callable[[], Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def interleaved(paths: dict[str, Callable[[], Any]], total: int, rounds: int = 10, warmup: int = 100) -> dict:
    """``total`` timings of each path, taken in ``rounds`` alternating bursts after a warm-up."""
    for call in paths.values():
        timed(call, warmup)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    per_round = max(1, total // rounds)
    names = list(paths)
    for index in range(rounds):
        # Rotate the order so no path always runs right after another.
        for name in names[index % len(names) :] + names[: index % len(names)]:
            samples[name].extend(timed(paths[name], per_round))
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def ms(seconds: float) -> float:
    return seconds * 1000


@dataclass
class Context:
    """The run's options, shared by every measure."""

    redis: str  # where hit benchmarks keep their (namespaced, cleaned up) entries
    scale_redis: str  # base URL (no DB) for the scale fill; DBs ``scale_dbs`` must be empty
    scale_dbs: tuple[int, ...]
    folder: str  # a temporary directory for SQLite files and cassettes
    requests: int = 2000  # timed requests per path for latency measures
    quick: bool = False  # skip the 1,000,000-entry fill
    smoke: bool = False  # tiny counts everywhere: checks that everything runs, measures nothing

    def count(self, normal: int, smoke: int = 20) -> int:
        return smoke if self.smoke else normal
