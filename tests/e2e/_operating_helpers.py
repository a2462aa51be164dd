"""Helpers for the operating tests: configs, a steady client, the proxy's live status, the CLI."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from proctools import BIN, clean_env

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


def toml_value(value: Any) -> str:
    """A TOML literal for the few types the configs use (JSON strings are TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)


def write_config(tmp_path: Path, pools: Sequence[PoolSpec], **tables: Mapping[str, Any]) -> Path:
    """A rotor.toml: state in `tmp_path/state`, top-level tables such as `health={...}`, pools."""
    lines = [f"state_dir = {toml_value(str(tmp_path / 'state'))}"]
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for p in pools:
        lines += [
            "[[pools]]",
            f"name = {toml_value(p.name)}",
            f"provider = {toml_value(p.provider)}",
        ]
        lines += [f"hosts = {toml_value(list(p.hosts))}", f"strategy = {toml_value(p.strategy)}"]
        lines += [f"{k} = {toml_value(v)}" for k, v in p.extra.items()]
        for label, key in p.keys.items():
            lines += ["[[pools.keys]]", f"label = {toml_value(label)}", f"key = {toml_value(key)}"]
    path = tmp_path / "rotor.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_until[T](probe: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """The first truthy result of `probe`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {result!r})")
        time.sleep(interval)


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
    "wait_until",
    "write_config",
]
