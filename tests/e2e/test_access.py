"""Who may spend the pool's keys, end to end: clients on loopback and in a network namespace of
the test's own, against a real mitmdump listening beyond loopback.

The fake provider listens on 127.0.0.1 only; mitmdump reaches it from this side.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest
from proctools import Mitmdump
from rotor_toml import pool, rotor_config

import fake_provider

from ._netns import Answer, Netns, curl, netns
from .conftest import KEYS

TOKENS = {
    "laptop": "kmirot-client-laptop-5f0e1d2c3b4a59687766",
    "elsewhere": "kmirot-client-else-0a1b2c3d4e5f60718293",
}
CHAT = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def ns() -> Iterator[Netns]:
    with netns() as created:
        yield created


@pytest.fixture
def bundle(tmp_path, mitm_confdir) -> Path:
    path = tmp_path / "bundle.pem"
    path.write_text(
        Path(certifi.where()).read_text() + (mitm_confdir / "mitmproxy-ca-cert.pem").read_text()
    )
    return path


def write_config(tmp_path: Path, provider: fake_provider.FakeProvider, clients: bool = False):
    """Pool `main` on the fake provider with KEYS; with `clients`, two client tokens, one of
    them limited to a second pool `other` that this proxy never reaches."""
    pools = [pool("main", [f"127.0.0.1:{provider.port}"], KEYS)]
    tables: dict[str, Any] = {}
    if clients:
        tables["clients"] = [
            {"label": "laptop", "token": TOKENS["laptop"]},
            {"label": "elsewhere", "token": TOKENS["elsewhere"], "pools": ["other"]},
        ]
        other = {"other-key": "sk-other-pool-000000000000000000000099"}
        pools.append(pool("other", ["other.invalid"], other))
    return rotor_config(tmp_path / "rotor.toml", tmp_path / "state", pools, **tables)


def via_proxy(
    proxy: str,
    provider: fake_provider.FakeProvider,
    bundle: Path,
    ns: Netns | None = None,
    path: str = "/v1/chat/completions",
) -> Answer:
    """A chat completion (or a GET of `path`) through the proxy in regular mode, by curl."""
    data = ["-H", "content-type: application/json", "-d", CHAT] if "chat" in path else []
    args = ["-x", proxy, "--cacert", str(bundle), "-H", "Authorization: Bearer client-own"]
    return curl([*args, *data, f"{provider.url}{path}"], ns)


def assert_refused(a: Answer) -> None:
    """A local 403, to the request or already to its tunnel (curl shows no CONNECT body)."""
    if a.connect == 403 and a.status == 0:
        return
    assert a.status == 403, a
    err = json.loads(a.body)["error"]
    assert err["code"] == "client_not_allowed" and err["message"].startswith("kmi-rotor: ")


def lines_with(m: Mitmdump, text: str) -> list[str]:
    return [line for line in m.process.output.splitlines() if text in line]


def test_explicit_outside_address_without_auth_refuses_everyone(
    tmp_path, provider, start, ns, bundle
):
    m = start(write_config(tmp_path, provider), listen_host="0.0.0.0")
    outside = f"http://{ns.host_ip}:{m.port}"
    answers = [
        via_proxy(outside, provider, bundle, ns),
        via_proxy(outside, provider, bundle, ns, path="/v1/models"),
        via_proxy(m.url, provider, bundle),  # loopback too: the operator must fix the setup
        via_proxy(m.url, provider, bundle, path="/v1/models"),
    ]
    for a in answers:
        assert_refused(a)
    page = curl(["-x", outside, "http://kmi-rotor.local/api/status"], ns)
    assert_refused(page)
    assert provider.requests == []
    fix = lines_with(m, "to fix it")
    assert len(fix) == 1, m.process.output
    assert "listening on 0.0.0.0 without client authentication" in fix[0]
    assert "--listen-host 127.0.0.1" in fix[0] and "rotor_allow_remote=true" in fix[0]
    assert len(lines_with(m, "every request for a pool key is refused")) == 1


def test_default_listen_host_serves_loopback_only(tmp_path, provider, start, ns, bundle):
    m = start(write_config(tmp_path, provider), listen_host=None)
    warn = lines_with(m, "listening on all interfaces")
    assert len(warn) == 1 and "use --listen-host 127.0.0.1" in warn[0], m.process.output
    local = via_proxy(m.url, provider, bundle)
    assert local.status == 200, local
    assert json.loads(local.body)["choices"]
    remote = via_proxy(f"http://{ns.host_ip}:{m.port}", provider, bundle, ns)
    assert_refused(remote)
    (seen,) = provider.requests
    assert seen.credential == KEYS["alpha"]
    assert len(lines_with(m, "listening on all interfaces")) == 1  # said once, not per request


def test_proxyauth_lets_authenticated_remote_clients_in(tmp_path, provider, start, ns, bundle):
    m = start(
        write_config(tmp_path, provider),
        listen_host="0.0.0.0",
        extra=("--set", "rotor_allow_remote=true", "--set", "proxyauth=user:pass"),
    )
    assert lines_with(m, "every request for a pool key is refused") == [], m.process.output
    anonymous = via_proxy(f"http://{ns.host_ip}:{m.port}", provider, bundle, ns)
    assert anonymous.connect == 407, anonymous
    assert provider.requests == []
    signed = via_proxy(f"http://user:pass@{ns.host_ip}:{m.port}", provider, bundle, ns)
    assert signed.status == 200, signed
    (seen,) = provider.requests
    assert seen.credential in KEYS.values()
    assert "client-own" not in json.dumps(seen.headers)


def reverse_call(m: Mitmdump, ns: Netns | None, headers: list[str], path: str) -> Answer:
    base = f"http://{ns.host_ip}:{m.port}" if ns else m.url
    data = ["-H", "content-type: application/json", "-d", CHAT] if "chat" in path else []
    hdrs = [x for h in headers for x in ("-H", h)]
    return curl([*hdrs, *data, base + path], ns)


def test_reverse_mode_client_tokens(tmp_path, provider, start, ns):
    m = start(
        write_config(tmp_path, provider, clients=True),
        listen_host="0.0.0.0",
        mode=f"reverse:{provider.url}",
        extra=("--set", "rotor_allow_remote=true"),
    )
    chat = "/v1/chat/completions"
    ok = reverse_call(m, ns, [f"Authorization: Bearer {TOKENS['laptop']}"], chat)
    assert ok.status == 200, ok
    ok_x = reverse_call(m, ns, [f"x-api-key: {TOKENS['laptop']}"], chat)
    assert ok_x.status == 200, ok_x
    local = reverse_call(m, None, [], chat)  # loopback needs no token
    assert local.status == 200, local
    seen = provider.requests
    assert [r.credential_source for r in seen] == ["authorization", "x-api-key", "authorization"]
    assert all(r.credential in KEYS.values() for r in seen)
    for token in TOKENS.values():
        assert all(token not in json.dumps([r.headers, r.body]) for r in seen)

    for headers in (
        ["Authorization: Bearer wrong-token-0000"],
        [f"Authorization: Bearer {TOKENS['elsewhere']}"],  # its pools do not include main
        [],
    ):
        assert_refused(reverse_call(m, ns, headers, chat))
    assert_refused(reverse_call(m, ns, [], "/_kmi-rotor/api/status"))
    page = reverse_call(
        m, ns, [f"Authorization: Bearer {TOKENS['laptop']}"], "/_kmi-rotor/api/status"
    )
    assert page.status == 200 and "pools" in json.loads(page.body), page
    assert all(t not in page.body for t in TOKENS.values())
    assert len(provider.requests) == 3


def test_reverse_mode_with_client_tokens_starts_without_a_false_alarm(tmp_path, provider, start):
    """Tokens and rotor_allow_remote make a remote setup valid: no start-up line may say that
    every request will be refused."""
    m = start(
        write_config(tmp_path, provider, clients=True),
        listen_host="0.0.0.0",
        mode=f"reverse:{provider.url}",
        extra=("--set", "rotor_allow_remote=true"),
    )
    assert reverse_call(m, None, [], "/v1/models").status == 200
    assert lines_with(m, "refused") == [], m.process.output
