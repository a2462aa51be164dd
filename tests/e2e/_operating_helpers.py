"""Helpers for the operating tests: configs, a steady client, the proxy's live status, the CLI."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from proctools import BIN, clean_env
from rotor_toml import pool, rotor_config

STATUS_PATH = "/_kmi-rotor/api/status"
CHAT_BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


@dataclass
class PoolSpec:
    """One `[[pools]]` table; `extra` holds further fields (usages_url, affinity_header...)."""

    name: str
    hosts: Sequence[str]
    keys: Mapping[str, str]
    provider: str = "generic"
    strategy: str = "round-robin"
    extra: Mapping[str, Any] = field(default_factory=dict)


def write_config(tmp_path: Path, pools: Sequence[PoolSpec], **tables: Mapping[str, Any]) -> Path:
    """A rotor.toml: state in `tmp_path/state`, top-level tables such as `health={...}`, pools."""
    specs = [
        pool(p.name, p.hosts, p.keys, provider=p.provider, strategy=p.strategy, **p.extra)
        for p in pools
    ]
    return rotor_config(tmp_path / "rotor.toml", tmp_path / "state", specs, **tables)


class Traffic:
    """One request after another through the proxy, from a thread, until stopped.

    Pacing keeps the 2-core machine responsive; `results` holds (end time, status) per request.
    """

    def __init__(
        self, base_url: str, path: str = "/v1/chat/completions", pause: float = 0.02, **client: Any
    ) -> None:
        self.url = base_url.rstrip("/") + path
        self.pause = pause
        self.client = httpx.Client(trust_env=False, timeout=30.0, **client)
        self.results: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.client.post(self.url, json=CHAT_BODY).status_code
            except httpx.HTTPError:
                status = 0
            self.results.append((time.time(), status))
            self._stop.wait(self.pause)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()

    def statuses(self, since: float = 0.0) -> list[int]:
        return [s for t, s in list(self.results) if t >= since]


def labels_by_secret(keys: Mapping[str, str]) -> dict[str, str]:
    return {secret: label for label, secret in keys.items()}


def served(
    provider: Any, keys: Mapping[str, str], since: float = 0.0, until: float = float("inf")
) -> list[str]:
    """Labels of the pool keys the provider saw on API requests that arrived in [since, until)."""
    names = labels_by_secret(keys)
    return [
        names.get(r.credential or "", "?")
        for r in provider.requests
        if since <= r.started < until and not r.path.endswith("/usages")
    ]


def live_status(
    url: str, proxy: str | None = None, verify: Any = True
) -> dict[str, dict[str, Any]]:
    """The proxy's own `/api/status`, as {label: key row}."""
    with httpx.Client(trust_env=False, proxy=proxy, verify=verify, timeout=10.0) as c:
        r = c.get(url)
    r.raise_for_status()
    return {k["label"]: k for p in r.json()["pools"] for k in p["keys"]}


def kmi_rotor(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The installed `kmi-rotor` command, with this machine's proxy settings removed."""
    return subprocess.run(
        [str(BIN / "kmi-rotor"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=check,
    )


def state_rows(config: Path) -> dict[str, dict[str, Any]]:
    """What `kmi-rotor status --json` reads from state.json, as {label: row}."""
    out = kmi_rotor("status", "--json", "--config", str(config))
    return {r["label"]: r for r in json.loads(out.stdout)["keys"]}


def state_written_at(state_dir: Path) -> float:
    """`updated_at` of state.json: every write by any process stamps it."""
    try:
        return float(json.loads((state_dir / "state.json").read_text())["updated_at"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0.0


__all__ = [
    "STATUS_PATH",
    "PoolSpec",
    "Traffic",
    "kmi_rotor",
    "live_status",
    "served",
    "state_rows",
    "state_written_at",
    "write_config",
]
