"""Helpers for the crash-safety test and the soak script: a seeded mixed load that follows a
restarting proxy, faults injected into the fake provider, and readers for the state folder.
Importable from tests (as a package module) and from scripts (by path)."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
from proctools import ROOT, clean_env, wait_until
from rotor_toml import pool, rotor_config

import fake_provider
from fake_provider import KeyBehaviour
from kmi_rotor.core.state import StateDoc

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}
STATE_FILE = "state.json"


def secret(label: str) -> str:
    """A distinct, realistic-looking key for a label."""
    return f"sk-crash-{label}-" + "0" * 24


def write_config(
    path: Path,
    host: str,
    state_dir: Path,
    labels: Sequence[str],
    *,
    limits: Mapping[str, float] | None = None,
    health: Mapping[str, float] | None = None,
) -> Path:
    """A rotor.toml with one round-robin pool `main` on `host`, keys `secret(label)`, and the
    given `[limits]` and `[health]` tables."""
    main = pool("main", [host], {label: secret(label) for label in labels})
    return rotor_config(path, state_dir, [main], limits=limits or {}, health=health or {})


# -- load --------------------------------------------------------------------------------------


class Target:
    """Where the load goes: the URL of the live proxy, or None while there is none."""

    def __init__(self) -> None:
        self._url: str | None = None
        self._cond = threading.Condition()

    def set(self, url: str | None) -> None:
        with self._cond:
            self._url = url
            self._cond.notify_all()

    def wait(self, timeout: float) -> str | None:
        with self._cond:
            self._cond.wait_for(lambda: self._url is not None, timeout)
            return self._url


@dataclass(frozen=True)
class Mix:
    """Relative weights of the request kinds each client picks from (seeded), and how long a
    client honours a 429's retry-after before its next request (0: it does not)."""

    chat: float = 5.0
    stream: float = 3.0
    abandon: float = 0.0  # a stream the client walks away from after the first chunk
    events: tuple[int, int] = (2, 6)
    delay_ms: tuple[int, int] = (5, 25)
    patience: float = 0.0  # cap, in seconds, of the pause after a 429


def _pause(r: httpx.Response, mix: Mix) -> float:
    """Seconds to wait after `r`, as an SDK would: its retry-after on a 429, capped."""
    if r.status_code != 429 or mix.patience <= 0:
        return 0.0
    try:
        if "retry-after-ms" in r.headers:
            return min(float(r.headers["retry-after-ms"]) / 1000, mix.patience)
        return min(float(r.headers.get("retry-after", "0")), mix.patience)
    except ValueError:
        return mix.patience


def _chat(c: httpx.Client, url: str, rng: random.Random, mix: Mix) -> tuple[str, float]:
    r = c.post(url + "/v1/chat/completions", json=CHAT)
    return f"chat:{r.status_code}", _pause(r, mix)


def _stream(
    c: httpx.Client, url: str, rng: random.Random, mix: Mix, abandon: bool
) -> tuple[str, float]:
    headers = {
        "x-fake-events": str(rng.randint(*mix.events)),
        "x-fake-delay-ms": str(rng.randint(*mix.delay_ms)),
    }
    body = {**CHAT, "stream": True}
    with c.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            return f"stream:{r.status_code}", _pause(r, mix)
        done = False
        try:
            for line in r.iter_lines():
                if abandon:
                    return "stream:abandoned", 0.0  # leaving closes the connection mid-stream
                done = done or line.strip() == "data: [DONE]"
        except httpx.RemoteProtocolError:  # the body ended without its last chunk
            return "stream:cut", 0.0
        return ("stream:200" if done else "stream:cut"), 0.0


class Load:
    """`threads` clients sending a seeded mix of requests to wherever `target` points, until
    `stop()`. Connection errors (a killed proxy) are counted, never raised."""

    def __init__(
        self, target: Target, threads: int, seed: int, mix: Mix = Mix(), timeout: float = 10.0
    ) -> None:
        self.target, self.mix, self.timeout = target, mix, timeout
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(seed * 1000 + i,), daemon=True)
            for i in range(threads)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Counter[str]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        return self.outcomes

    def _run(self, seed: int) -> None:
        rng, mix = random.Random(seed), self.mix
        kinds, weights = ("chat", "stream", "abandon"), (mix.chat, mix.stream, mix.abandon)
        with httpx.Client(trust_env=False, timeout=self.timeout) as c:
            while not self._stop.is_set():
                url = self.target.wait(0.1)
                if url is None:
                    continue
                kind = rng.choices(kinds, weights)[0]
                pause = 0.0
                try:
                    if kind == "chat":
                        outcome, pause = _chat(c, url, rng, mix)
                    else:
                        outcome, pause = _stream(c, url, rng, mix, abandon=kind == "abandon")
                except httpx.HTTPError as e:
                    outcome = f"{kind}:{type(e).__name__}"
                with self._lock:
                    self.outcomes[outcome] += 1
                if pause:
                    self._stop.wait(pause)


