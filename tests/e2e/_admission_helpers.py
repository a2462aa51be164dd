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


def windows_by(records: Sequence[Any], attr: str = "credential") -> dict[Any, int]:
    """Max count in any sliding one-second window, per value of `attr` of the records."""
    groups: dict[Any, list[float]] = {}
    for r in records:
        groups.setdefault(getattr(r, attr), []).append(r.time)
    return {k: max_in_window(v) for k, v in groups.items()}


def run_concurrently[T](fn: Callable[[int], T], n: int, workers: int | None = None) -> list[T]:
    """Call `fn(i)` for i in range(n) on a thread pool, all at once; results in order."""
    with ThreadPoolExecutor(max_workers=workers or n) as pool:
        return list(pool.map(fn, range(n)))


def chat_body(marker: str = "hello", **extra: Any) -> bytes:
    """A small OpenAI chat request body; `marker` lets the provider's log tell requests apart."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": marker}], **extra}
    return json.dumps(body).encode()


__all__ = [
    "chat_body",
    "max_in_window",
    "run_concurrently",
    "windows_by",
    "write_limits_config",
]
