"""The cache key: what makes two requests "the same request"."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def cache_key(model: str, messages: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``{"model": model, "messages": messages}``.

    Nothing else enters the key: sampling parameters, ``max_tokens`` and ``stream``
    change how an answer is produced or delivered, not which answer is wanted.
    """
    return hashlib.sha256(canonical_json({"model": model, "messages": messages})).hexdigest()
