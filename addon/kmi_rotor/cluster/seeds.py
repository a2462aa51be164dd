"""Where a process's local windows start when Redis goes away (`on_redis_down = "local"`).

While shared, the local limiter is not used; empty, it would let every process send its
whole share at once the moment Redis went away, on top of what the cluster had just sent.
So each heartbeat reads the shared windows as this process's share of them (`snapshot.lua`:
1/n of every window's entries, n the processes alive) and, on the way down, the local windows
start from that read plus what this process admitted since (all of it: it may be missing
from the read).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.limiter import GLOBAL, SNAPSHOT_FORMAT, TOKEN_WINDOWS

OVERLAP = 1.0
"""Own admissions this long before a read count again on top of it: one that was on its way
to Redis while the read ran is missing from it, and counting one twice only errs on the safe
side."""


@dataclass(frozen=True)
class Read:
    """The shared windows as last read: entries in this process's clock, and when."""

    at: float
    """Local time of the read."""
    scopes: Mapping[str, Mapping[str, list[list[float]]]]
    """scope -> window -> [[time, amount]...], local clock."""


def read_from(raw: Mapping[str, Any], redis_now_ms: float, now: float) -> Read:
    """A snapshot script's answer (Redis's clock, ms) in this process's clock."""
    offset = now - redis_now_ms / 1000.0
    scopes = {
        scope: {
            name: [[float(t) / 1000.0 + offset, float(n)] for t, n in entries]
            for name, entries in windows.items()
        }
        for scope, windows in raw.items()
        if isinstance(windows, Mapping)
    }
    return Read(now, scopes)


def seed(
    last: Read | None,
    admitted: Iterable[tuple[float, str, int]],
    windows: Mapping[str, Iterable[str]],
    now: float,
) -> dict[str, Any]:
    """The local limiter's snapshot (`Limiter.restore`) to start degraded mode from.

    `last`: the last read (None: never read; then only own admissions count); `admitted`:
    this process's shared admissions (time, key, tokens); `windows`: the configured window
    names by scope ("global", "key:<fp>")."""
    since = -float("inf") if last is None else last.at - OVERLAP
    scopes: dict[str, dict[str, list[list[float]]]] = {}
    if last is not None:
        for scope, named in last.scopes.items():
            scopes[scope] = {name: [list(e) for e in entries] for name, entries in named.items()}
    for at, fp, tokens in admitted:
        if at <= since:
            continue
        for scope in (GLOBAL, f"key:{fp}"):
            for name in windows.get(scope, ()):
                amount = tokens if name in TOKEN_WINDOWS else 1
                scopes.setdefault(scope, {}).setdefault(name, []).append([at, amount])
    return {"format": SNAPSHOT_FORMAT, "at": now, "scopes": scopes}
