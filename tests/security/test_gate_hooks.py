"""The gate's hooks through mitmproxy's test helpers: what reaches the upstream with a key,
for flows shaped as mitmproxy hands them over (HTTP/2, absolute-form, a connection already
made, a TLS handshake about to start)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import connection, http
from mitmproxy.options import Options
from mitmproxy.proxy import context, server_hooks
from mitmproxy.proxy.layers import tls
from mitmproxy.test import taddons, tflow, tutils

from kmi_rotor import gatekeeper
from kmi_rotor.addon import META, Rotor
from kmi_rotor.config import Settings, from_dict
from kmi_rotor.gatekeeper import Gatekeeper, is_own_address, set_host_header
from kmi_rotor.hosting import StatusPage

KEY = "sk-gate-hooks-000000000000000000000001"


@pytest.fixture
def rotor(tmp_path: Path) -> Iterator[Rotor]:
    cfg = tmp_path / "rotor.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        '[[pools]]\nname = "p"\nprovider = "generic"\n'
        'hosts = ["llm.test", "http://plain.test", "https://tls.test", "127.0.0.1:9443"]\n'
        f'[[pools.keys]]\nlabel = "k"\nkey = "{KEY}"\n'
    )
    addon = Rotor()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rotor_config=str(cfg), listen_host="127.0.0.1")
        yield addon
        addon.done()


def make_flow(
    host: str = "llm.test",
    port: int = 443,
    scheme: str = "https",
    headers: tuple[tuple[str, str], ...] = (("host", "llm.test"),),
    authority: str = "",
    http_version: str = "HTTP/1.1",
    upstream: tuple[str | None, bool] = (None, False),
) -> http.HTTPFlow:
    h = http.Headers([(k.encode(), v.encode()) for k, v in headers])
    h["authorization"] = "Bearer client-own"
    h["content-length"] = "0"
    req = tutils.treq(
        host=host,
        port=port,
        scheme=scheme.encode(),
        method=b"GET",
        path=b"/v1/models",
        headers=h,
        content=b"",
        http_version=http_version.encode(),
        authority=authority.encode(),
    )
    f = tflow.tflow(req=req)
    f.response = None
    f.server_conn.sni, established = upstream
    f.server_conn.timestamp_tls_setup = 1.0 if established else None
    return f


async def send(addon: Rotor, f: http.HTTPFlow) -> http.HTTPFlow:
    await addon.requestheaders(f)
    await addon.request(f)
    return f


def refusal(f: http.HTTPFlow) -> tuple[int, str]:
    assert f.response is not None
    return f.response.status_code, json.loads(f.response.content or b"{}")["error"]["code"]


async def test_foreign_host_header_is_rewritten_to_the_target(rotor: Rotor) -> None:
    f = await send(rotor, make_flow(headers=(("host", "attacker.example"),)))
    assert f.response is None
    assert f.request.headers.get_all("host") == ["llm.test"]
    assert f.request.headers["authorization"] == f"Bearer {KEY}"
    assert f.metadata[META]["host_rewritten"] == ["attacker.example"]


async def test_duplicate_host_headers_become_one(rotor: Rotor) -> None:
    f = await send(rotor, make_flow(headers=(("host", "llm.test"), ("host", "attacker.example"))))
    assert f.request.headers.get_all("host") == ["llm.test"]


async def test_http2_authority_and_host_are_rewritten(rotor: Rotor) -> None:
    f = make_flow(
        headers=(("host", "attacker.example"),),
        authority="attacker.example:443",
        http_version="HTTP/2.0",
    )
    await send(rotor, f)
    assert f.response is None
    assert f.request.authority == "llm.test"
    assert f.request.headers.get_all("host") == ["llm.test"]


async def test_http2_without_host_header_gets_none_added(rotor: Rotor) -> None:
    f = make_flow(headers=(), authority="attacker.example", http_version="HTTP/2.0")
    await send(rotor, f)
    assert f.request.authority == "llm.test" and "host" not in f.request.headers


async def test_absolute_form_inside_a_tunnel_names_the_target(rotor: Rotor) -> None:
    """HTTP/1 `GET https://attacker.example/...` sent inside a tunnel to the pool host keeps
    its authority, which mitmproxy would send upstream as an absolute URL."""
    f = make_flow(authority="attacker.example")
    await send(rotor, f)
    assert f.request.authority == "llm.test"


async def test_connection_made_under_a_foreign_server_name_is_refused(rotor: Rotor) -> None:
    f = await send(rotor, make_flow(upstream=("attacker.example", True)))
    assert refusal(f) == (421, "misdirected_request")
    assert KEY not in repr(f.get_state())


async def test_connection_made_under_the_pool_name_is_used(rotor: Rotor) -> None:
    f = await send(rotor, make_flow(upstream=("LLM.test.", True)))
    assert f.response is None and f.request.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("host", "port", "status"),
    [
        ("llm.test", 80, 403),  # no scheme written: TLS only
        ("tls.test", 80, 403),
        ("plain.test", 80, None),  # written with http://
        ("127.0.0.1", 80, None),  # loopback (not a pool host: no key either way)
    ],
)
async def test_plain_http_only_where_allowed(rotor: Rotor, host, port, status) -> None:
    f = await send(rotor, make_flow(host=host, port=port, scheme="http", headers=(("host", host),)))
    if status is None:
        assert f.response is None
    else:
        assert refusal(f) == (403, "insecure_transport")
        assert KEY not in repr(f.get_state())


def tls_data(address: tuple[str, int], sni: str | None) -> tls.TlsData:
    client = connection.Client(
        peername=("127.0.0.1", 5555), sockname=("127.0.0.1", 8080), timestamp_start=1.0
    )
    client.sni = sni
    server = connection.Server(address=address)
    server.sni = sni
    ctx = context.Context(client, Options())
    ctx.server = server
    return tls.TlsData(server, ctx)


@pytest.mark.parametrize(
    ("address", "client_sni", "pinned"),
    [
        (("llm.test", 443), "attacker.example", "llm.test"),
        (("LLM.Test.", 443), None, "llm.test"),
        (("elsewhere.test", 443), "attacker.example", "attacker.example"),  # not a pool: as is
    ],
)
def test_upstream_server_name_of_a_pool_host_is_the_pool_host(
    rotor: Rotor, address, client_sni, pinned
) -> None:
    data = tls_data(address, client_sni)
    rotor.gatekeeper.tls_start_server(data)
    assert data.conn.sni == pinned


def hook_data(peer: str, address: tuple[str, int]) -> server_hooks.ServerConnectionHookData:
    client = connection.Client(peername=(peer, 5555), sockname=("0.0.0.0", 8080), timestamp_start=1)
    return server_hooks.ServerConnectionHookData(connection.Server(address=address), client)


@pytest.mark.parametrize(
    ("peer", "address", "refused"),
    [
        ("10.231.0.2", ("127.0.0.2", 6379), True),  # a remote client, a service of this machine
        ("10.231.0.2", ("2130706433", 6379), True),
        ("10.231.0.2", ("[::ffff:127.0.0.1]", 6379), True),
        ("10.231.0.2", ("localhost.", 6379), True),
        ("10.231.0.2", ("0.0.0.0", 6379), True),
        ("10.231.0.2", ("127.0.0.1", 9443), False),  # a pool host: the operator's choice
        ("10.231.0.2", ("llm.test", 443), True),  # unresolvable, so unchecked: refused
        ("10.231.0.2", ("192.0.2.1", 443), False),  # elsewhere (TEST-NET-1, never this machine)
        ("127.0.0.1", ("127.0.0.2", 6379), False),  # loopback clients may
        ("127.0.0.1", ("127.0.0.2", 8080), True),  # ... but never back into the proxy
    ],
)
async def test_server_connect_is_the_last_word(rotor: Rotor, peer, address, refused) -> None:
    data = hook_data(peer, address)
    rotor.gatekeeper.listen_ports = lambda flow=None: {8080}  # type: ignore[method-assign]
    await rotor.gatekeeper.server_connect(data)
    assert (data.server.error is not None) is refused, data.server.error
    if refused:
        assert data.server.error.startswith("kmi-rotor: the destination ")


@pytest.mark.parametrize(
    ("ip", "own"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("192.0.2.1", False)],
)
def test_is_own_address(ip: str, own: bool) -> None:
    assert is_own_address(ipaddress.ip_address(ip)) is own


@pytest.mark.parametrize(
    ("peer", "address", "refused"),
    [
        ("10.231.0.2", ("127.0.0.2", 6379), True),  # a remote client, a service of this machine
        ("10.231.0.2", ("[::ffff:127.0.0.1]", 6379), True),
        ("10.231.0.2", ("192.0.2.1", 80), False),  # elsewhere
        ("::ffff:10.231.0.2", ("127.0.0.2", 6379), True),
        ("127.0.0.1", ("127.0.0.2", 6379), False),  # loopback clients: server_connect decides
        ("::1", ("127.0.0.2", 6379), False),
        ("::ffff:127.0.0.1", ("127.0.0.2", 6379), False),
        ("", ("127.0.0.2", 6379), True),  # no address: not loopback
    ],
)
async def test_a_request_checks_the_destination_of_clients_not_on_loopback(
    rotor: Rotor, peer, address, refused
) -> None:
    """The gate asks the client's address once for both checks; a client not on loopback (with
    proxyauth, so that it may go elsewhere) is refused a destination on this machine."""
    host, port = address
    f = make_flow(host=host, port=port, scheme="http", headers=(("host", host),))
    f.client_conn.peername = (peer, 5555) if peer else None
    f.metadata["proxyauth"] = ("user", "pass")
    await send(rotor, f)
    if refused:
        assert refusal(f) == (403, "destination_not_allowed")
    else:
        assert f.response is None


def _settings(hosts: list[str]) -> Settings:
    raw = {
        "state_dir": "/tmp/kmi-rotor-gate-test-state",
        "pools": [
            {
                "name": "p",
                "provider": "generic",
                "hosts": hosts,
                "keys": [{"label": "k", "key": KEY}],
            },
        ],
    }
    return from_dict(raw, Path("/tmp/rotor.toml"), env={})


@pytest.mark.parametrize(
    ("hosts", "host", "port", "expected"),
    [
        (["http://plain.test"], "plain.test", 80, True),
        (["http://plain.test"], "PLAIN.test.", 80, True),
        (["https://plain.test"], "plain.test", 80, False),
        (["plain.test"], "plain.test", 80, False),
        (["http://plain.test:8080", "plain.test"], "plain.test", 8080, True),
        (["http://plain.test:8080", "plain.test"], "plain.test", 80, False),
        (["http://*.plain.test"], "a.plain.test", 80, True),
        (["*.plain.test", "http://a.plain.test"], "a.plain.test", 80, True),
    ],
)
def test_plain_http_is_remembered_as_the_pool_says(hosts, host, port, expected) -> None:
    s = _settings(hosts)
    gk = Gatekeeper(StatusPage(dict), lambda: s, lambda: None, lambda: 0.0)
    pool = gk._pool_of(host, port)
    assert pool is not None
    for _ in range(2):  # worked out, then remembered
        assert gk._plain_http_allowed(pool, host, port) is expected
        assert pool.plain_http_allowed(host, port) is expected


def test_plain_http_follows_a_new_configuration_and_a_pool_of_the_old_one() -> None:
    old, new = _settings(["http://plain.test"]), _settings(["https://plain.test"])
    current = old
    gk = Gatekeeper(StatusPage(dict), lambda: current, lambda: None, lambda: 0.0)
    old_pool = gk._pool_of("plain.test", 80)
    assert old_pool is not None and gk._plain_http_allowed(old_pool, "plain.test", 80)
    current = new
    new_pool = gk._pool_of("plain.test", 80)
    assert new_pool is not None and new_pool is not old_pool
    assert gk._plain_http_allowed(new_pool, "plain.test", 80) is False  # renewed
    assert gk._plain_http_allowed(old_pool, "plain.test", 80) is True  # its own answer
    current = None
    assert gk._pool_of("plain.test", 80) is None
    assert gk._plain_http_allowed(old_pool, "plain.test", 80) is True


@pytest.mark.parametrize(
    "fields",
    [
        (),
        ((b"Host", b"127.0.0.1:8080"),),
        ((b"accept", b"*/*"), (b"HOST", b"a.test"), (b"x", b"1"), (b"host", b"b.test")),
        ((b"authorization", b"Bearer x"),),
    ],
)
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/2.0"])
@pytest.mark.parametrize("value", ["llm.test", "127.0.0.1:9443", "[::1]:443"])
def test_set_host_header_is_mitmproxys_setter(fields, version, value) -> None:
    """Reverse mode's Host rewrite on the raw pairs gives what `req.host_header = v` gives."""
    expected = tutils.treq(headers=http.Headers(fields), http_version=version.encode())
    got = tutils.treq(headers=http.Headers(fields), http_version=version.encode())
    expected.host_header = value
    set_host_header(got, value)
    assert got.headers.fields == expected.headers.fields
    assert got.authority == expected.authority


