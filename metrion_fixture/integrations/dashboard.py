"""The dashboard as a plain ASGI app: the page at ``/_metrion/`` and the JSON behind it.

``metrion-cache serve`` hands it every ``/_metrion/...`` request; ``metrion-cache dashboard``
serves it alone (with uvicorn, as ``serve``). The figures come from :mod:`..reporting.dashboard`; the store is read in a
thread, so a slow store never holds up the proxy's event loop.

- ``GET /_metrion/``: the page (one HTML file, no external asset: it works offline).
- ``GET /_metrion/api/savings?period=7d[&namespace=NS]``: the Savings card and its chart.
- ``GET /_metrion/api/logs[?namespace=&model=&source=&status=&limit=200]``: the latest calls.
- ``GET /_metrion/api/call?namespace=&wire_format=&stream=0|1&key=``: one call's stored answer.

With a token, every request must bring it: in the ``x-metrion-proxy-token`` header (the page's
own requests do), or as ``?token=`` (a browser's first visit to the page cannot send a header).
Without one (it then listens on this machine only), it answers only a ``Host`` of localhost, 127.0.0.1
or [::1], and no other site's ``Origin``: a web page whose name an attacker re-points at 127.0.0.1
(DNS rebinding) would otherwise read every prompt and answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from ..core.options import mask_password
from ..errors import MetrionCacheError
from ..reporting import dashboard
from ..stores.base import Store

__all__ = ["API_PREFIX", "DEFAULT_DASHBOARD_PORT", "PREFIX", "DashboardApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIX = "/_metrion/"
API_PREFIX = PREFIX + "api/"
DEFAULT_DASHBOARD_PORT = 8788
_TOKEN_HEADER = b"x-metrion-proxy-token"  # the proxy's (server.TOKEN_HEADER): one token for both
_LOCAL_HOSTNAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# The page's own data comes from this origin only; no script, style or image from anywhere else.
_PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        b"img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class DashboardApp:
    """The dashboard of the ledger in ``store`` (a Store, or a function that gives the current one).

    ``unwritten`` gives the records of this process not yet written to the ledger (serve's own calls:
    its batches are written every few minutes, not on each call).
    """

    def __init__(
        self,
        store: Store | Callable[[], Store],
        *,
        token: str | bytes | None = None,
        unwritten: dashboard.Unwritten | None = None,
    ) -> None:
        self._store = store
        self.token = token.encode() if isinstance(token, str) else token or None
        # A process that makes calls itself (serve) shows them before its ledger batch is written.
        self.unwritten = unwritten
        self.batches = dashboard.BatchCache()

    @property
    def store(self) -> Store:
        return self._store if isinstance(self._store, Store) else self._store()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        query = {name: values[-1] for name, values in parse_qs(scope.get("query_string", b"").decode()).items()}
        refusal = self._foreign_site(scope) if self.token is None and path != PREFIX + "health" else None
        if refusal:
            return await _send_json(send, 403, _error(refusal, "forbidden"))
        if not self._allowed(scope, query):
            return await _send_json(
                send, 401, _error("this dashboard needs its token: open it as /_metrion/?token=TOKEN", "authentication")
            )
        if scope["method"] not in ("GET", "HEAD"):
            return await _send_json(send, 405, _error("the dashboard only reads: use GET", "method"))
        if path in ("/", "/_metrion"):
            suffix = "?" + urlencode({"token": query["token"]}) if "token" in query else ""
            return await _send(send, 307, b"", [(b"location", (PREFIX + suffix).encode())])
        if path == PREFIX:
            return await _send(send, 200, dashboard.render_page().encode(), _PAGE_HEADERS)
        if path == PREFIX + "health":
            return await _send_json(send, 200, {"status": "ok"})
        answer = {
            API_PREFIX + "savings": self._savings,
            API_PREFIX + "logs": self._logs,
            API_PREFIX + "call": self._call,
        }.get(path)
        if answer is None:
            return await _send_json(send, 404, _error(f"no page at {path}; the dashboard is at {PREFIX}", "not_found"))
        try:
            body = await asyncio.to_thread(answer, query)
        except (MetrionCacheError, ValueError) as error:
            return await _send_json(send, 400, _error(str(error), "invalid_request"))
        except Exception as error:  # noqa: BLE001 - an unreadable store is a page's message, not a crash
            message = f"could not read the store {mask_password(self.store.url)} ({type(error).__name__}: {error})"
            return await _send_json(send, 503, _error(message, "store"))
        await _send_json(send, 200, body)

    @staticmethod
    def _foreign_site(scope: Scope) -> str | None:
        """Why a request without a token comes from another site (DNS rebinding, cross-site), or None."""
        headers = {name: value.decode("latin-1") for name, value in scope["headers"] if name in (b"host", b"origin")}
        host = headers.get(b"host", "")
        if not _local_hostname("//" + host):
            return (
                f"refusing Host {host!r}: without a token this dashboard answers only localhost, 127.0.0.1 "
                "or [::1] (another name may be a web page re-pointed here); open it as http://127.0.0.1:PORT/_metrion/"
            )
        origin = headers.get(b"origin")
        if origin is not None and not _local_hostname(origin):
            return f"refusing a request from the page at {origin!r}: without a token only this machine's pages may read"
        return None

    def _allowed(self, scope: Scope, query: dict[str, str]) -> bool:
        if self.token is None:
            return True
        given = next((value for name, value in scope["headers"] if name == _TOKEN_HEADER), None)
        if given is None and "token" in query:
            given = query["token"].encode()
        return given is not None and hmac.compare_digest(given, self.token)

    # Each runs in a thread: the stores' calls block.

    def _savings(self, query: dict[str, str]) -> dict[str, Any]:
        period, namespace = query.get("period") or "7d", query.get("namespace") or None
        return dashboard.savings(self.store, period, namespace, unwritten=self.unwritten, batches=self.batches)

    def _logs(self, query: dict[str, str]) -> dict[str, Any]:
        limit = int(query.get("limit") or dashboard.DEFAULT_LOG_LIMIT)
        store = self.store
        filters = dashboard.parse_filters(query)
        listed = dashboard.logs(store, filters, limit, unwritten=self.unwritten, batches=self.batches)
        return {**listed, "store": mask_password(store.url)}

    def _call(self, query: dict[str, str]) -> dict[str, Any]:
        missing = [name for name in ("namespace", "wire_format", "key") if not query.get(name)]
        if missing:
            raise ValueError(f"api/call needs {', '.join(missing)}")
        stream = query.get("stream", "0") in ("1", "true")
        return dashboard.call_detail(self.store, query["namespace"], query["wire_format"], stream, query["key"])


def _local_hostname(address: str) -> bool:
    """``address`` (``//host:port`` or an Origin) names this machine by a name no DNS answer can change."""
    try:
        parts = urlsplit(address)
        parts.port  # noqa: B018 - a port that is not a number is not ours either (ValueError)
    except ValueError:
        return False
    return parts.hostname in _LOCAL_HOSTNAMES and not parts.username and not parts.password


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": f"metrion dashboard: {message}"}}


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    await _send(send, status, data, [(b"content-type", b"application/json"), (b"cache-control", b"no-store")])
