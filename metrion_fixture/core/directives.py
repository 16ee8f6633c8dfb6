"""What a request asks of the cache: its mode and how long to keep the answer.

The request header ``x-metrion-cache`` and ``Cache-Control: max-age`` follow the
proxy this library mirrors. Configuration values (session mode, TTL) are checked
here too, so the header and the options share one set of rules.
"""

from __future__ import annotations

import re

from ..errors import MetrionCacheError

MODE_HEADER = "x-metrion-cache"
KEY_HEADER = "x-metrion-cache-key"
TTL_HEADER = "cache-control"

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
MAX_TTL_SECONDS = 365 * 24 * 3600
# The other defaults a session decides by (checked in core/options.py).
DEFAULT_NAMESPACE = "metrion"
DEFAULT_MAX_ENTRY_BYTES = 16 * 1024 * 1024
DEFAULT_SINGLE_FLIGHT_WAIT = 30.0

HEADER_MODES = ("true", "refresh", "false")
SESSION_MODES = ("true", "refresh", "off", "replay")

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_AGE = re.compile(r"^max-age\s*=\s*(.*)$", re.IGNORECASE | re.DOTALL)  # DOTALL: "0\n0" is no number


class DirectiveError(Exception):
    """A request header the cache cannot honour; answered as an HTTP 400."""


def parse_header_mode(value: str | None) -> str | None:
    if value is None:
        return None
    mode = value.strip().lower()
    if mode not in HEADER_MODES:
        raise DirectiveError(
            f"metrion cache: invalid {MODE_HEADER} header {value!r}; "
            f"use one of {', '.join(HEADER_MODES)} (or leave it out for the session default)"
        )
    return mode


def parse_max_age(cache_control: str | None) -> int | None:
    """Seconds from ``max-age=N`` (capped at 365 days), or None when absent.

    Other Cache-Control directives are ignored: only max-age means something to
    this cache. ``max-age=0`` is returned as 0, meaning "do not store".
    """
    if not cache_control:
        return None
    for directive in cache_control.split(","):
        match = _MAX_AGE.match(directive.strip())
        if match is None:
            continue
        raw = match.group(1).strip().strip('"')
        if not raw.isdigit() or not raw.isascii():
            raise DirectiveError(
                f"metrion cache: invalid Cache-Control max-age {match.group(1)!r}; "
                "use a whole number of seconds, e.g. 'Cache-Control: max-age=3600'"
            )
        return min(int(raw), MAX_TTL_SECONDS) if len(raw) <= 18 else MAX_TTL_SECONDS  # int() refuses 4300+ digits
    return None


def check_session_mode(mode: object) -> str:
    if not isinstance(mode, str) or mode.strip().lower() not in SESSION_MODES:
        raise MetrionCacheError(f"unknown cache mode {mode!r}; use one of {', '.join(SESSION_MODES)}")
    return mode.strip().lower()


def check_ttl(ttl: object) -> int:
    """A TTL option in seconds: an int, or a string like '3600', '90m', '12h', '7d'.

    Above 365 days it is capped, as the header's max-age is.
    """
    if isinstance(ttl, bool):
        seconds = None
    elif isinstance(ttl, int):
        seconds = ttl
    elif isinstance(ttl, float) and ttl.is_integer():
        seconds = int(ttl)
    elif isinstance(ttl, str) and (match := _DURATION.match(ttl)):
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        seconds = None
    if seconds is None or seconds <= 0:
        raise MetrionCacheError(
            f"invalid ttl {ttl!r}; use a positive number of seconds or a duration like '90m', '12h', '7d'"
        )
    return min(seconds, MAX_TTL_SECONDS)


# Namespaces the cache keeps for its own records (``_ledger``: every namespace's call records;
# ``_near``: the marker naming a Redis database, stores/redis_tracking.py): a name starting with '_'
# is refused, so clearing a namespace never touches them.
RESERVED_NAMESPACE_PREFIX = "_"
RESERVED_NAMESPACES = ("_ledger", "_near", "_warmup")


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", namespace):
        raise MetrionCacheError(f"invalid namespace {namespace!r}; use 1-64 letters, digits, '.', '_' or '-'")
    if namespace.startswith(RESERVED_NAMESPACE_PREFIX):
        raise MetrionCacheError(
            f"invalid namespace {namespace!r}: names starting with '_' are reserved for the cache's own records "
            f"({', '.join(RESERVED_NAMESPACES)}); use a name starting with a letter or digit"
        )
    return namespace
