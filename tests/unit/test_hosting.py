"""The status page's host test reads the Host field as mitmproxy's `host_header` does."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from kmi_rotor.hosting import WEB_PREFIX, StatusPage, host_header, is_status_path


def _request(version: bytes, fields: list[tuple[bytes, bytes]], authority: bytes = b""):
    req = tutils.treq(host="10.0.0.1", port=80, headers=http.Headers(fields))
    req.http_version = version.decode()
    req.data.authority = authority
    return req


@pytest.mark.parametrize(
    ("version", "fields", "authority"),
    [
        (b"HTTP/1.1", [], b""),
        (b"HTTP/1.1", [(b"Host", b"kmi-rotor.local")], b""),
        (b"HTTP/1.1", [(b"HOST", b"a.test"), (b"x", b"y"), (b"host", b"b.test")], b""),
        (b"HTTP/1.1", [(b"host", b"\xffodd.test")], b""),
        (b"HTTP/1.1", [(b"host", b"a.test")], b"ignored.test"),
        (b"HTTP/2.0", [], b"kmi-rotor.local"),
        (b"HTTP/2.0", [(b"host", b"a.test")], b"b.test"),
        (b"HTTP/2.0", [(b"host", b"a.test")], b""),
        (b"HTTP/2.0", [], b""),
        (b"HTTP/3", [(b"Host", b"kmi-rotor.local:8080")], b""),
    ],
)
def test_host_header_as_mitmproxy_reads_it(version, fields, authority) -> None:
    req = _request(version, fields, authority)
    assert host_header(req) == req.host_header


@pytest.mark.parametrize(
    ("fields", "path", "served"),
    [
        ([(b"host", b"kmi-rotor.local")], "/", True),
        ([(b"Host", b"kmi-rotor.local:80")], "/metrics", True),
        ([(b"host", b"kmi-rotor.local.evil.test")], "/", False),
        ([(b"host", b"llm.test")], "/", False),
        ([(b"host", b"llm.test")], "/_kmi-rotor/", True),
        ([(b"host", b"llm.test")], "/_kmi-rotorx", False),
        ([], "/", False),
    ],
)
def test_should_serve(fields, path, served) -> None:
    page = StatusPage(dict)
    f = tflow.tflow(req=_request(b"HTTP/1.1", fields))
    f.request.path = path
    assert page.should_serve(f) is served


@pytest.mark.parametrize(
    "path",
    [
        b"/_kmi-rotor",
        b"/_kmi-rotor/",
        b"/_kmi-rotor/api/state?x=1",
        b"/_kmi-rotor?x",
        b"/_kmi-rotorx",
        b"/_kmi-rotor#",
        b"/_kmi-rotor\xc3\xa9",  # a letter after the prefix
        b"/_kmi-rotor\xff/",  # not UTF-8 after it
        b"/_kmi-rotor\xe2\x80",  # a truncated character after it
        b"/_KMI-ROTOR/",
        b"/_kmi-roto",
        b"/\xff_kmi-rotor/",
        b"//_kmi-rotor/",
        b"http://llm.test/_kmi-rotor/",
        b"*",
        b"",
        b"/v1/chat/completions",
    ],
)
def test_status_path_on_the_bytes_is_the_decoded_path(path: bytes) -> None:
    decoded = path.decode("utf-8", "surrogateescape")  # what `Request.path` gives
    after = decoded[len(WEB_PREFIX) : len(WEB_PREFIX) + 1]
    assert is_status_path(path) is (decoded.startswith(WEB_PREFIX) and after in ("", "/", "?"))


@pytest.mark.parametrize(
    ("version", "fields", "authority", "served"),
    [
        (b"HTTP/2.0", [], b"kmi-rotor.local", True),
        (b"HTTP/2.0", [(b"host", b"kmi-rotor.local")], b"llm.test", False),  # :authority wins
        (b"HTTP/3", [(b"host", b"llm.test")], b"kmi-rotor.local:443", True),
        (b"HTTP/1.1", [(b"host", b"llm.test")], b"kmi-rotor.local", False),  # Host wins
        (b"HTTP/1.1", [(b"host", b"kmi-rotor.local"), (b"Host", b"kmi-rotor.local")], b"", False),
        (b"HTTP/1.1", [(b"host", b"KMI-ROTOR.LOCAL")], b"", False),  # as mitmproxy reads it
        (b"HTTP/1.1", [(b"host", b"kmi-rotor.local\xff")], b"", False),
    ],
)
def test_should_serve_reads_the_host_as_mitmproxy_does(version, fields, authority, served):
    page = StatusPage(dict)
    f = tflow.tflow(req=_request(version, fields, authority))
    assert page.should_serve(f) is served
    assert page.should_serve(f) is (f.request.pretty_host == "kmi-rotor.local")
