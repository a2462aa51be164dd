"""The route check's writes on the raw fields give what mitmproxy's own setters give."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from mitmproxy.test import tflow, tutils

from kmi_rotor.core.calls import is_api_call
from kmi_rotor.gatekeeper import (
    Gatekeeper,
    _api_call,
    _authority_bytes,
    _host_set,
    _is_reverse,
    set_host_header,
)
from kmi_rotor.hosting import StatusPage, authority_text, host_header

FIELDS = [
    (),
    ((b"Host", b"llm.test"),),
    ((b"HOST", b"other.test"), (b"accept", b"*/*")),
    ((b"accept", b"*/*"), (b"host", b"a.test"), (b"x", b"1"), (b"Host", b"b.test")),
    ((b"authorization", b"Bearer x"), (b"content-length", b"2")),
    ((b"hOsT", b"\xff\xfe"),),
]


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("value", ["llm.test", "llm.test:8443", "[::1]:443", "bücher.test"])
def test_host_set_is_set_all(fields: tuple[tuple[bytes, bytes], ...], value: str) -> None:
    headers = http.Headers(list(fields))
    headers.set_all("Host", [value])
    present = any(k.lower() == b"host" for k, _ in fields)
    assert _host_set(fields, value, present) == headers.fields


@pytest.mark.parametrize(
    "raw", [b"llm.test", b"LLM.Test:443", b"xn--bcher-kva.test", b"\xff.test", b"[::1]:8080"]
)
def test_authority_is_the_requests(raw: bytes) -> None:
    req = tutils.treq(authority=raw)
    assert authority_text(raw) == req.authority


@pytest.mark.parametrize(
    "value", ["llm.test", "LLM.test:443", "bücher.test", "\udcff.test", "a..b", "[::1]:8080"]
)
def test_authority_bytes_are_what_the_setter_stores(value: str) -> None:
    req = tutils.treq()
    req.authority = value
    assert _authority_bytes(value) == req.data.authority


@pytest.mark.parametrize("method", [b"GET", b"post", b"HEAD", b"OPTIONS", b"Patch", b"\xff"])
@pytest.mark.parametrize(
    "path",
    [b"/", b"", b"/?x=1", b"/v1/chat/completions", b"/favicon.ico?a", b"/\xff", b"*", b"/\xff?/"],
)
def test_api_call_of_raw_method_and_path(method: bytes, path: bytes) -> None:
    req = tutils.treq(method=method, path=path)
    assert _api_call(method, path) is is_api_call(req.method, req.path)
    # as the gate asks it: the path without its query string, split on the raw bytes
    assert _api_call(method, path.split(b"?", 1)[0]) is is_api_call(req.method, req.path)


@pytest.mark.parametrize(
    "spec",
    [
        "regular",
        "reverse:https://llm.test",
        "reverse:http://127.0.0.1:8080",
        "transparent",
        "upstream:http://proxy.test:3128",
        "socks5",
        "wireguard",
        "local",
    ],
)
def test_is_reverse_is_isinstance(spec: str) -> None:
    mode = ProxyMode.parse(spec)
    assert _is_reverse(mode) is isinstance(mode, ReverseMode)
    assert _is_reverse(mode) is isinstance(mode, ReverseMode)  # remembered: the same


@pytest.mark.parametrize("fields", [*FIELDS, ((b"Host", b"llm.test:443"),)])
@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/2.0"])
def test_reverse_host_rewrite_is_set_host_header(
    fields: tuple[tuple[bytes, bytes], ...], version: bytes
) -> None:
    """Reverse mode's Host rewrite, on the Host field it found reading it, gives what
    `set_host_header` gives on the request when its Host is not the upstream's already."""
    mode = ProxyMode.parse("reverse:https://llm.test")
    gk = Gatekeeper(StatusPage(dict), lambda: None, lambda: None, lambda: 0.0)
    gk._owns_host_header = True
    gk._host_verdict = lambda *args: None  # type: ignore[method-assign]  # any Host passes
    flow = tflow.tflow(req=tutils.treq(headers=http.Headers(fields), http_version=version))
    flow.client_conn.proxy_mode = mode
    expected = tutils.treq(headers=http.Headers(fields), http_version=version)
    if host_header(expected) != "llm.test":  # the upstream's authority (its port the default)
        set_host_header(expected, "llm.test")
    assert gk._reverse_host(flow, None) is None
    assert flow.request.headers.fields == expected.headers.fields
    assert flow.request.authority == expected.authority
