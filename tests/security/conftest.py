"""Fixtures of the attack tests: the e2e suite's CA and mitmproxy confdir, upstreams that log
what reaches them, and mitmdump processes listening where each test says."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e._netns import Netns
from e2e.conftest import KEYS, mitm_confdir, start, upstream_ca

import fake_provider

from . import _probe

__all__ = ["KEYS", "mitm_confdir", "start", "upstream_ca"]

PROBE = Path(_probe.__file__)


def behaviours() -> dict[str, fake_provider.KeyBehaviour]:
    return {k: fake_provider.KeyBehaviour() for k in KEYS.values()}


@pytest.fixture
def hostile(upstream_ca) -> Iterator[fake_provider.FakeProvider]:
    """A TLS upstream with one certificate for several names (localhost, attacker.test,
    pool.test): it answers whatever name a handshake asks for, and logs SNI, Host and the
    credential of every request, as a CDN that routes on them would see them."""
    ca, _ = upstream_ca
    fp = fake_provider.FakeProvider(
        behaviours(), tls=ca, tls_hostnames=("attacker.test", "pool.test")
    )
    with fake_provider.run_in_thread(fp) as running:
        yield running


@pytest.fixture
def plain() -> Iterator[fake_provider.FakeProvider]:
    """A plain-HTTP upstream on 127.0.0.1 that logs Host and credential."""
    with fake_provider.run_in_thread(fake_provider.FakeProvider(behaviours())) as running:
        yield running


def write_config(tmp_path: Path, hosts: list[str], *lines: str) -> Path:
    """One pool `main` on `hosts` holding KEYS; `lines` go at the top (top-level fields and
    [[clients]] tables)."""
    body = [f'state_dir = "{tmp_path / "state"}"', *lines, "[[pools]]", 'name = "main"']
    body += ['provider = "generic"', f"hosts = {json.dumps(hosts)}"]
    for label, key in KEYS.items():
        body += ["[[pools.keys]]", f'label = "{label}"', f'key = "{key}"']
    path = tmp_path / "rotor.toml"
    path.write_text("\n".join(body) + "\n")
    return path


def probes(items: list[dict[str, Any]], ns: Netns | None = None) -> list[dict[str, Any]]:
    """Run hostile probes from this process (loopback) or from inside `ns` (a remote client)."""
    if ns is None:
        return [_probe.probe(p) for p in items]
    argv = ns.argv([sys.executable, str(PROBE), json.dumps(items)])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60 + 20 * len(items))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def leaked(provider: fake_provider.FakeProvider) -> list[str]:
    """Every pool key that reached `provider`."""
    return [r.credential for r in provider.requests if r.credential in KEYS.values()]
