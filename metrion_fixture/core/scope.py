"""Who may read an entry: everyone in the namespace (``shared``) or only the API key that paid for it.

With ``scope="credential"`` the storage key ends with a keyed hash of the
request's credential (``Authorization`` bearer token, ``x-api-key``,
``x-goog-api-key``, Azure OpenAI's ``api-key``, or the ``?key=`` / ``?api-key=`` query
parameter). The credential itself is
never stored, logged or returned; the hash is HMAC-SHA256 with a fixed library
salt, truncated to 128 bits, so the store holds nothing an attacker could use
as a key, and the same credential always lands in the same scope across
processes and machines.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import parse_qsl

from ..errors import MetrionCacheError

SCOPES = ("shared", "credential")
SCOPE_ENV = "METRION_CACHE_SCOPE"
_SALT = b"metrion-fixture/credential-scope/v1"
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")  # api-key: Azure OpenAI
_CREDENTIAL_PARAMS = ("key", "api-key")


def check_scope(scope: object) -> str:
    value = scope.strip().lower() if isinstance(scope, str) else scope
    if value not in SCOPES:
        raise MetrionCacheError(
            f"invalid cache scope {scope!r}; use 'shared' (entries shared within the namespace, the default) "
            "or 'credential' (entries private to the API key that paid for them)"
        )
    return str(value)


def credential_tag(headers: Mapping[str, str], query: bytes | str = b"") -> str:
    """A 32-hex-digit keyed hash of the request's credentials; the same for requests without any."""
    found: set[str] = set()
    for name in _CREDENTIAL_HEADERS:
        value = headers.get(name)
        if isinstance(value, str) and value.strip():
            value = value.strip()
            if value[:7].lower() == "bearer ":
                value = value[7:].strip()
            found.add(value)
    if query:
        text = query if isinstance(query, str) else query.decode("utf-8", "surrogateescape")
        found.update(value for name, value in parse_qsl(text) if name in _CREDENTIAL_PARAMS and value)
    message = "\n".join(sorted(found)).encode("utf-8", "surrogateescape")
    return hmac.new(_SALT, message, hashlib.sha256).hexdigest()[:32]
