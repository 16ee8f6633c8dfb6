"""``metrion-cache serve``: the cache as a local HTTP proxy, for any client in any language.

A client points its base URL at ``http://HOST:PORT/<provider>`` (``/anthropic``, ``/openai``,
``/gemini``, ``/mistral``, ``/xai``, or a name given with ``--upstream NAME=URL``) and opts in per
request with ``x-metrion-cache: true | refresh``. The app is plain ASGI (served by uvicorn). Each
request runs through the core's flow (``CacheCore.exchange``) with the same async driver as the
httpx2 adapter, so every decision is the core's, exactly as in-process. The proxy is one more
adapter: its upstream builds an ``httpx2.Request`` only when the provider is called (a hit needs
none: building one costs about as much as the rest of a hit), and the provider's answers go
through the httpx2 adapter's own translation (``LIBRARY.respond``, its tee stream). This module
only translates between ASGI and httpx2 and adds what a shared proxy needs: routes, a token, 502s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx2

from ..core.directives import MODE_HEADER
from ..core.engine import Reply
from ..core.flow import Answer, PassThrough
from ..core.options import mask_password, mask_query_keys
from ..errors import MetrionCacheError
from ..formats import wire_format_for
from ..runtime._async.driver import drive as adrive
from ..runtime.session import CacheSession
from .dashboard import PREFIX as DASHBOARD_PREFIX
from .dashboard import DashboardApp
from .httpx2 import LIBRARY

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_UPSTREAMS",
    "HEALTH_PATH",
    "TOKEN_ENV",
    "TOKEN_HEADER",
    "ProxyApp",
    "check_bind",
    "is_loopback",
    "parse_upstreams",
    "serve",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_PORT = 8787
TOKEN_ENV = "METRION_PROXY_TOKEN"
TOKEN_HEADER = "x-metrion-proxy-token"
HEALTH_PATH = "/_metrion/health"
DEFAULT_UPSTREAMS: dict[str, str] = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "mistral": "https://api.mistral.ai",
    "xai": "https://api.x.ai",
}
# Seconds. A provider may think for minutes before its first byte (a long answer, a reasoning
# model), so only connecting is quick to give up; the SDKs' own timeouts bound the rest.
UPSTREAM_TIMEOUT = {"connect": 10.0, "read": 900.0, "write": 900.0, "pool": 900.0}
# Partial ledger batches are written this often, so a quiet proxy's calls reach `metrion-cache
# stats` without filling the ledger's bounded batch count with tiny batches.
LEDGER_FLUSH_SECONDS = 300.0

_TOKEN = TOKEN_HEADER.encode()
_DASHBOARD = DASHBOARD_PREFIX.encode()
_HEALTH = HEALTH_PATH.encode()
# Hop-by-hop (RFC 9110 7.6.1), or answered here: they describe the client's connection to us.
# The client's accept-encoding is replaced by identity (below); its content-length stays, since
# the body is forwarded byte for byte.
_REQUEST_DROPPED = frozenset(
    {
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",  # uvicorn answers 100-continue itself
        b"accept-encoding",
        _TOKEN,
    }
)
# Uncompressed bytes from the provider pass through untouched, chunk by chunk, and are what the
# recorder stores; a client that wants gzip still gets a correct (uncompressed) answer.
_IDENTITY = (b"accept-encoding", b"identity")
_RESPONSE_DROPPED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",  # the response is re-framed by uvicorn (chunked when it has no length)
        "upgrade",
    }
)
_JSON = [(b"content-type", b"application/json")]
_NO_RETRY = (b"x-should-retry", b"false")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Gemini's ?key=, and the dashboard's ?token= (a browser's first visit cannot send the header).
log = logging.getLogger("metrion_fixture.proxy")


class _ClientGone(Exception):
    """The client disconnected before its request body was read."""


class ProxyApp:
    """The ASGI app: routes by provider prefix, checks the token, forwards through the cache.

    ``upstreams`` maps a route name to the provider's base URL (default :data:`DEFAULT_UPSTREAMS`);
    ``token``, when set, must come with every request in ``x-metrion-proxy-token``. ``transport``
    is the inner httpx2 transport that reaches the providers (default: an ``AsyncHTTPTransport``).
    """

    def __init__(
        self,
        session: CacheSession,
        upstreams: Mapping[str, str] | None = None,
        *,
        token: str | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
        ledger_flush_seconds: float = LEDGER_FLUSH_SECONDS,
    ) -> None:
        self.session = session
        self.upstreams = dict(DEFAULT_UPSTREAMS if upstreams is None else upstreams)
        self._bases = {name.encode(): base.rstrip("/") for name, base in self.upstreams.items()}
        self._base_paths = {name: unquote(urlsplit(base).path.rstrip("/")) for name, base in self._bases.items()}
        self.token = token.encode() if token else None
        inner = transport or httpx2.AsyncHTTPTransport(
            limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=100), retries=0
        )
        # A transport, not an AsyncClient: a client would keep the providers' cookies in one jar for
        # every user of the proxy, and follow redirects that the user's SDK should see.
        self.inner = inner
        self.ledger_flush_seconds = ledger_flush_seconds
        self.dashboard = DashboardApp(lambda: self.session.store, token=self.token, unwritten=self._unwritten)
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    # -- one request ------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        if (raw_path.startswith(_DASHBOARD) or raw_path == _DASHBOARD[:-1]) and raw_path != _HEALTH:
            # The dashboard checks the token itself: a browser's first visit brings it as ?token=.
            return await self.dashboard(scope, receive, send)
        name, _, rest = raw_path[1:].partition(b"/")
        base = self._bases.get(name)
        method: str = scope["method"]
        headers: list[tuple[bytes, bytes]] = [_IDENTITY]
        given_token = None
        named_by_connection: set[bytes] = set()
        for key, value in scope["headers"]:
            if key in _REQUEST_DROPPED:
                if key == _TOKEN:
                    given_token = value
                elif key == b"connection":
                    named_by_connection.update(part.strip().lower() for part in value.split(b","))
                continue
            headers.append((key, value))
        if named_by_connection:
            headers = [(key, value) for key, value in headers if key not in named_by_connection]

        if self.token is not None and not (given_token is not None and hmac.compare_digest(given_token, self.token)):
            if raw_path == HEALTH_PATH.encode():
                return await _send_json(send, 200, {"status": "ok"})
            message = f"metrion proxy: this proxy needs the {TOKEN_HEADER} header with its token"
            if given_token is not None:
                message = f"metrion proxy: wrong {TOKEN_HEADER}"
            return await _send_error(send, 401, message, method, "/" + rest.decode("latin-1"), "authentication_error")
        if base is None:
            if raw_path == HEALTH_PATH.encode():
                return await _send_json(send, 200, {"status": "ok"})
            routes = ", ".join(f"/{known}" for known in sorted(self.upstreams))
            message = (
                f"metrion proxy: no provider route for {raw_path.decode('latin-1')!r}; the routes are {routes} "
                "(the provider's name, then its own path: http://HOST:PORT/anthropic/v1/messages; "
                "add one with --upstream NAME=URL)"
            )
            return await _send_error(send, 404, message, "", "", "not_found_error")

        query: bytes = scope.get("query_string", b"")
        url = f"{base}/{rest.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else "")
        # The core reads the path decoded, as httpx gives it to the in-process adapter.
        path = self._base_paths[name] + scope["path"][len(name) + 1 :]
        try:
            upstream = _Upstream(self.inner, method, url, headers, await _request_body(receive, headers))
            named = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers}  # lower-case names
            flow = self.session.core.exchange(method, path, named, query)
            outcome = await adrive(self.session, flow, upstream)
        except _ClientGone:
            return
        except httpx2.InvalidURL as error:
            message = f"metrion proxy: cannot forward to {mask_query_keys(url)!r}: {error}"
            return await _send_error(send, 400, message, method, path, "invalid_request_error")
        except Exception as error:  # a bug here must still answer in the provider's shape, and be logged
            log.exception("%s %s failed", method, mask_query_keys(url))
            message = f"metrion proxy: internal error ({type(error).__name__}: {error})"
            return await _send_error(send, 500, message, method, path, "api_error", retry=True)
        if isinstance(outcome, Answer):  # a hit or the cache's own error: no httpx2 objects at all
            return await _send_reply(send, outcome.reply)
        if upstream.unreachable is not None and isinstance(outcome, PassThrough):  # a 502 always passes through
            failure = upstream.unreachable
            message = (
                f"metrion proxy: could not reach the provider at {base} ({type(failure).__name__}: {failure}); "
                "check that it is up and that this machine can reach it"
            )
            log.warning("%s %s: %s", method, mask_query_keys(url), message)
            tags = [(_encoded(name), _encoded(value)) for name, value in outcome.tags]
            return await _send_error(send, upstream.status, message, method, path, "api_error", retry=True, tags=tags)

        # The provider's answer, as the httpx2 adapter would hand it to an SDK (its tee stream included).
        response = LIBRARY.respond(outcome, upstream.response, upstream.request, self.session, LIBRARY.async_tee_stream)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(key, value) for key, value in response.headers.raw if key.lower() not in _DROPPED_BYTES],
            }
        )
        if response.is_stream_consumed:  # read whole already: a rebuilt (stored) answer
            await send({"type": "http.response.body", "body": response.content})
        else:
            await self._relay(response, receive, send)

    async def _relay(self, response: httpx2.Response, receive: Receive, send: Send) -> None:
        """Pass the provider's body on as it arrives; stop reading it as soon as the client leaves.

        Closing a recorded stream before its end stores nothing (the core decides, as for an SDK
        that closes its stream), and closes the provider's connection so it stops generating.
        """
        relay = asyncio.ensure_future(_pump(response, send))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait((relay, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, gone):
                task.cancel()
            await asyncio.gather(relay, gone, return_exceptions=True)
            await response.aclose()
        if not relay.cancelled() and relay.exception() is not None:
            # The provider broke its stream: ours ends unfinished too (uvicorn closes the connection
            # without the last chunk), so the client sees a cut stream, not a complete short one.
            log.warning("the provider's stream broke: %r", relay.exception())

    def _unwritten(self) -> list[dict[str, Any]]:
        sink = self.session.ledger.sink
        return sink.unwritten() if sink is not None else []

    # -- start and stop ---------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.ledger_flush_seconds > 0:
                    self._flusher = asyncio.ensure_future(self._flush_ledger_every(self.ledger_flush_seconds))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _flush_ledger_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            with contextlib.suppress(Exception):  # the ledger never fails the proxy
                await asyncio.to_thread(self.session.flush_ledger)

    async def aclose(self) -> None:
        """Close the provider connections and write the calls not yet in the store's ledger."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.inner.aclose()
        with contextlib.suppress(Exception):
            # In a thread: a store that does not answer may take seconds, and flush() on an event
            # loop only hands the write to the ledger's thread, which exit may not wait for.
            await asyncio.to_thread(self.session.flush_ledger)


