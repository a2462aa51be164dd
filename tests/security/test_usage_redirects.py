"""The usage poller sends a key: it follows a redirect only within the same https origin,
never to another host, another port or plain http (real TLS servers on 127.0.0.1)."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from pydantic import SecretStr

from kmi_rotor.config import Key
from kmi_rotor.core.kimi import may_follow_redirect
from kmi_rotor.usage_poller import fetch

KEY = "sk-usage-redirect-0000000000000000000042"


@pytest.mark.parametrize(
    ("target", "follow"),
    [
        ("https://api.kimi.com/coding/v2/usages", True),
        ("/coding/v2/usages", True),  # relative: same origin
        ("https://API.KIMI.COM./x", True),  # case and a trailing dot
        ("https://api.kimi.com:443/x", True),
        ("http://api.kimi.com/coding/v1/usages", False),  # out of TLS
        ("https://evil.example/usages", False),
        ("//evil.example/usages", False),
        ("https://api.kimi.com:8443/x", False),
        ("https://api.kimi.com.evil.example/x", False),
        ("https://api.kimi.com@evil.example/x", False),
        ("https://api.kimi.com:99999/x", False),
        ("ftp://api.kimi.com/x", False),
    ],
)
def test_a_keyed_request_follows_only_same_origin_https(target: str, follow: bool) -> None:
    assert may_follow_redirect("https://api.kimi.com/coding/v1/usages", target) is follow


def test_nothing_followed_from_plain_http() -> None:
    assert not may_follow_redirect("http://127.0.0.1:8000/usages", "/v2/usages")


@dataclass
class Server:
    """A local server: `/usages` redirects to `location`; every other path answers 200 and
    records the Authorization header it got."""

    location: str = ""
    seen: list[str | None] = field(default_factory=list)
    port: int = 0


def _serve(server: Server, ctx: ssl.SSLContext | None) -> Iterator[Server]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/usages" and server.location:
                self.send_response(302)
                self.send_header("Location", server.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            server.seen.append(self.headers.get("Authorization"))
            body = b'{"usage": {"limit": "10", "remaining": "5"}}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if ctx is not None:
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    server.port = httpd.server_address[1]
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("usage-ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


def _tls(authority: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def origin(ca) -> Iterator[Server]:
    yield from _serve(Server(), _tls(ca[0]))


@pytest.fixture
def other_tls(ca) -> Iterator[Server]:
    yield from _serve(Server(), _tls(ca[0]))


@pytest.fixture
def other_plain() -> Iterator[Server]:
    yield from _serve(Server(), None)


def _key() -> Key:
    return Key(
        label="k", pool="kimi", secret=SecretStr(KEY), fingerprint="sha256:0", disabled=False
    )


@pytest.mark.parametrize("where", ["plain http", "another port", "another name"])
def test_the_poller_does_not_carry_a_key_through_a_foreign_redirect(
    where: str, ca, origin: Server, other_tls: Server, other_plain: Server
) -> None:
    origin.location = {
        "plain http": f"http://127.0.0.1:{other_plain.port}/usages-here",
        "another port": f"https://127.0.0.1:{other_tls.port}/usages-here",
        "another name": f"https://localhost:{origin.port}/usages-here",
    }[where]
    status, body = fetch(f"https://127.0.0.1:{origin.port}/usages", _key(), str(ca[1]))
    assert status == 302 and body == b""
    assert other_plain.seen == [] and other_tls.seen == [] and origin.seen == []


def test_the_poller_follows_a_redirect_within_its_origin(ca, origin: Server) -> None:
    origin.location = "/usages-moved"
    status, _ = fetch(f"https://127.0.0.1:{origin.port}/usages", _key(), str(ca[1]))
    assert status == 200
    assert origin.seen == [f"Bearer {KEY}"]
