"""The status WSGI application: the HTML page, the JSON snapshot and Prometheus metrics.

It holds no state of its own: every request asks the ``snapshot`` callable, so whoever hosts it
(mitmproxy's ``WSGIApp``, ``wsgiref``, any WSGI server) decides where the data comes from.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CONTENT_TYPE_LATEST

from . import metrics, page

log = logging.getLogger("kmi_rotor")

Snapshot = Callable[[], dict[str, Any]]
Headers = list[tuple[str, str]]
Response = tuple[int, Headers, bytes]

REASONS = {
    200: "OK",
    308: "Permanent Redirect",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}
ALLOWED = ("GET", "HEAD")
JSON_TYPE = "application/json"
# Applied to every answer: status data is live and the page must never be framed or sniffed.
COMMON_HEADERS: Headers = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]


def normalize_prefix(prefix: str) -> str:
    """``""`` or ``"/a/b"``: one leading slash, no trailing slash."""
    stripped = prefix.strip("/")
    return f"/{stripped}" if stripped else ""


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None.

    ``json.dumps`` would write ``NaN``, which browsers' ``JSON.parse`` rejects: one odd number
    in the snapshot must not take the whole page down.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def json_body(value: Any) -> bytes:
    """Compact JSON; unknown types (datetimes, paths) are written as strings."""
    return json.dumps(jsonable(value), separators=(",", ":"), default=str).encode()


def error(status: int, code: str, message: str, extra: Headers | None = None) -> Response:
    """A JSON error in the shape the proxy uses for its own local answers."""
    body = {"error": {"type": "kmi_rotor_error", "code": code, "message": message}}
    return status, [("Content-Type", JSON_TYPE), *(extra or [])], json_body(body)


class StatusApp:
    """Routes ``GET``/``HEAD`` requests under ``prefix`` to the page, the API and the metrics."""

    def __init__(self, snapshot: Snapshot, prefix: str = "") -> None:
        self.snapshot = snapshot
        self.prefix = normalize_prefix(prefix)
        self.registry = metrics.make_registry(snapshot)
        self.routes: dict[str, Callable[[], Response]] = {
            "/": self.page,
            "/api/status": self.status,
            "/metrics": self.metrics,
        }

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        status, headers, body = self.dispatch(environ, method)
        headers = [*headers, *COMMON_HEADERS, ("Content-Length", str(len(body)))]
        start_response(f"{status} {REASONS.get(status, '')}".rstrip(), headers)
        return [b"" if method == "HEAD" else body]

    def dispatch(self, environ: WSGIEnvironment, method: str) -> Response:
        """Pick the answer for a request; never raises."""
        path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
        if self.prefix and path == self.prefix:
            # the page fetches "api/status" relative to its own URL, so it must end in "/"
            query = environ.get("QUERY_STRING")
            location = f"{self.prefix}/" + (f"?{query}" if query else "")
            return 308, [("Location", location)], b""
        route = path[len(self.prefix) :] if path.startswith(self.prefix + "/") else None
        handler = self.routes.get(route) if route is not None else None
        if handler is None:
            return error(404, "not_found", "no such page")
        if method not in ALLOWED:
            return error(405, "method_not_allowed", "only GET and HEAD", [("Allow", "GET, HEAD")])
        try:
            return handler()
        except Exception:
            # the traceback goes to the log only: it may hold internals not meant for a page
            log.exception("kmi-rotor: status page: %s failed", route)
            return error(500, "status_failed", "the status snapshot could not be produced")

    def page(self) -> Response:
        return 200, [("Content-Type", "text/html; charset=utf-8"), *page.HEADERS], page.BODY

    def status(self) -> Response:
        snap = self.snapshot()
        if not isinstance(snap, dict):
            raise TypeError(f"snapshot() returned {type(snap).__name__}, not dict")
        return 200, [("Content-Type", JSON_TYPE)], json_body(snap)

    def metrics(self) -> Response:
        return 200, [("Content-Type", CONTENT_TYPE_LATEST)], metrics.render(self.registry)


def make_app(snapshot: Snapshot, *, prefix: str = "") -> WSGIApplication:
    """Build the status application.

    ``snapshot`` is called once per ``/api/status`` or ``/metrics`` request (never for the page
    itself) and must return the status document; anything it raises becomes a 500 JSON error.
    Hosted by mitmproxy's ``WSGIApp``, it runs in a worker thread, not on the event loop: it
    must be safe to call from there (e.g. return a copy, not live structures being mutated).
    ``prefix`` ("" or e.g. "/_kmi-rotor") is the path the app is mounted under; the bare prefix
    redirects to ``prefix + "/"``. Routes: ``/`` (HTML), ``/api/status`` (JSON), ``/metrics``
    (Prometheus text); other paths answer 404, other methods 405, both as JSON.
    """
    return StatusApp(snapshot, prefix)
