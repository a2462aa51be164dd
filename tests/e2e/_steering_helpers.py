"""Helpers for the steering tests: fake providers with per-key behaviours, configs, status."""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import trustme
from proctools import BIN, clean_env
from rotor_toml import pool, rotor_config

import fake_provider
from fake_provider import KeyBehaviour

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
MESSAGES = {
    "model": "fake-model",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "hello"}],
}


def secret(label: str) -> str:
    """A distinct, realistic-looking key for a label."""
    return f"sk-steer-{label}-" + "0" * 24


@dataclass(frozen=True)
class PoolKey:
    label: str
    behaviour: KeyBehaviour = field(default_factory=KeyBehaviour)
    weight: float = 1.0

    @property
    def key(self) -> str:
        return secret(self.label)


@contextlib.contextmanager
def fake(
    ca: trustme.CA, keys: Sequence[PoolKey], time_scale: float = 1.0
) -> Iterator[fake_provider.FakeProvider]:
    """A TLS fake provider serving `keys` (each with its behaviour), on 127.0.0.1."""
    provider = fake_provider.FakeProvider(
        {k.key: k.behaviour for k in keys}, tls=ca, event_delay=0.01, time_scale=time_scale
    )
    with fake_provider.run_in_thread(provider) as running:
        yield running


def write_config(
    path: Path,
    port: int,
    keys: Sequence[PoolKey],
    *,
    strategy: str = "round-robin",
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    host: str = "127.0.0.1",
) -> Path:
    """One generic pool on host:port with `keys`; `sections` adds top-level tables
    (`{"failover": {"max_attempts": 1}}`)."""
    main = pool("main", [f"{host}:{port}"], {k.label: k.key for k in keys}, strategy=strategy)
    for table, k in zip(main["keys"], keys, strict=True):
        if k.weight != 1.0:
            table["weight"] = k.weight
    state = path.parent / (path.stem + "-state")
    return rotor_config(path, state, [main], **(sections or {}))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kmi-rotor"), *args],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
        timeout=30,
    )


def cli_status(config: Path) -> dict[str, dict[str, Any]]:
    """`kmi-rotor status --json` by key label."""
    out = cli("status", "--json", "--config", str(config))
    return {r["label"]: r for r in json.loads(out.stdout)["keys"]}


def live_status(proxy_url: str) -> dict[str, dict[str, Any]]:
    """The running proxy's `/_kmi-rotor/api/status`, by key label."""
    r = httpx.get(f"{proxy_url}/_kmi-rotor/api/status", timeout=10)
    r.raise_for_status()
    return {k["label"]: k for p in r.json()["pools"] for k in p["keys"]}


def direct(provider: fake_provider.FakeProvider, ca_path: Path) -> httpx.Client:
    """A client straight to the fake provider (another user of the same keys)."""
    ctx = ssl.create_default_context(cafile=str(ca_path))
    return httpx.Client(base_url=provider.url, verify=ctx, timeout=10)


def spend(client: httpx.Client, key: str, n: int) -> float:
    """Use `n` requests of `key`'s budget directly; returns when the first was sent."""
    first = time.time()
    for _ in range(n):
        r = client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
        )
        assert r.status_code == 200, r.text
    return first


def served_by(provider: fake_provider.FakeProvider) -> list[tuple[str | None, int]]:
    """(key, status) of every request the provider saw, in arrival order."""
    return [(r.credential, r.status) for r in provider.requests]


# -- rate-limit headers as each dialect sends them (read independently of the product) -----------

_GO = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_GO_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def go_seconds(text: str) -> float:
    return sum(float(n) * _GO_UNIT[u] for n, u in _GO.findall(text))


def reported(
    dialect: str, headers: Mapping[str, str], sent_at: float
) -> tuple[float, float] | None:
    """(remaining, reset epoch) a response reports for requests; relative resets are counted
    from when the request was sent, the earliest the provider can have meant."""
    h = {k.lower(): v for k, v in headers.items()}
    if dialect == "openai" and "x-ratelimit-remaining-requests" in h:
        reset = sent_at + go_seconds(h["x-ratelimit-reset-requests"])
        return float(h["x-ratelimit-remaining-requests"]), reset
    if dialect == "anthropic" and "anthropic-ratelimit-requests-remaining" in h:
        at = datetime.fromisoformat(h["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
        return float(h["anthropic-ratelimit-requests-remaining"]), at.timestamp()
    if dialect == "xratelimit" and "x-ratelimit-remaining" in h:
        return float(h["x-ratelimit-remaining"]), int(h["x-ratelimit-reset"]) / 1000
    if dialect == "ietf" and "ratelimit" in h:
        params = dict(p.split("=", 1) for p in h["ratelimit"].split(";")[1:])
        return float(params["r"]), sent_at + float(params["t"])
    return None
