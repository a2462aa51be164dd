"""The status page and /metrics, served by mitmproxy itself.

Two addresses: `http://kmi-rotor.local/` through the proxy in regular mode, and the path
`/_kmi-rotor/` on any host the proxy serves (the way to reach it in reverse mode).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

from mitmproxy import http
from mitmproxy.addons.asgiapp import WSGIApp

from .core.header_fields import field_value
from .web import make_app

WEB_HOST = "kmi-rotor.local"
WEB_PREFIX = "/_kmi-rotor"
SNAPSHOT_TIMEOUT = 5.0
_AFTER = ("", "/", "?")
"""What may follow the prefix in a status path: nothing, a subpath or a query string."""


class StatusPage(WSGIApp):
    """mitmproxy's WSGI host, answering on the status host and under the status path.

    Not an addon of its own: kmi-rotor's `request` hook calls its `request` last."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        root, prefixed = make_app(snapshot), make_app(snapshot, prefix=WEB_PREFIX)

        def dispatch(environ: WSGIEnvironment, start: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            app = prefixed if path == WEB_PREFIX or path.startswith(WEB_PREFIX + "/") else root
            return app(environ, start)

        super().__init__(dispatch, WEB_HOST, None)

    def should_serve(self, flow: http.HTTPFlow) -> bool:
        """The status host, or a path under the status prefix (its query string aside).
        Asked of every request, twice: the cheap tests first."""
        if flow.response or flow.error or not flow.live:
            return False
        path = flow.request.path
        if path.startswith(WEB_PREFIX) and path[len(WEB_PREFIX) : len(WEB_PREFIX) + 1] in _AFTER:
            return True
        req = flow.request
        named = _host_header(req) or req.host  # parsed below only if it can be the status host
        return WEB_HOST in named.lower() and req.pretty_host == WEB_HOST


def _host_header(req: http.Request) -> str | None:
    """What `req.host_header` gives (the :authority, else the Host field), the Host field read
    from the raw fields in one pass: mitmproxy's `headers.get` converts every field's name."""
    if (req.is_http2 or req.is_http3) and req.data.authority:
        return req.authority
    return field_value(req.data.headers.fields, b"host")


def on_loop(
    loop: asyncio.AbstractEventLoop | None, build: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run `build` on the proxy's event loop (the only thread that may read its state) and wait
    for the result; the WSGI app calls this from a worker thread."""
    if loop is None or not loop.is_running():
        return build()

    async def call() -> dict[str, Any]:
        return build()

    future: concurrent.futures.Future[dict[str, Any]] = asyncio.run_coroutine_threadsafe(
        call(), loop
    )
    return future.result(SNAPSHOT_TIMEOUT)
