"""Helpers for the admission tests and benchmark: configs with limits, sliding-window counts,
concurrent clients. Importable from tests (as a package module) and from scripts (by path)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rotor_toml import pool, rotor_config

Limits = Mapping[str, int | float]


ADMITTED_PROBE = """
import json
import time

from mitmproxy import ctx


class AdmittedAt:
    \"\"\"When kmi-rotor admitted each request, as its own record of the flow holds it (the
    monotonic moment it chose the key), turned into wall-clock time. This `request` hook runs
    after kmi-rotor's. Kept in memory (no I/O on the request path), written to {out!r} at
    shutdown as [[time, first message], ...].\"\"\"

    def __init__(self):
        self.admitted = []

    def request(self, flow):
        served = ctx.master.addons.get("rotor").served.get(flow.id)
        if flow.response is None and served is not None:
            wall, mono = time.time(), time.monotonic()
            self.admitted.append((wall - (mono - served.started), flow.request.raw_content))

    def done(self):
        rows = [[t, json.loads(body)["messages"][0]["content"]] for t, body in self.admitted]
        with open({out!r}, "w") as f:
            json.dump(rows, f)


addons = [AdmittedAt()]
"""


def admitted_probe(folder: Path) -> tuple[Path, Path]:
    """A mitmdump script (load it after kmi-rotor's) noting when kmi-rotor admitted each chat
    request, and the file it writes at shutdown; read it with `read_admitted`."""
    out = folder / "admitted.json"
    script = folder / "admitted_probe.py"
    script.write_text(ADMITTED_PROBE.format(out=str(out)))
    return script, out


def read_admitted(out: Path) -> dict[str, float]:
    """By first message: when kmi-rotor admitted each request (as `admitted_probe` wrote it)."""
    return {marker: t for t, marker in json.loads(out.read_text())}


def write_limits_config(
    tmp_path: Path,
    host: str,
    keys: Mapping[str, str],
    *,
    limits: Limits | None = None,
    key_limits: Limits | None = None,
    own_limits: Mapping[str, Limits] | None = None,
) -> Path:
    """A rotor.toml with one round-robin pool `main` on `host`, the proxy-wide `[limits]`
    (max_wait_seconds included), the pool's default `key_limits` and per-key `limits`."""
    main = pool("main", [host], keys, key_limits=dict(key_limits) if key_limits else None)
    for table in main["keys"]:
        own = (own_limits or {}).get(table["label"])
        if own:
            table["limits"] = dict(own)
    return rotor_config(
        tmp_path / "rotor.toml", tmp_path / "state", [main], limits=dict(limits or {})
    )


def max_in_window(times: Iterable[float], window: float = 1.0) -> int:
    """The largest number of `times` inside any half-open interval [t, t + window), checked
    at every t in `times` (the densest interval always starts at some event)."""
    ordered = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(ordered):
        j = max(j, i)
        while j < len(ordered) and ordered[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best


def windows_by(
    records: Sequence[Any], attr: str = "credential", window: float = 1.0
) -> dict[Any, int]:
    """Max count in any sliding window (one second unless given), per value of `attr`."""
    groups: dict[Any, list[float]] = {}
    for r in records:
        groups.setdefault(getattr(r, attr), []).append(r.time)
    return {k: max_in_window(v, window) for k, v in groups.items()}


def run_concurrently[T](fn: Callable[[int], T], n: int, workers: int | None = None) -> list[T]:
    """Call `fn(i)` for i in range(n) on a thread pool, all at once; results in order."""
    with ThreadPoolExecutor(max_workers=workers or n) as pool:
        return list(pool.map(fn, range(n)))


def chat_body(marker: str = "hello", **extra: Any) -> bytes:
    """A small OpenAI chat request body; `marker` lets the provider's log tell requests apart."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": marker}], **extra}
    return json.dumps(body).encode()


__all__ = [
    "admitted_probe",
    "chat_body",
    "max_in_window",
    "read_admitted",
    "run_concurrently",
    "windows_by",
    "write_limits_config",
]