class Faults:
    """Every `period` seconds, queue one failure status on a random key of the provider, on top
    of that key's base behaviour (the provider answers it to the key's next request)."""

    def __init__(
        self,
        provider: fake_provider.FakeProvider,
        base: Mapping[str, KeyBehaviour],
        statuses: Sequence[int],
        seed: int,
        period: float = 0.05,
    ) -> None:
        self.provider, self.base, self.statuses, self.period = provider, base, statuses, period
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Faults:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        keys = sorted(self.base)
        while not self._stop.wait(self.period):
            key = self._rng.choice(keys)
            status = self._rng.choice(self.statuses)
            self.provider.set_keys({key: dataclasses.replace(self.base[key], fail_next=[status])})


# -- what the provider saw, what the state says ---------------------------------------------------


def provider_counts(
    records: Iterable[fake_provider.RecordedRequest], labels: Mapping[str, str]
) -> Counter[str]:
    """Requests per key label (`labels` maps each secret to its label)."""
    return Counter(labels.get(r.credential or "", "?") for r in records)


def quiet_requests(
    provider: fake_provider.FakeProvider, timeout: float = 10.0
) -> list[fake_provider.RecordedRequest]:
    """The provider's log once nothing is in flight and the count stopped moving (call after
    the proxy died: its last requests may still be arriving)."""
    last = -1

    def settled() -> bool:
        nonlocal last
        stats = provider.stats()
        done = stats["inflight"] == 0 and stats["requests"] == last
        last = stats["requests"]
        return done

    wait_until(settled, timeout, "provider quiet")
    return provider.requests


def read_state(state_dir: Path) -> StateDoc | None:
    """The state document, validated (raises on a torn or invalid file); None when absent."""
    path = state_dir / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return StateDoc.model_validate(json.loads(raw))


def requests_by_label(doc: StateDoc | None) -> Counter[str]:
    return Counter({r.label: r.requests for r in (doc.keys.values() if doc else ())})


@dataclass
class Folder:
    """The state folder sorted by kind of file."""

    corrupt: list[str] = field(default_factory=list)
    temps: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


def state_folder(state_dir: Path) -> Folder:
    out = Folder()
    for p in sorted(state_dir.iterdir()) if state_dir.exists() else ():
        name = p.name
        if name.startswith(STATE_FILE + "."):
            bucket = out.other if name == STATE_FILE + ".lock" else out.corrupt
        elif name.startswith(".state.") and name.endswith(".tmp"):
            bucket = out.temps
        else:
            bucket = out.other
        bucket.append(name)
    return out


def api_status(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/_kmi-rotor/api/status", timeout=10, trust_env=False)
    r.raise_for_status()
    return r.json()


def key_status(url: str) -> dict[str, str]:
    """Each key's status (ready, cooling, blocked, disabled) as the live proxy reports it."""
    return {k["label"]: k["status"] for p in api_status(url)["pools"] for k in p["keys"]}


def cli(config: Path, *args: str) -> str:
    """Run `kmi-rotor ARGS --config CONFIG` from this checkout (as the proxies it talks to);
    its stdout (fails on a non-zero exit)."""
    out = subprocess.run(
        [sys.executable, "-m", "kmi_rotor.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=str(ROOT / "addon")),
        timeout=30,
    )
    if out.returncode != 0:
        raise RuntimeError(f"kmi-rotor {' '.join(args)} failed: {out.stderr[-2000:]}")
    return out.stdout


__all__ = [
    "CHAT",
    "Faults",
    "Folder",
    "Load",
    "Mix",
    "Target",
    "api_status",
    "cli",
    "key_status",
    "provider_counts",
    "quiet_requests",
    "read_state",
    "requests_by_label",
    "secret",
    "state_folder",
    "write_config",
]
