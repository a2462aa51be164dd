"""A pool key goes only to its pool's host, over TLS: attacks through a real mitmdump on an
upstream that answers every name it is asked for and logs the TLS server name (SNI), the Host
and the credential of each request, as a CDN routing on them would.

The pool host is `localhost:<port>`; `attacker.test` is the name a client would like the key
to reach on the same address (the same CDN).
"""

from __future__ import annotations

import json
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import pytest
from e2e._netns import netns

import fake_provider

from ._probe import get, probe
from .conftest import KEYS, leaked, write_config

pytestmark = pytest.mark.e2e


def assert_only_pool_host_saw_keys(provider: fake_provider.FakeProvider, host: str) -> None:
    """Every request that carried a pool key came with the pool's SNI and Host."""
    for r in provider.requests:
        if r.credential in KEYS.values():
            assert (r.sni, r.host) == ("localhost", host), r


def client_context(mitm_confdir) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(mitm_confdir / "mitmproxy-ca-cert.pem"))
    ctx.check_hostname = False  # the client names attacker.test on purpose
    return ctx


def tunnel_tls(proxy_port: int, target: str, sni: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy_port), timeout=20)
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(4096)
    assert head.split(b" ")[1] == b"200", head
    return ctx.wrap_socket(raw, server_hostname=sni)


def h1_over(sock: ssl.SSLSocket, request: str) -> tuple[int, str]:
    sock.sendall(request.encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode("utf-8", "replace")


def h2_over(sock: ssl.SSLSocket, headers: list[tuple[str, str]]) -> tuple[int, str]:
    config = h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers, end_stream=True)
    sock.sendall(conn.data_to_send())
    status, body = 0, b""
    while True:
        data = sock.recv(65536)
        if not data:
            return status, body.decode("utf-8", "replace")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(
                event,
                h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated,
            ):
                return status, body.decode("utf-8", "replace")
        sock.sendall(conn.data_to_send())


@pytest.mark.parametrize(
    ("sni", "host"),
    [
        ("attacker.test", "attacker.test"),  # the attack as reported
        ("attacker.test", "localhost:{port}"),  # the CDN routes on SNI alone
        ("localhost", "attacker.test"),  # ... or on Host alone
        ("ATTACKER.TEST.", "Attacker.Test.:443"),
        ("pool.test", "localhost:{port}"),
    ],
)
def test_tunnel_with_a_foreign_server_name_or_host(
    tmp_path, hostile, start, mitm_confdir, sni, host
):
    port = hostile.port
    m = start(write_config(tmp_path, [f"localhost:{port}"]), listen_host="127.0.0.1")
    sock = tunnel_tls(m.port, f"localhost:{port}", sni, client_context(mitm_confdir))
    with sock:
        status, body = h1_over(sock, get("/v1/models", host.format(port=port)))
    assert status == 200, body
    (seen,) = hostile.requests
    assert seen.credential in KEYS.values()
    assert_only_pool_host_saw_keys(hostile, f"localhost:{port}")


def test_tunnel_opened_lazily_gets_the_pool_server_name_too(tmp_path, hostile, start, mitm_confdir):
    """With connection_strategy=lazy the upstream connection is made for the first request,
    on another path through mitmproxy than the eager one."""
    port = hostile.port
    m = start(
        write_config(tmp_path, [f"localhost:{port}"]),
        listen_host="127.0.0.1",
        extra=("--set", "connection_strategy=lazy"),
    )
    sock = tunnel_tls(m.port, f"localhost:{port}", "attacker.test", client_context(mitm_confdir))
    with sock:
        status, body = h1_over(sock, get("/v1/models", "attacker.test"))
    assert status == 200, body
    assert len(leaked(hostile)) == 1
    assert_only_pool_host_saw_keys(hostile, f"localhost:{port}")


def test_absolute_form_inside_a_tunnel(tmp_path, hostile, start, mitm_confdir):
    port = hostile.port
    m = start(write_config(tmp_path, [f"localhost:{port}"]), listen_host="127.0.0.1")
    sock = tunnel_tls(m.port, f"localhost:{port}", "attacker.test", client_context(mitm_confdir))
    with sock:
        status, body = h1_over(sock, get("https://attacker.test/v1/models", "attacker.test"))
    assert status == 200, body
    assert_only_pool_host_saw_keys(hostile, f"localhost:{port}")
    assert len(leaked(hostile)) == 1


@pytest.mark.parametrize(
    "extra",
    [
        [],  # :authority alone names the attacker
        [("host", "attacker.test")],  # a Host header besides it
    ],
)
def test_http2_authority_names_another_host(tmp_path, hostile, start, mitm_confdir, extra):
    port = hostile.port
    # lazy: no upstream connection before the client's handshake, so mitmproxy offers the
    # client HTTP/2 (the upstream speaks HTTP/1.1), and the upstream server name is set later
    m = start(
        write_config(tmp_path, [f"localhost:{port}"]),
        listen_host="127.0.0.1",
        extra=("--set", "connection_strategy=lazy"),
    )
    ctx = client_context(mitm_confdir)
    ctx.set_alpn_protocols(["h2"])
    sock = tunnel_tls(m.port, f"localhost:{port}", "attacker.test", ctx)
    assert sock.selected_alpn_protocol() == "h2"
    headers = [
        (":method", "GET"),
        (":authority", "attacker.test"),
        (":scheme", "https"),
        (":path", "/v1/models"),
        ("authorization", "Bearer client-own"),
        *extra,
    ]
    with sock:
        status, body = h2_over(sock, headers)
    assert_only_pool_host_saw_keys(hostile, f"localhost:{port}")
    if not extra:
        assert status == 200, body
        assert len(leaked(hostile)) == 1


