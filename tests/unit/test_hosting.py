"""The status page's host test reads the Host field as mitmproxy's `host_header` does."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from kmi_rotor.hosting import StatusPage, _host_header


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
    assert _host_header(req) == req.host_header


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
