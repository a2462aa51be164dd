"""Who may use the proxy and which destinations a connection may have: the pure decisions of
`core.access`, table by table."""

from __future__ import annotations

import ipaddress

import pytest

from kmi_rotor.core import access
from kmi_rotor.core.access import Exposure

# -- every spelling of an address -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::1%lo", "::1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("::ffff:7f00:2", "127.0.0.2"),
        ("0.0.0.0", "0.0.0.0"),
        ("0", "0.0.0.0"),
        ("::", "::"),
        ("10.231.0.1", "10.231.0.1"),
        ("localhost", None),
        ("api.openai.com", None),
        ("127.0.0.1 x", None),
        ("", None),
        ("999.0.0.1", None),
    ],
)
def test_parse_address(host: str, expected: str | None) -> None:
    ip = access.parse_address(host)
    assert (str(ip) if ip is not None else None) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.2", True),
        ("127.1", True),
        ("2130706433", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),  # unspecified: this machine, but not loopback by name (see below)
        ("a.localhost", False),
        ("api.x", False),
        ("10.0.0.1", False),
    ],
)
def test_names_loopback(host: str, expected: bool) -> None:
    assert access.names_loopback(host) is expected


# -- client_verdict -------------------------------------------------------------------------------

STATES = ("local", "open", "exposed", "remote_ok")
KINDS = ("pool", "page", "connect_pool", "other")


def expected(
    state: str, kind: str, loopback: bool, proxyauth: bool, token: bool, tokens: bool
) -> bool:
    """The rules written out case by case, not derived from the module."""
    if kind in ("pool", "page") and state == "exposed":
        return False  # the operator must fix the set-up first, even for loopback
    if loopback:
        return True
    if kind == "other":
        return proxyauth  # no relay for anyone unauthenticated
    if kind == "connect_pool":
        return proxyauth or (state == "remote_ok" and tokens)
    return state == "remote_ok" and (proxyauth or token)


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("token", [False, True])
@pytest.mark.parametrize("proxyauth", [False, True])
@pytest.mark.parametrize("loopback", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("state", STATES)
def test_client_verdict(state, kind, loopback, proxyauth, token, tokens) -> None:
    if token and not tokens:
        return  # a valid token needs configured tokens
    why = access.client_verdict(
        Exposure(state),
        kind,
        loopback=loopback,
        proxyauth=proxyauth,
        token=token,
        tokens_configured=tokens,
    )
    assert (why is None) is expected(state, kind, loopback, proxyauth, token, tokens)


def test_unauthenticated_remote_client_gets_nothing_whatever_the_state() -> None:
    for state in STATES:
        for kind in KINDS:
            why = access.client_verdict(
                Exposure(state),  # type: ignore[arg-type]
                kind,  # type: ignore[arg-type]
                loopback=False,
                proxyauth=False,
                token=False,
                tokens_configured=False,
            )
            assert why is not None, (state, kind)


@pytest.mark.parametrize(
    ("client_pools", "pool", "ok"),
    [
        (None, "main", True),
        (("main",), "main", True),
        (("other",), "main", False),
        ((), "main", False),
        (("other",), None, True),  # the status page: any valid token
    ],
)
def test_token_allows(client_pools, pool, ok) -> None:
    assert access.token_allows(client_pools, pool) is ok


# -- destination_verdict --------------------------------------------------------------------------

OWN = {ipaddress.ip_address("10.231.0.1"), ipaddress.ip_address("192.0.2.5")}
PORTS = {8080, 8081}


def ips(*texts: str) -> list:
    return [ipaddress.ip_address(t) for t in texts]


@pytest.mark.parametrize(
    ("addresses", "port", "client_loopback", "pool_host", "refused"),
    [
        # the proxy itself, by every address of this machine, from anyone
        (ips("127.0.0.1"), 8080, True, False, "proxy itself"),
        (ips("127.0.0.2"), 8080, False, False, "proxy itself"),
        (ips("127.255.255.254"), 8081, False, False, "proxy itself"),
        (ips("::1"), 8080, False, False, "proxy itself"),
        (ips("0.0.0.0"), 8080, False, False, "proxy itself"),
        (ips("::"), 8080, True, False, "proxy itself"),
        (ips("10.231.0.1"), 8080, False, False, "proxy itself"),
        (ips("192.0.2.5"), 8081, True, True, "proxy itself"),  # even as a pool host
        (ips("203.0.113.9", "127.0.0.1"), 8080, False, False, "proxy itself"),  # any address
        # this machine on another port: only loopback clients, or a configured pool host
        (ips("127.0.0.1"), 6379, False, False, "is this machine"),
        (ips("10.231.0.1"), 22, False, False, "is this machine"),
        (ips("127.0.0.1"), 6379, True, False, None),
        (ips("127.0.0.1"), 6379, False, True, None),
        # elsewhere
        (ips("203.0.113.9"), 8080, False, False, None),
        (ips("203.0.113.9"), 443, False, False, None),
        ([], 8080, False, False, None),
    ],
)
def test_destination_verdict(addresses, port, client_loopback, pool_host, refused) -> None:
    why = access.destination_verdict(
        addresses,
        port,
        client_loopback=client_loopback,
        pool_host=pool_host,
        listen_ports=PORTS,
        own=lambda ip: ip in OWN,
    )
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why
