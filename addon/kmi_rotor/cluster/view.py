"""The CLI's side of the cluster: the pool as Redis holds it, and actions announced to all."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any

from ..config import Key, Settings
from ..core.limiter import WINDOWS, enforced_length
from . import actions
from .registry import Registry
from .settings import Cluster, connect

WAIT = 2.0
"""The CLI gives Redis this long before it reports it unreachable."""


def announce(settings: Settings, action: str, targets: Sequence[str], pool_size: int = 0) -> str:
    """Apply and announce an action through Redis; what to tell the user."""
    cluster = settings.cluster
    assert cluster is not None

    async def go() -> None:
        client = connect(cluster.url.get_secret_value(), 2)
        try:
            await asyncio.wait_for(
                actions.announce(
                    client, cluster.prefix, action, targets, "cli", pool_size=pool_size
                ),
                WAIT,
            )
        finally:
            await client.aclose()

    try:
        asyncio.run(go())
    except Exception as e:
        return f"not announced through Redis at {cluster.shown_url} ({_why(e)})"
    return f"announced to every process through Redis at {cluster.shown_url}"


def read(settings: Settings) -> dict[str, Any]:
    """The processes, and each key's cooldown, window usage and counters as Redis holds them;
    `error` instead when Redis cannot be read."""
    cluster = settings.cluster
    assert cluster is not None
    try:
        return asyncio.run(asyncio.wait_for(_read(cluster, settings), WAIT))
    except Exception as e:
        return {"redis": cluster.shown_url, "error": _why(e)}


async def _read(cluster: Cluster, settings: Settings) -> dict[str, Any]:
    client = connect(cluster.url.get_secret_value(), 2)
    try:
        processes = await Registry(client, cluster.prefix).processes()
        sec, usec = await client.time()
        now = sec * 1000 + usec / 1000
        keys = [
            await _key(client, cluster.prefix, k, now, settings.limits.guard) for k in settings.keys
        ]
    finally:
        await client.aclose()
    return {
        "redis": cluster.shown_url,
        "prefix": cluster.prefix,
        "processes": processes,
        "alive": sum(1 for p in processes if p["alive"]),
        "keys": keys,
    }


async def _key(client: Any, prefix: str, key: Key, now: float, guard: float) -> dict[str, Any]:
    scope = f"key:{key.fingerprint}"
    cool = await client.get(f"{prefix}:cool:{key.fingerprint}:")
    cool_text = cool.decode() if isinstance(cool, bytes) else cool
    if cool_text is None:
        cooling = None
    elif cool_text == "inf":
        cooling = math.inf
    else:
        cooling = round(max(0.0, float(cool_text) - now) / 1000, 3)
    used: dict[str, int] = {}
    for name in WINDOWS:
        if getattr(key.limits, name, None) is None or name.startswith("tokens"):
            continue
        since = now - enforced_length(name, guard) * 1000
        used[name] = int(await client.zcount(f"{prefix}:w:{scope}:{name}", f"({since}", "+inf"))
    in_flight = int(await client.zcount(f"{prefix}:c:{scope}", f"({now}", "+inf"))
    raw = await client.hgetall(f"{prefix}:n:{key.fingerprint}")
    counters = {_s(k): int(v) for k, v in raw.items()}
    budgets = await _budgets(client, prefix, key.fingerprint, now)
    return {
        "label": key.label,
        "pool": key.pool,
        "fingerprint": key.fingerprint,
        "disabled": cooling == math.inf,
        "cooling_s": None if cooling in (None, math.inf) else cooling,
        "used": used,
        "in_flight": in_flight,
        "counters": counters,
        "budgets": budgets,
    }


async def _budgets(client: Any, prefix: str, fp: str, now: float) -> dict[str, dict[str, Any]]:
    """The key's provider budgets (whole key) as the last report had them: limit, what is
    left of it counting every request sent since (until its reset), seconds to the reset."""
    out: dict[str, dict[str, Any]] = {}
    for name, raw in (await client.hgetall(f"{prefix}:b:{fp}:")).items():
        try:
            b = json.loads(raw)
            reset = float(b["reset"])
            sent = int(await client.zcard(f"{prefix}:bs:{fp}::{_s(name)}"))
            left = float(b["r"]) - sent if now < reset else None
            limit = float(b["l"])
        except (ValueError, KeyError, TypeError):
            continue  # not written by kmi-rotor: nothing to show
        out[_s(name)] = {
            "limit": None if limit < 0 else limit,
            "left": left,
            "reset_s": round(max(0.0, reset - now) / 1000, 3),
        }
    return out


def render(view: dict[str, Any]) -> str:
    """The cluster part of `kmi-rotor status`."""
    if "error" in view:
        return f"cluster: Redis at {view['redis']} unreachable ({view['error']})"
    lines = [f"cluster: Redis at {view['redis']}, {view['alive']} process(es) alive"]
    for p in view["processes"]:
        state = "alive" if p["alive"] else "gone"
        lines.append(
            f"  {p['id']}  {p.get('listen', '')}  last seen {p['last_seen_s']}s ago"
            f"  in flight {p.get('in_flight', 0)}  {p.get('mode', '')}  {state}"
        )
    for k in view["keys"]:
        what = (
            "disabled"
            if k["disabled"]
            else (f"cooling {k['cooling_s']}s" if k["cooling_s"] else "ready")
        )
        used = ", ".join(f"{n} {v}" for n, v in k["used"].items())
        budgets = ", ".join(
            f"{n} {_n(b['left'])}/{_n(b['limit'])} (reset in {b['reset_s']}s)"
            for n, b in k.get("budgets", {}).items()
        )
        lines.append(
            f"  key {k['label']}: {what}; in flight {k['in_flight']}"
            + (f"; {used}" if used else "")
            + (f"; provider budget {budgets}" if budgets else "")
            + f"; requests {k['counters'].get('requests', 0)}"
        )
    return "\n".join(lines)


def _n(v: float | None) -> str:
    return "?" if v is None else f"{v:g}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__ if not isinstance(e, TimeoutError) else "no answer"


__all__ = ["Cluster", "announce", "read", "render"]
