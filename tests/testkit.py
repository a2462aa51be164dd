"""What many tests share: a clock they move by hand, keys, and state deltas built in one line.

Waiting on a condition is `proctools.wait_until`; writing a rotor.toml is `rotor_toml`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import SecretStr

from kmi_rotor.config import Key
from kmi_rotor.core.secrets import fingerprint
from kmi_rotor.core.state import KEY_COUNTERS, Delta, KeyDelta


class Clock:
    """A clock that moves only when a test sets or advances `now`; callable like time.time."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_key(label: str, pool: str = "p") -> Key:
    """A configured key with a distinct, realistic-looking secret derived from its label."""
    secret = f"sk-{label}-{'x' * 20}"
    return Key(label, SecretStr(secret), fingerprint(secret), pool)


def kd(label: str, pool: str, *, requests: int = 0, errors: int = 0, **kw: Any) -> KeyDelta:
    """A key delta: counters by name (any of KEY_COUNTERS), the rest as KeyDelta fields."""
    counts = {"requests": requests, "errors": errors}
    counts |= {name: kw.pop(name) for name in KEY_COUNTERS if name in kw}
    return KeyDelta(label, pool, counters={n: c for n, c in counts.items() if c}, **kw)


def delta(*maps: Mapping[str, KeyDelta], **keys: KeyDelta) -> Delta:
    """A delta of these key deltas, by fingerprint (mappings or keyword arguments)."""
    out = Delta()
    for m in (*maps, keys):
        out.keys.update(m)
    return out


def with_pools(d: Delta, **pools: dict[str, int]) -> Delta:
    """`d` with pool counters added: `with_pools(d, kimi={"local_429": 2})`."""
    for pool, counters in pools.items():
        for name, n in counters.items():
            d.pool_add(pool, name, n)
    return d


def script_args(limits: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The JSON argument of every script call a `SharedLimits` makes from now on (the calls
    still run)."""
    sent: list[dict[str, Any]] = []
    script = limits._script
    monkeypatch.setattr(limits, "_script", lambda sc, arg: sent.append(arg) or script(sc, arg))
    return sent


def need_redis() -> None:
    """Tests of the shared state need Debian's redis-server: skipped where it is missing (with
    the command that installs it), except in CI, which installs it and must run them."""
    if shutil.which("redis-server"):
        return
    why = "redis-server is missing (apt-get install redis-server)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI must run the cluster tests")
    pytest.skip(why)