def test_plain_http_absolute_url_with_a_foreign_host(tmp_path, plain, start):
    port = plain.port
    m = start(write_config(tmp_path, [f"localhost:{port}"]), listen_host="127.0.0.1")
    a = probe(
        {
            "proxy": ["127.0.0.1", m.port],
            "request": get(f"http://localhost:{port}/v1/models", "attacker.test"),
        }
    )
    assert a["status"] == 200, a
    (seen,) = plain.requests
    assert seen.credential in KEYS.values()
    assert seen.host == f"localhost:{port}"


@pytest.fixture(scope="module")
def ns():
    with netns() as created:
        yield created


@pytest.mark.parametrize(
    ("written", "served"), [("{ip}:{port}", False), ("http://{ip}:{port}", True)]
)
def test_plain_http_to_a_host_off_loopback(tmp_path, start, ns, written, served):
    """The upstream listens on this machine's side of a veth pair: an address that is not
    loopback. A key goes there in clear only when the config says `http://`."""
    fp = fake_provider.FakeProvider(
        {k: fake_provider.KeyBehaviour() for k in KEYS.values()}, host=ns.host_ip
    )
    with fake_provider.run_in_thread(fp) as upstream:
        pattern = written.format(ip=ns.host_ip, port=upstream.port)
        m = start(write_config(tmp_path, [pattern]), listen_host="127.0.0.1")
        url = f"http://{ns.host_ip}:{upstream.port}/v1/models"
        a = probe(
            {"proxy": ["127.0.0.1", m.port], "request": get(url, f"{ns.host_ip}:{upstream.port}")}
        )
        if served:
            assert a["status"] == 200, a
            assert len(leaked(upstream)) == 1
        else:
            assert a["status"] == 403, a
            err = json.loads(a["body"])["error"]
            assert err["code"] == "insecure_transport" and "only over TLS" in err["message"]
            assert upstream.requests == []


def test_status_page_only_on_hosts_that_name_the_proxy(tmp_path, hostile, start):
    """A page the user's browser loads from another site through the proxy cannot read the
    status page under that site's name."""
    m = start(write_config(tmp_path, [f"localhost:{hostile.port}"]), listen_host="127.0.0.1")
    proxy = ["127.0.0.1", m.port]
    refused = [
        get("http://attacker.test/_kmi-rotor/api/status", "attacker.test"),
        get("http://127.0.0.1:9/_kmi-rotor/api/status", "attacker.test"),
        # DNS rebinding on the regular port: a direct request naming the page's own site
        get("/_kmi-rotor/api/status", f"attacker.test:{m.port}"),
    ]
    for raw in refused:
        a = probe({"proxy": proxy, "request": raw})
        assert a["status"] == 403, a
        assert json.loads(a["body"])["error"]["code"] == "host_not_allowed"
    for raw in (
        get("http://kmi-rotor.local/api/status", "kmi-rotor.local"),
        get("http://localhost:9/_kmi-rotor/api/status", "localhost:9"),
    ):
        a = probe({"proxy": proxy, "request": raw})
        assert a["status"] == 200 and "pools" in json.loads(a["body"]), a


# -- reverse mode --------------------------------------------------------------------------------


def reverse(m, host: str, path: str = "/v1/models") -> dict:
    return probe({"proxy": ["127.0.0.1", m.port], "request": get(path, host)})


def test_reverse_mode_refuses_hosts_that_do_not_name_it(tmp_path, hostile, start):
    """DNS rebinding: a page from attacker.test, its name now resolving to 127.0.0.1, sends
    `Host: attacker.test:<proxy port>`; it gets neither a key nor the status page."""
    cfg = write_config(tmp_path, [f"localhost:{hostile.port}"], 'allowed_hosts = ["rotor.lan"]')
    m = start(cfg, listen_host="127.0.0.1", mode=f"reverse:https://localhost:{hostile.port}")
    for host in (f"attacker.test:{m.port}", "attacker.test", f"localhost.attacker.test:{m.port}"):
        for path in ("/v1/models", "/_kmi-rotor/api/status"):
            a = reverse(m, host, path)
            assert a["status"] == 403, (host, path, a)
            assert json.loads(a["body"])["error"]["code"] == "host_not_allowed"
    assert hostile.requests == []
    for host in (f"localhost:{m.port}", f"127.0.0.1:{m.port}", f"rotor.lan:{m.port}"):
        a = reverse(m, host)
        assert a["status"] == 200, (host, a)
    assert len(leaked(hostile)) == 3
    assert_only_pool_host_saw_keys(hostile, f"localhost:{hostile.port}")
    assert reverse(m, f"localhost:{m.port}", "/_kmi-rotor/api/status")["status"] == 200


def test_reverse_mode_with_keep_host_header_still_sends_the_pool_host(tmp_path, hostile, start):
    """With mitmproxy's keep_host_header the client's Host would go upstream with the key."""
    cfg = write_config(tmp_path, [f"localhost:{hostile.port}"], 'allowed_hosts = ["rotor.lan"]')
    m = start(
        cfg,
        listen_host="127.0.0.1",
        mode=f"reverse:https://localhost:{hostile.port}",
        extra=("--set", "keep_host_header=true"),
    )
    a = reverse(m, f"rotor.lan:{m.port}")
    assert a["status"] == 200, a
    assert_only_pool_host_saw_keys(hostile, f"localhost:{hostile.port}")
