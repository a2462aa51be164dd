"""The status page and /metrics, served by mitmproxy itself.

Two addresses: `http://kmi-rotor.local/` through the proxy in regular mode, and the path
`/_kmi-rotor/` on any host the proxy serves (the way to reach it in reverse mode).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
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
_PREFIX = WEB_PREFIX.encode()
_PREFIX_LEN = len(_PREFIX)
_AFTER = (b"", b"/", b"?")
"""What may follow the prefix in a status path: nothing, a subpath or a query string."""
AUTHORITY_VERSIONS = (b"HTTP/2.0", b"HTTP/3")
"""The versions whose :authority is the request's host header (`Request.is_http2`, `is_http3`)."""


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
        req = flow.request
        data = req.data
        if is_status_path(data.path):
            return True
        named = host_header(req) or data.host  # parsed below only if it can be the status host
        return WEB_HOST in named.lower() and req.pretty_host == WEB_HOST


def is_status_path(path: bytes) -> bool:
    """Whether a request's raw path is under the status prefix: the prefix, then nothing, a
    subpath or a query string. Read on the bytes: what `Request.path` decodes them to starts
    with the (ASCII) prefix, and has one of those after it, exactly when the bytes do."""
    return path.startswith(_PREFIX) and path[_PREFIX_LEN : _PREFIX_LEN + 1] in _AFTER


def host_header(req: http.Request) -> str | None:
    """What `req.host_header` gives (the :authority, else the Host field), the Host field read
    from the raw fields in one pass: mitmproxy's `headers.get` converts every field's name."""
    data = req.data
    if data.authority and data.http_version in AUTHORITY_VERSIONS:
        return authority_text(data.authority)
    return field_value(data.headers.fields, b"host")


@functools.lru_cache(maxsize=1024)
def authority_text(raw: bytes) -> str:
    """`Request.authority` of a request whose raw authority is `raw`, remembered: the same
    few come with every request, and the IDNA codec is slow."""
    try:
        return raw.decode("idna")
    except UnicodeError:
        return raw.decode("utf8", "surrogateescape")


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
