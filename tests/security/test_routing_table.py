"""Where a pool key may go: the pure decisions of `core.routing`, table by table."""

from __future__ import annotations

import pytest

from kmi_rotor.core import routing
from kmi_rotor.core.hosts import HostPattern


@pytest.mark.parametrize(
    ("value", "scheme", "expected"),
    [
        ("api.x", "https", ("api.x", 443)),
        ("API.X.", "https", ("api.x", 443)),
        ("api.x:443", "https", ("api.x", 443)),
        ("api.x", "http", ("api.x", 80)),
        ("api.x:8443", "https", ("api.x", 8443)),
        ("[::1]:8080", "http", ("::1", 8080)),
        ("[::FFFF:127.0.0.1]", "https", ("127.0.0.1", 443)),
        ("127.1:8080", "http", ("127.0.0.1", 8080)),
        ("2130706433:1", "http", ("127.0.0.1", 1)),
        ("", "https", None),
        ("api.x:", "https", ("api.x", 443)),  # RFC 3986: an empty port is the default
        ("api.x:0", "https", None),
        ("api.x:99999", "https", None),
        ("api.x:44a", "https", None),
        ("user@api.x", "https", None),
        ("api.x/path", "https", None),
        ("api .x", "https", None),
        ("[::1", "https", None),
        ("[::1]x", "https", None),
        ("::1", "https", None),  # an IPv6 Host must be bracketed
    ],
)
def test_parse_authority(value: str, scheme: str, expected: tuple[str, int] | None) -> None:
    assert routing.parse_authority(value, scheme) == expected


@pytest.mark.parametrize(
    ("scheme", "host", "port", "expected"),
    [
        ("https", "API.X.", 443, "api.x"),
        ("https", "api.x", 8443, "api.x:8443"),
        ("http", "api.x", 80, "api.x"),
        ("http", "api.x", 443, "api.x:443"),
        ("https", "::1", 443, "[::1]"),
        ("https", "[::1]", 8443, "[::1]:8443"),
    ],
)
def test_authority(scheme: str, host: str, port: int, expected: str) -> None:
    assert routing.authority(scheme, host, port) == expected


def route(
    scheme: str = "https",
    host: str = "api.x",
    port: int = 443,
    values: tuple[str, ...] = ("api.x",),
    sni: str | None = None,
    done: bool = False,
    plain: bool = False,
) -> routing.Route:
    return routing.route(
        scheme,
        host,
        port,
        host_values=values,
        upstream_sni=sni,
        upstream_tls_done=done,
        plain_http_allowed=plain,
    )


@pytest.mark.parametrize(
    ("kwargs", "mismatches", "refusal"),
    [
        ({}, (), None),
        ({"values": ("API.X.:443",)}, (), None),  # the same place, spelled otherwise
        ({"values": ("attacker.example",)}, ("attacker.example",), None),
        ({"values": ("api.x:8443",)}, ("api.x:8443",), None),  # another port is another place
        ({"values": ("api.x", "attacker.example")}, ("attacker.example",), None),  # two Hosts
        ({"values": ("api.x", "evil:443")}, ("evil:443",), None),  # h2 :authority or absolute URL
        ({"values": ("garbage host",)}, ("garbage host",), None),
        ({"values": ()}, (), None),  # no Host at all: one is set
        ({"sni": "api.x", "done": True}, (), None),
        ({"sni": "API.X.", "done": True}, (), None),
        ({"sni": "attacker.example", "done": False}, (), None),  # not made yet: it is pinned
        ({"sni": "attacker.example", "done": True}, (), 421),
        ({"scheme": "http", "port": 80}, (), 403),
        ({"scheme": "http", "port": 80, "plain": True}, (), None),
        (
            {"scheme": "http", "host": "127.0.0.1", "port": 8080, "values": ("127.1:8080",)},
            (),
            None,
        ),
        ({"scheme": "http", "host": "localhost", "port": 80, "values": ("localhost",)}, (), None),
        ({"scheme": "http", "host": "::1", "port": 80, "values": ("[::1]",)}, (), None),
        ({"scheme": "http", "host": "10.0.0.5", "port": 80, "values": ("10.0.0.5",)}, (), 403),
        (
            {"scheme": "http", "host": "a.localhost", "port": 80, "values": ("a.localhost",)},
            (),
            403,
        ),
    ],
)
def test_route(kwargs: dict, mismatches: tuple[str, ...], refusal: int | None) -> None:
    r = route(**kwargs)
    assert r.mismatches == mismatches
    assert (r.refusal[0] if r.refusal else None) == refusal
    if refusal == 403:
        assert r.refusal is not None and r.refusal[1] == "insecure_transport"
        assert "only over TLS" in r.refusal[2] and "http://" in r.refusal[2]
    if refusal == 421:
        assert r.refusal is not None and "attacker.example" in r.refusal[2]


