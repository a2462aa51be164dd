"""Nobody outside gets in: clients in a network namespace of the test's own (joined to this
machine by a veth pair) against a real mitmdump, listening on mitmproxy's default address and
on 0.0.0.0, with and without rotor_allow_remote, proxyauth and client tokens.

Each client tries a pool request, relays to other services of this machine, and tunnels back
to the proxy itself through every spelling of its addresses, sending a pool request inside:
had any tunnel worked, that inner request would come from loopback and get a key. The upstream
is plain HTTP on 127.0.0.1 and logs every credential it receives.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from e2e._netns import Netns, netns

import fake_provider

from ._probe import get
from .conftest import leaked, probes, write_config

pytestmark = pytest.mark.e2e

TOKEN = "kmirot-security-client-token-0123456789"
FOREIGN_TOKEN = "kmirot-security-other-token-9876543210"


@pytest.fixture(scope="module")
def ns() -> Iterator[Netns]:
    with netns() as created:
        yield created


@pytest.fixture
def service() -> Iterator[fake_provider.FakeProvider]:
    """Another service on this machine's loopback, in no pool: what a relay would expose."""
    with fake_provider.run_in_thread(fake_provider.FakeProvider({})) as running:
        yield running


def self_spellings(ns: Netns, port: int) -> list[str]:
    """Every way to name this machine (hence the proxy) on `port` that a client could try."""
    hosts = [
        "127.0.0.1",
        "127.0.0.2",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:2]",
        "0.0.0.0",
        "0",
        "[::]",
        "localhost",
        "LOCALHOST.",
        ns.host_ip,
        f"[::ffff:{ns.host_ip}]",
    ]
    try:  # the machine's own name, where it resolves (it does not on every machine)
        socket.getaddrinfo(socket.gethostname(), port)
        hosts.append(socket.gethostname())
    except OSError:
        pass
    return [f"{h}:{port}" for h in hosts]


def attacks(ns: Netns, proxy_port: int, upstream: int, service: int, auth: str | None):
    """(name, probe) of every attempt; each must be refused."""
    proxy = [ns.host_ip, proxy_port]
    pool_url = f"http://127.0.0.1:{upstream}/v1/models"
    inner = get(pool_url, f"127.0.0.1:{upstream}")
    base: dict[str, Any] = {"proxy": proxy, "auth": auth}
    out: list[tuple[str, dict[str, Any]]] = [
        ("relay to a service", {**base, "request": get(f"http://127.0.0.1:{service}/", "x")}),
        ("tunnel to a service", {**base, "connect": f"127.0.0.1:{service}", "request": inner}),
        (
            "relay to the host side",
            {**base, "request": get(f"http://{ns.host_ip}:{service}/", "x")},
        ),
    ]
    for target in self_spellings(ns, proxy_port):
        out.append((f"tunnel back via {target}", {**base, "connect": target, "request": inner}))
        out.append(
            (f"relay back via {target}", {**base, "request": get(f"http://{target}/", target)})
        )
    return out


def assert_all_refused(results, names, upstream, service) -> None:
    for name, r in zip(names, results, strict=True):
        refused = r["connect"] in (403, 407) or (r["connect"] == 0 and r["status"] in (403, 407))
        assert refused, (name, r)
    assert leaked(upstream) == []
    assert service.requests == []


CASES = {
    # name: (listen host, extra mitmdump options, proxy credentials the client sends, tokens)
    "default-listen, no auth": (None, (), None, False),
    "0.0.0.0, no auth": ("0.0.0.0", (), None, False),
    "0.0.0.0, allow_remote without auth": ("0.0.0.0", ("rotor_allow_remote=true",), None, False),
    "0.0.0.0, proxyauth without allow_remote": ("0.0.0.0", ("proxyauth=u:p",), "u:p", False),
    "default-listen, allow_remote + proxyauth": (
        None,
        ("rotor_allow_remote=true", "proxyauth=u:p"),
        "u:p",
        False,
    ),
    "0.0.0.0, allow_remote + proxyauth": (
        "0.0.0.0",
        ("rotor_allow_remote=true", "proxyauth=u:p"),
        "u:p",
        False,
    ),
    "0.0.0.0, allow_remote + tokens": ("0.0.0.0", ("rotor_allow_remote=true",), None, True),
}