_EXTENSIONS = {"timeout": UPSTREAM_TIMEOUT}
_DROPPED_BYTES = frozenset(name.encode() for name in _RESPONSE_DROPPED)


class _Upstream:
    """The provider side of one request, for the async driver; the httpx2 request is built only if it is sent."""

    __slots__ = ("transport", "method", "url", "headers", "content", "request", "response", "status", "unreachable")

    def __init__(
        self,
        transport: httpx2.AsyncBaseTransport,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        content: bytes | AsyncIterator[bytes],
    ) -> None:
        self.transport, self.method, self.url, self.headers, self.content = transport, method, url, headers, content
        self.request: httpx2.Request | None = None
        self.response: httpx2.Response | None = None
        self.status = 0
        # The provider could not be reached: the flow sees the gateway status this proxy answers
        # (502, or 504 on a timeout), so the call is recorded like any other failed answer.
        self.unreachable: httpx2.TransportError | None = None

    async def read_request(self) -> bytes:
        if not isinstance(self.content, bytes):
            self.content = b"".join([part async for part in self.content])
        return self.content

    async def forward(self, strip: tuple[str, ...]) -> tuple[int, list[tuple[str, str]]]:
        dropped = {name.encode() for name in strip}
        headers = [(key, value) for key, value in self.headers if key not in dropped]
        self.request = request = httpx2.Request(
            self.method, self.url, headers=headers, content=self.content, extensions=_EXTENSIONS
        )
        try:
            self.response = response = await self.transport.handle_async_request(request)
        except httpx2.TransportError as error:
            self.unreachable = error
            self.status = 504 if isinstance(error, httpx2.TimeoutException) else 502
            return self.status, []
        return response.status_code, response.headers.multi_items()

    async def read_body(self) -> bytes:
        assert self.response is not None
        return bytes(await self.response.aread())


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [(_encoded(name), _encoded(value)) for name, value in reply.headers]
    if not reply.stream:
        body = reply.chunks[0] if len(reply.chunks) == 1 else b"".join(reply.chunks)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    for chunk in reply.chunks:  # a stored stream, replayed with its chunk boundaries
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _encoded(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


async def _request_body(receive: Receive, headers: Iterable[tuple[bytes, bytes]]) -> bytes | AsyncIterator[bytes]:
    """The request body: bytes when it came in one piece (an LLM request), else a stream (an upload)."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientGone
    first: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if not first and not any(key == b"content-length" for key, _ in headers):
            return b""
        return first

    async def rest() -> AsyncIterator[bytes]:
        yield first
        while True:
            more = await receive()
            if more["type"] == "http.disconnect":
                raise _ClientGone
            yield more.get("body", b"")
            if not more.get("more_body", False):
                return

    return rest()


async def _pump(response: httpx2.Response, send: Send) -> None:
    async for chunk in response.aiter_raw():
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, body: Any, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    headers = [*_JSON, *extra, (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def _send_error(
    send: Send,
    status: int,
    message: str,
    method: str,
    path: str,
    kind: str,
    *,
    retry: bool = False,
    tags: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """The proxy's own error: in the provider's shape when the path is one of its LLM endpoints.

    ``tags``: the cache's headers of a call the core has recorded (its status and key), in place
    of ``x-metrion-cache: ERROR``.
    """
    wire_format = wire_format_for(method, path) if method else None
    body = (
        wire_format.error_body(status, message)
        if wire_format is not None
        else {"type": "error", "error": {"type": kind, "message": message}}
    )
    extra = tags if tags is not None else [(MODE_HEADER.encode(), b"ERROR")] if status >= 500 else []
    await _send_json(send, status, body, extra if retry else [*extra, _NO_RETRY])


class _MaskKeys(logging.Filter):
    """uvicorn's access log prints the query: keep API keys (``?key=``) out of it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(mask_query_keys(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


# -- the command -----------------------------------------------------------------------------------


def parse_upstreams(given: Iterable[str]) -> dict[str, str]:
    """The default routes with ``NAME=URL`` overrides and additions; ValueError says what is wrong."""
    upstreams = dict(DEFAULT_UPSTREAMS)
    for item in given:
        name, sep, url = item.partition("=")
        name, url = name.strip().lower(), url.strip()
        if not sep or not _NAME.fullmatch(name):
            raise ValueError(f"invalid --upstream {item!r}; use NAME=URL, e.g. anthropic=http://127.0.0.1:9000")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"invalid --upstream {item!r}: the URL must start with http:// or https://")
        upstreams[name] = url.rstrip("/")
    return upstreams


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuse an address beyond this machine without a token (the proxy's and the dashboard's rule)."""
    if not token and not is_loopback(host):
        raise MetrionCacheError(
            f"refusing to listen on {host} without a token: anyone who can reach it could read every cached "
            f"answer and send requests through it; pass --token TOKEN (or set {TOKEN_ENV}) and have clients "
            f"send it in the {TOKEN_HEADER} header, or listen on 127.0.0.1"
        )


def serve(
    session: CacheSession,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    upstreams: Mapping[str, str] | None = None,
    token: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the proxy until SIGINT / SIGTERM; in-flight requests and streams finish first."""
    import uvicorn  # only the proxy needs it (the 'proxy' extra)

    check_bind(host, token)
    app = ProxyApp(session, upstreams, token=token)
    logging.getLogger("uvicorn.access").addFilter(_MaskKeys())
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        # The provider's own Server and Date headers are passed on (and replayed on hits).
        server_header=False,
        date_header=False,
        ws="none",
    )
    routes = ", ".join(f"/{name} -> {url}" for name, url in app.upstreams.items())
    shown = f"[{host}]" if ":" in host else host
    print(
        f"metrion cache proxy on http://{shown}:{port} (store {mask_password(session.url)}, namespace "
        f"{session.settings.namespace}, mode {session.mode}{', token required' if token else ''})\n"
        f"routes: {routes}\ndashboard: http://{shown}:{port}/_metrion/{'?token=TOKEN' if token else ''}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(config).run()