def test_reverse_host_verdicts_are_remembered_per_configuration(monkeypatch) -> None:
    """A Host's verdict is worked out once per configuration and listening addresses, is the
    rule's own, and at most `_VERDICTS` are kept."""
    calls = []
    real = gatekeeper.routing.reverse_host_verdict

    def counted(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(gatekeeper.routing, "reverse_host_verdict", counted)
    current = _settings(["llm.test"])
    gk = Gatekeeper(StatusPage(dict), lambda: current, lambda: None, lambda: 0.0)
    local = ("127.0.0.1", 8080)
    cases = ["localhost:8080", "127.0.0.1:8080", "evil.test:8080", "localhost:9999", None]
    for _ in range(2):
        for named in cases:
            assert gk._host_verdict(named, "http", local, current) == real(
                named, "http", local, gk._listen_hosts, ()
            )
    assert calls == cases  # the second round remembered
    current = _settings(["other.test"])  # a new configuration: worked out again
    gk._host_verdict("evil.test:8080", "http", local, current)
    assert calls[-1] == "evil.test:8080" and len(calls) == len(cases) + 1
    for i in range(gatekeeper._VERDICTS + 10):  # any Host a client sends: bounded
        gk._host_verdict(f"h{i}.test:8080", "http", local, current)
    assert len(gk._verdicts) <= gatekeeper._VERDICTS