def test_route_names_the_target_for_every_rewrite() -> None:
    r = route(host="API.X.", port=8443, values=("attacker.example",))
    assert (r.authority, r.sni) == ("api.x:8443", "api.x")


LOCAL = ("127.0.0.1", 8081)


@pytest.mark.parametrize(
    ("host", "local", "listen", "allowed", "ok"),
    [
        ("localhost:8081", LOCAL, (), (), True),
        ("LOCALHOST:8081", LOCAL, (), (), True),
        ("127.0.0.1:8081", LOCAL, (), (), True),
        ("127.0.0.2:8081", LOCAL, (), (), True),  # an address, never a rebound name
        ("[::1]:8081", LOCAL, (), (), True),
        ("localhost", LOCAL, (), (), False),  # port 80 is not the proxy's
        ("localhost:8082", LOCAL, (), (), False),
        ("attacker.example:8081", LOCAL, (), (), False),  # DNS rebinding
        ("attacker.example", LOCAL, (), (), False),
        ("localhost.attacker.example:8081", LOCAL, (), (), False),
        ("a.localhost:8081", LOCAL, (), (), False),
        ("10.231.0.1:8081", ("10.231.0.1", 8081), (), (), True),  # the address connected to
        ("10.231.0.1:8081", ("::ffff:10.231.0.1", 8081), (), (), True),
        ("10.231.0.9:8081", ("10.231.0.1", 8081), (), (), False),
        ("192.0.2.7:8081", LOCAL, ("192.0.2.7",), (), True),  # a listen address
        ("0.0.0.0:8081", LOCAL, ("0.0.0.0",), (), False),
        ("rotor.lan:8081", LOCAL, (), ("rotor.lan",), True),
        ("rotor.lan:9999", LOCAL, (), ("rotor.lan:8081",), False),
        ("x.rotor.lan:8081", LOCAL, (), ("*.rotor.lan",), True),
        ("garbage host", LOCAL, (), (), False),
        (None, LOCAL, (), (), True),  # HTTP/1.0 without Host: not a browser
    ],
)
def test_reverse_host_verdict(host, local, listen, allowed, ok) -> None:
    patterns = [HostPattern.parse(a) for a in allowed]
    why = routing.reverse_host_verdict(host, "http", local, listen, patterns)
    assert (why is None) is ok, why
    if not ok:
        assert "allowed_hosts" in why or "not a host" in why


@pytest.mark.parametrize(
    ("text", "scheme", "shown"),
    [
        ("https://api.x", "https", "https://api.x"),
        ("HTTP://Api.X:8080", "http", "http://api.x:8080"),
        ("http://[::1]:9", "http", "http://[::1]:9"),
        ("api.x", None, "api.x"),
    ],
)
def test_host_pattern_scheme(text: str, scheme: str | None, shown: str) -> None:
    p = HostPattern.parse(text)
    assert (p.scheme, str(p)) == (scheme, shown)
    assert p.matches(p.host, p.port or 443)
