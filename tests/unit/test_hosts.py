"""Host patterns: parsing, rejection and matching of `host`, `host:port`, `*.domain`."""

from __future__ import annotations

import pytest

from kmi_rotor.core.hosts import HostLookup, HostPattern


@pytest.mark.parametrize(
    ("text", "host", "port", "wildcard", "shown"),
    [
        ("api.openai.com", "api.openai.com", None, False, "api.openai.com"),
        ("API.OpenAI.com", "api.openai.com", None, False, "api.openai.com"),
        ("  api.openai.com  ", "api.openai.com", None, False, "api.openai.com"),
        ("api.openai.com:443", "api.openai.com", 443, False, "api.openai.com:443"),
        ("localhost:8080", "localhost", 8080, False, "localhost:8080"),
        ("127.0.0.1:1", "127.0.0.1", 1, False, "127.0.0.1:1"),
        ("example.com:65535", "example.com", 65535, False, "example.com:65535"),
        ("*.example.com", "example.com", None, True, "*.example.com"),
        ("*.Example.COM:8443", "example.com", 8443, True, "*.example.com:8443"),
        ("[::1]:8080", "::1", 8080, False, "[::1]:8080"),
        ("[::1]", "::1", None, False, "[::1]"),
        ("[2001:DB8::1]:443", "2001:db8::1", 443, False, "[2001:db8::1]:443"),
        ("::1", "::1", None, False, "[::1]"),
    ],
)
def test_host_pattern_parse(
    text: str, host: str, port: int | None, wildcard: bool, shown: str
) -> None:
    p = HostPattern.parse(text)
    assert (p.host, p.port, p.wildcard) == (host, port, wildcard)
    assert str(p) == shown
    assert HostPattern.parse(str(p)) == p


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not a host pattern"),
        ("   ", "not a host pattern"),
        ("ftp://api.openai.com", "not a host pattern"),
        ("https://", "not a host pattern"),
        ("http://user@api.openai.com", "not a host pattern"),
        ("https://api.openai.com/v1", "not a host pattern"),
        ("api.openai.com/v1", "not a host pattern"),
        ("api openai.com", "not a host pattern"),
        ("api.openai.com:", "bad port"),
        ("api.openai.com:0", "bad port"),
        ("api.openai.com:65536", "bad port"),
        ("api.openai.com:-1", "bad port"),
        ("api.openai.com:https", "bad port"),
        ("[::1", "unclosed"),
        ("[::1]:", "bad port"),
        ("[::1]:99999", "bad port"),
        ("*", "'*' may only open a pattern"),
        ("*.", "'*' may only open a pattern"),
        ("*example.com", "'*' may only open a pattern"),
        ("api.*.com", "'*' may only open a pattern"),
        ("*.*.example.com", "'*' may only open a pattern"),
        (":8080", "'*' may only open a pattern"),
    ],
)
def test_host_pattern_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="pattern") as exc:
        HostPattern.parse(text)
    assert reason in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("pattern", "host", "port", "expected"),
    [
        ("api.openai.com", "api.openai.com", 443, True),
        ("api.openai.com", "API.OPENAI.COM", 443, True),
        ("api.openai.com", "api.openai.com.", 443, True),
        ("api.openai.com", "api.openai.com", 8080, True),  # no port: any port
        ("api.openai.com", "openai.com", 443, False),
        ("api.openai.com", "xapi.openai.com", 443, False),
        ("api.openai.com", "api.openai.com.evil.net", 443, False),
        ("api.openai.com:443", "api.openai.com", 443, True),
        ("api.openai.com:443", "api.openai.com", 80, False),
        ("*.example.com", "api.example.com", 443, True),
        ("*.example.com", "a.b.example.com", 443, True),
        ("*.example.com", "API.Example.Com", 443, True),
        ("*.example.com", "example.com", 443, False),
        ("*.example.com", "evilexample.com", 443, False),
        ("*.example.com", "example.com.evil.net", 443, False),
        ("*.example.com:8443", "api.example.com", 8443, True),
        ("*.example.com:8443", "api.example.com", 443, False),
        ("[::1]:8080", "::1", 8080, True),
        ("[::1]:8080", "::1", 8081, False),
        ("[::1]", "::1", 1234, True),
        ("127.0.0.1", "127.0.0.1", 80, True),
        ("127.0.0.1", "127.0.0.2", 80, False),
    ],
)
def test_host_pattern_matches(pattern: str, host: str, port: int, expected: bool) -> None:
    assert HostPattern.parse(pattern).matches(host, port) is expected


def test_host_pattern_with_trailing_dot_matches_or_is_rejected() -> None:
    try:
        pattern = HostPattern.parse("api.example.com.")
    except ValueError:
        return
    assert pattern.matches("api.example.com", 443)


# -- HostLookup: pool lookups once per configuration ------------------------------------------


def test_a_lookup_asks_once_per_host_and_port() -> None:
    asked: list[tuple[str, int]] = []

    def find(host: str, port: int) -> str | None:
        asked.append((host, port))
        return "pool" if host == "api.test" else None

    lookup = HostLookup(find, source="config-1")
    got = [lookup(h, p) for h, p in [("api.test", 443), ("api.test", 443), ("x.test", 443)] * 2]
    assert got == ["pool", "pool", None] * 2
    assert asked == [("api.test", 443), ("x.test", 443)]
    assert lookup.source == "config-1"


def test_a_lookup_stops_remembering_past_its_limit() -> None:
    asked: list[str] = []
    lookup = HostLookup(lambda h, p: asked.append(h), limit=2)
    for host in ["a", "b", "c", "c", "a"]:
        lookup(host, 1)
    assert asked == ["a", "b", "c", "c"]  # "a" and "b" remembered; "c" asked each time
