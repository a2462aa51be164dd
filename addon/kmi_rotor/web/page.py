"""The status page: one self-contained HTML document (inline CSS and JS, nothing external).

The page carries no data. Its script polls ``api/status`` (relative, so any mount prefix works)
and builds the DOM with ``textContent`` and ``setAttribute`` only: labels and reasons come from
user configuration and upstream answers, and are never parsed as HTML.

Its parts are package data files (``static/status.html``, ``.css``, ``.js``), read once at
import with ``importlib.resources`` so that they load from a wheel or a zip as well as from a
source tree; the Content-Security-Policy hashes are computed from them then.
"""

from __future__ import annotations

import base64
import hashlib
from importlib import resources

_STATIC = resources.files(__package__) / "static"


def _read(name: str) -> str:
    return (_STATIC / name).read_text(encoding="utf-8")


CSS = _read("status.css")
HTML_BODY = _read("status.html")
JS = _read("status.js")


def _csp_hash(source: str) -> str:
    digest = hashlib.sha256(source.encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


def build() -> tuple[bytes, list[tuple[str, str]]]:
    """The page's bytes and its response headers.

    The Content-Security-Policy allows exactly this document's own style and script (by hash)
    and fetches to the same origin: even if some data slipped into markup, it could not run.
    """
    style, script = "\n" + CSS, "\n" + JS
    html = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light dark">\n'
        "<title>kmi-rotor status</title>\n"
        '<link rel="icon" href="data:,">\n'
        f"<style>{style}</style>\n</head>\n"
        f"<body>\n{HTML_BODY}<script>{script}</script>\n</body>\n</html>\n"
    )
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src {_csp_hash(script)}",
            f"style-src {_csp_hash(style)}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return html.encode(), [("Content-Security-Policy", csp)]


BODY, HEADERS = build()
