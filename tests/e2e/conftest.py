"""Fixtures for end-to-end tests: a TLS fake provider and real mitmdump processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from proctools import MITMDUMP, ROOT, Mitmdump, clean_env, spawn, start_mitmdump
from rotor_toml import pool, rotor_config

import fake_provider

from ._netns import start_proxy

KEYS = {
    "alpha": "sk-alpha-e2e-0000000000000000000000a1",
    "beta": "sk-beta-e2e-00000000000000000000000b2",
    "gamma": "sk-gamma-e2e-0000000000000000000000c3",
}


@pytest.fixture(scope="session")
def upstream_ca(tmp_path_factory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("upstream-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


@pytest.fixture(scope="session")
def mitm_confdir(tmp_path_factory) -> Path:
    """One mitmproxy CA for the whole run (generating it costs a second per process)."""
    confdir = tmp_path_factory.mktemp("mitm-conf")
    p = spawn(
        [MITMDUMP, "--set", f"confdir={confdir}", "--listen-host", "127.0.0.1", "-p", "0"],
        clean_env(),
        confdir / "gen.log",
    )
    p.wait_for("listening at")
    p.stop()
    assert (confdir / "mitmproxy-ca-cert.pem").exists()
    return confdir


@pytest.fixture
def provider(upstream_ca) -> Iterator[fake_provider.FakeProvider]:
    ca, _ = upstream_ca
    fp = fake_provider.FakeProvider(
        {k: fake_provider.KeyBehaviour() for k in KEYS.values()}, tls=ca, event_delay=0.01
    )
    with fake_provider.run_in_thread(fp) as running:
        yield running


def write_config(tmp_path: Path, hosts: list[str], provider: str = "generic", **extra: Any) -> Path:
    """Pool `main` of KEYS on `hosts`; `extra` are further fields of the pool."""
    main = pool("main", hosts, KEYS, provider=provider, **extra)
    return rotor_config(tmp_path / "rotor.toml", tmp_path / "state", [main])


@pytest.fixture
def proxy_factory(tmp_path, mitm_confdir, upstream_ca) -> Iterator:
    """Start mitmdump processes that trust the fake provider's CA; all stopped at teardown."""
    started: list[Mitmdump] = []
    _, ca_path = upstream_ca

    def start(config: Path, mode: str = "regular", extra: tuple[str, ...] = ()) -> Mitmdump:
        m = start_mitmdump(
            config,
            mitm_confdir,
            tmp_path / f"mitmdump-{len(started)}.log",
            mode=mode,
            extra=("--set", f"ssl_verify_upstream_trusted_ca={ca_path}", *extra),
        )
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


__all__ = ["KEYS", "ROOT", "write_config"]


Start = Callable[..., Mitmdump]
"""Starts mitmdump with the addon on the listen host given (None: mitmproxy's default)."""


@pytest.fixture
def start(tmp_path, mitm_confdir, upstream_ca) -> Iterator[Start]:
    """mitmdump with kmi-rotor on the listen host given (None: mitmproxy's default), trusting
    the fake provider's CA; all stopped at teardown."""
    started: list[Mitmdump] = []
    _, ca_path = upstream_ca

    def run(config: Path, *, listen_host: str | None, mode: str = "regular", extra=()) -> Mitmdump:
        m = start_proxy(
            config,
            mitm_confdir,
            ca_path,
            tmp_path / f"mitmdump-{len(started)}.log",
            listen_host=listen_host,
            mode=mode,
            extra=extra,
        )
        started.append(m)
        return m

    yield run
    for m in started:
        m.stop()
