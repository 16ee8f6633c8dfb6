"""What tokens cost: the shipped price table, user overrides, and the cost of one answer.

The table is ``prices.toml`` in this package. A TOML file of the same shape named by
``METRION_CACHE_PRICES`` (or passed to :func:`use_prices`) extends it and overrides
its entries. A model found nowhere has no cost: callers show "cost unknown", never $0.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import MetrionCacheError
from ..formats.base import Usage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PRICES_ENV = "METRION_CACHE_PRICES"
# The suffixes of a dated or pinned model name that share the base model's price.
_SNAPSHOT = re.compile(r"[-@](?:\d{8}|\d{4}-\d{2}-\d{2}|\d{3,4}|latest)$")
# Who serves a model that the table does not list, by its name.
_PROVIDER_PREFIXES = (
    ("claude", "anthropic"),
    ("gpt", "openai"),
    ("chatgpt", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("gemini", "google"),
    ("gemma", "google"),
    ("mistral", "mistral"),
    ("open-mistral", "mistral"),
    ("ministral", "mistral"),
    ("magistral", "mistral"),
    ("codestral", "mistral"),
    ("devstral", "mistral"),
    ("pixtral", "mistral"),
    ("grok", "xai"),
)


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    model: str
    provider: str
    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    checked: str = ""

    def cost(self, usage: Usage) -> float:
        cache_read = self.input if self.cache_read is None else self.cache_read
        cache_write = self.input if self.cache_write is None else self.cache_write
        uncached = max(0, usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens)
        dollars = (
            uncached * self.input
            + usage.cache_read_tokens * cache_read
            + usage.cache_write_tokens * cache_write
            + usage.output_tokens * self.output
        )
        return dollars / 1_000_000


_lock = threading.Lock()
_override: str | None = None


def use_prices(path: str | os.PathLike[str] | None) -> None:
    """Extend and override the shipped table with a TOML file (None: back to ``METRION_CACHE_PRICES``)."""
    global _override
    if path is not None:
        _read(Path(path))  # fail now, with the file's name, rather than on the first request
    with _lock:
        _override = None if path is None else str(path)
    _table.cache_clear()
    _price_for.cache_clear()
    _provider_of.cache_clear()


def price_table() -> dict[str, Price]:
    """Every priced model: the shipped table, then the override file's entries over it."""
    return _table(price_source())


def price_source() -> str:
    """Which override file is in force ("" for none): part of every cached price look-up."""
    return _override or os.environ.get(PRICES_ENV) or ""


@lru_cache(maxsize=4)
def _table(override: str) -> dict[str, Price]:
    with resources.files(__package__).joinpath("prices.toml").open("rb") as shipped:
        table = _entries(tomllib.load(shipped), "the shipped price table")
    if override:
        table.update(_read(Path(override)))
    return table


def _read(path: Path) -> dict[str, Price]:
    try:
        with path.open("rb") as file:
            return _entries(tomllib.load(file), str(path))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise MetrionCacheError(f"cannot read the price file {str(path)!r}: {error}") from error


def _entries(document: dict[str, Any], source: str) -> dict[str, Price]:
    models = document.get("models", {})
    if not isinstance(models, dict):
        raise MetrionCacheError(f"{source}: [models] must be a table of models")
    table = {}
    for model, entry in models.items():
        try:
            table[model] = Price(
                model=model,
                provider=str(entry.get("provider") or provider_from_name(model) or ""),
                input=float(entry["input"]),
                output=float(entry["output"]),
                cache_read=None if entry.get("cache_read") is None else float(entry["cache_read"]),
                cache_write=None if entry.get("cache_write") is None else float(entry["cache_write"]),
                checked=str(entry.get("checked", "")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise MetrionCacheError(
                f"{source}: the price of {model!r} needs numbers 'input' and 'output' (dollars per million "
                f"tokens), optionally 'cache_read', 'cache_write', 'provider' and 'checked' ({error!r})"
            ) from error
    return table


def provider_from_name(model: str) -> str | None:
    name = model.lower().rpartition("/")[2]
    return next((provider for prefix, provider in _PROVIDER_PREFIXES if name.startswith(prefix)), None)


def price_for(model: str) -> Price | None:
    """The price of ``model``: its own entry, else that of its base name when it is a dated snapshot."""
    return _price_for(model, price_source())


@lru_cache(maxsize=1024)
def _price_for(model: str, source: str) -> Price | None:
    table = _table(source)
    name = model.rpartition("/")[2]  # "models/gemini-2.0-flash", "publishers/google/models/..."
    while True:
        if name in table:
            return table[name]
        shorter = _SNAPSHOT.sub("", name)
        if shorter == name:
            return None
        name = shorter


def cost_usd(model: str, usage: Usage | None) -> float | None:
    """Dollars an answer cost, or None when its usage or the model's price is unknown."""
    if usage is None:
        return None
    price = price_for(model)
    return None if price is None else round(price.cost(usage), 10)


def provider_of(model: str, default: str = "") -> str:
    """Who serves ``model``: its price entry, else its name, else the wire format's provider."""
    return _provider_of(model, default, price_source())


@lru_cache(maxsize=1024)
def _provider_of(model: str, default: str, source: str) -> str:
    price = _price_for(model, source)
    return (price.provider if price else None) or provider_from_name(model) or default
