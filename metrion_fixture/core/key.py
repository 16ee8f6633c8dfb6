"""The cache key: what makes two requests "the same request"."""

from __future__ import annotations

import hashlib
import json
from typing import Any

_SEPARATORS = (",", ":")


def canonical_json(value: Any) -> bytes:
    """Sorted keys, ``(",", ":")`` separators, UTF-8, ``ensure_ascii=False``; total over every JSON value.

    Two cases the plain ``json.dumps`` cannot encode still get one exact text each, so the key
    never raises: text with a lone surrogate (a string cut inside an emoji, ``"\\ud83d"``), which
    UTF-8 cannot carry, is written in its escaped form (``ensure_ascii=True``: a JSON text decodes
    to exactly one value, so no other prompt shares it); and nesting deeper than Python's
    recursion limit is written by :func:`_iterative_json`, which gives the same text.
    """
    try:
        text = json.dumps(value, sort_keys=True, separators=_SEPARATORS, ensure_ascii=False)
    except RecursionError:
        text = _iterative_json(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Re-escaping the text's non-ASCII characters changes no value: the same text json.dumps
        # would give with ensure_ascii=True.
        return _ascii(text).encode("ascii")


def _ascii(text: str) -> str:
    # A JSON text's non-ASCII characters occur only inside strings, where \\uXXXX means the same.
    return "".join(char if char < "\x80" else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:
        code -= 0x10000
        return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def _iterative_json(value: Any) -> str:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` without recursion."""
    parts: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Text):
            parts.append(item.text)
        elif isinstance(item, dict):
            if not item:
                parts.append("{}")
                continue
            pending: list[Any] = [_Text("{")]
            for index, name in enumerate(sorted(item)):
                prefix = "," if index else ""
                pending += [_Text(prefix + json.dumps(name, ensure_ascii=False) + ":"), item[name]]
            pending.append(_Text("}"))
            stack.extend(reversed(pending))
        elif isinstance(item, (list, tuple)):
            if not item:
                parts.append("[]")
                continue
            pending = [_Text("[")]
            for index, element in enumerate(item):
                if index:
                    pending.append(_Text(","))
                pending.append(element)
            pending.append(_Text("]"))
            stack.extend(reversed(pending))
        else:
            parts.append(json.dumps(item, ensure_ascii=False))
    return "".join(parts)


class _Text:
    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def cache_key(model: str, messages: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``{"model": model, "messages": messages}``.

    Nothing else enters the key: sampling parameters, ``max_tokens`` and ``stream``
    change how an answer is produced or delivered, not which answer is wanted.
    """
    return hashlib.sha256(canonical_json({"model": model, "messages": messages})).hexdigest()
