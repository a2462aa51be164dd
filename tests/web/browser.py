"""Headless Chromium against the status app served on 127.0.0.1 by ``wsgiref``."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import WSGIApplication

from kmi_rotor.web import make_app

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_S = 60
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # Chromium opens speculative connections that may stay idle: one must not block the rest.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve(app: WSGIApplication) -> Iterator[str]:
    """Serve ``app`` on an ephemeral loopback port; yield its base URL (ending in "/")."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def run_chromium(url: str, *extra: str, timeout: float = TIMEOUT_S) -> str:
    """Run one headless Chromium with a throw-away profile; return its standard output.

    Raises ``subprocess.TimeoutExpired`` or ``CalledProcessError`` rather than hanging.
    """
    with tempfile.TemporaryDirectory(prefix="kmi-chromium-") as profile:
        cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *extra, url]
        env = os.environ | {"HOME": profile}  # keeps crash reports and caches out of $HOME
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=True
        )
        return done.stdout


def dump_dom(url: str) -> str:
    """The DOM after the page's script has run for 5 s of virtual time."""
    return run_chromium(url, "--dump-dom")


def screenshot(url: str, out: Path, size: str = "1280,900") -> Path:
    """Write a PNG of the page at ``size`` (width,height) to ``out``."""
    run_chromium(url, f"--screenshot={out}", f"--window-size={size}")
    return out


def screenshot_to(snapshot: Callable[[], dict[str, Any]], out: Path) -> Path:
    """Serve ``snapshot`` and write a screenshot of the page to ``out`` (for the docs)."""
    out = out.resolve()
    with serve(make_app(snapshot)) as url, tempfile.TemporaryDirectory() as tmp:
        shot = screenshot(url, Path(tmp) / "status.png", "1280,1160")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out)
    return out