@pytest.mark.parametrize("case", CASES)
def test_no_relay_and_no_way_back(tmp_path, start, ns, plain, service, case):
    listen, options, auth, tokens = CASES[case]
    clients = []
    if tokens:
        clients = ["[[clients]]", 'label = "laptop"', f'token = "{TOKEN}"', 'pools = ["main"]']
    m = start(
        write_config(tmp_path, [f"127.0.0.1:{plain.port}"], *clients),
        listen_host=listen,
        extra=[x for o in options for x in ("--set", o)],
    )
    named = attacks(ns, m.port, plain.port, service.port, auth)
    results = probes([p for _, p in named], ns)
    assert_all_refused(results, [n for n, _ in named], plain, service)


def test_authenticated_remote_clients_still_reach_the_pool(tmp_path, start, ns, plain, service):
    """The refusals above are not a proxy that refuses everything: the same remote client,
    authenticated, gets its pool request served, and a loopback client too."""
    m = start(
        write_config(tmp_path, [f"127.0.0.1:{plain.port}"]),
        listen_host="0.0.0.0",
        extra=("--set", "rotor_allow_remote=true", "--set", "proxyauth=u:p"),
    )
    pool = get(f"http://127.0.0.1:{plain.port}/v1/models", f"127.0.0.1:{plain.port}")
    remote, anonymous = probes(
        [
            {"proxy": [ns.host_ip, m.port], "auth": "u:p", "request": pool},
            {"proxy": [ns.host_ip, m.port], "request": pool},
        ],
        ns,
    )
    assert remote["status"] == 200, remote
    assert anonymous["status"] == 407, anonymous
    assert len(leaked(plain)) == 1


def test_client_tokens_are_checked_inside_tunnels_and_bound_to_pools(tmp_path, start, ns, plain):
    clients = ["[[clients]]", 'label = "laptop"', f'token = "{TOKEN}"', 'pools = ["main"]']
    clients += ["[[clients]]", 'label = "other"', f'token = "{FOREIGN_TOKEN}"', 'pools = ["x"]']
    cfg = write_config(tmp_path, [f"127.0.0.1:{plain.port}"], *clients)
    text = cfg.read_text() + '[[pools]]\nname = "x"\nprovider = "generic"\nhosts = ["x.invalid"]\n'
    cfg.write_text(
        text + '[[pools.keys]]\nlabel = "xk"\nkey = "sk-x-pool-0000000000000000000009"\n'
    )
    m = start(cfg, listen_host="0.0.0.0", extra=("--set", "rotor_allow_remote=true"))
    proxy = [ns.host_ip, m.port]
    target = f"127.0.0.1:{plain.port}"

    def inner(token: str | None) -> str:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        return f"GET /v1/models HTTP/1.1\r\nHost: {target}\r\n{auth}Connection: close\r\n\r\n"

    results = probes(
        [
            {"proxy": proxy, "connect": target, "request": inner(None)},
            {"proxy": proxy, "connect": target, "request": inner("wrong-token-000000000")},
            {"proxy": proxy, "connect": target, "request": inner(FOREIGN_TOKEN)},
            {"proxy": proxy, "connect": target, "request": inner(TOKEN)},
        ],
        ns,
    )
    assert [(r["connect"], r["status"]) for r in results] == [
        (200, 403),
        (200, 403),
        (200, 403),
        (200, 200),
    ], results
    for r in results[:3]:
        assert json.loads(r["body"])["error"]["code"] == "client_not_allowed"
    (seen,) = plain.requests
    assert TOKEN not in json.dumps(seen.headers)


def test_loopback_clients_cannot_tunnel_to_the_proxy_either(tmp_path, start, ns, plain):
    """A loop through the proxy gains a loopback client nothing, but it is refused all the
    same, and every spelling is: a local 403 at the tunnel."""
    m = start(write_config(tmp_path, [f"127.0.0.1:{plain.port}"]), listen_host=None)
    inner = get(f"http://127.0.0.1:{plain.port}/v1/models", f"127.0.0.1:{plain.port}")
    targets = self_spellings(ns, m.port)
    results = probes(
        [{"proxy": ["127.0.0.1", m.port], "connect": t, "request": inner} for t in targets]
    )
    for t, r in zip(targets, results, strict=True):
        assert r["connect"] == 403, (t, r)
        assert json.loads(r["body"])["error"]["code"] == "destination_not_allowed", (t, r)
    assert plain.requests == []
