"""What each key is doing, for people: the status table, `--json`, the status page and metrics.

Built from the configuration and a state document (the CLI) or the live engine (the proxy).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import Key, Settings
from .core import health as hl
from .core.health import KeyHealth
from .core.key_state import key_state, quota
from .core.limiter import model_scope
from .core.secrets import mask
from .core.state import KeyRecord, StateDoc
from .engine import Engine
from .scrubbing import scrubber

if TYPE_CHECKING:
    from .running import Running
    from .served import Served


def identify(settings: Settings, doc: StateDoc) -> Settings:
    """Keys whose secret is not available here (the CLI, in another environment than the
    proxy's) take the fingerprint of the state's record of the same pool and label."""
    by_label = {(rec.pool, rec.label): fp for fp, rec in doc.keys.items()}
    pools = []
    for pool in settings.pools:
        keys = tuple(
            dataclasses.replace(k, fingerprint=by_label.get((k.pool, k.label), ""))
            if k.problem
            else k
            for k in pool.keys
        )
        pools.append(dataclasses.replace(pool, keys=keys))
    return dataclasses.replace(settings, pools=tuple(pools))


def key_row(
    key: Key,
    rec: KeyRecord | None,
    h: KeyHealth,
    now: float,
    engine: Engine | None,
    policy: hl.Policy | None = None,
) -> dict[str, Any]:
    local = _local_usage(key, now, engine) if engine else None
    half_life = engine.policy.half_life_seconds if engine else 300.0
    policy = engine.policy if engine else policy
    spent = engine.spent_until(key.fingerprint, now) if engine else None
    row: dict[str, Any] = {
        "label": key.label,
        "pool": key.pool,
        "key": "?" if key.problem else mask(key.secret.get_secret_value()),
        "masked": "?" if key.problem else mask(key.secret.get_secret_value()),
        "fingerprint": key.fingerprint or None,
        "secret_problem": key.problem,
        **key_state(key, h, now, policy, spent),
        "requests": rec.requests if rec else 0,
        "errors": rec.errors if rec else 0,
        "upstream_429": rec.upstream_429 if rec else 0,
        "retries": rec.retries if rec else 0,
        "tokens": (rec.tokens_in + rec.tokens_out) if rec else 0,
        "last_status": rec.last_status if rec else None,
        "last_error": rec.last_error if rec else None,
        "last_used": rec.last_used if rec else None,
        "error_score": round(hl.decayed_score(h, now, half_life), 3),
        "quota": quota(h, now, local),
        "scopes": scope_rows(key, h, now, engine, policy),
    }
    return row


def _local_usage(key: Key, now: float, engine: Engine) -> dict[str, dict[str, Any]]:
    """The key's local limits as used now, its per-model ones named `<limit> <model>`."""
    out = engine.usage(f"key:{key.fingerprint}", now)
    pool = next((p for p in engine.settings.pools if p.name == key.pool), None)
    for model, _ in pool.model_limits if pool else ():
        used = engine.usage(model_scope(key.fingerprint, model), now)
        out |= {f"{name} {model}": u for name, u in used.items()}
    return out


def scope_rows(
    key: Key, h: KeyHealth, now: float, engine: Engine | None, policy: hl.Policy | None
) -> list[dict[str, Any]]:
    """The key's state per limit scope (a model, a model class) it holds anything for, by
    scope name: status, until, reason and the provider's windows for that scope. Empty for a
    key whose limits are key-wide."""
    names = set(h.scopes)
    if engine is not None:
        names.update(s for s in engine.budget_scopes(key.fingerprint, now) if s)
    out = []
    for scope in sorted(names):
        spent = engine.spent_until(key.fingerprint, now, scope) if engine else None
        s = h.scopes.get(scope)
        windows = s.windows if s is not None else {}
        out.append(
            {
                "scope": scope,
                **key_state(key, h, now, policy, spent, scope),
                "seen_at": s.seen_at if s is not None else None,
                "quota": quota(h, now, None, windows),
            }
        )
    return out


def rows(
    settings: Settings, doc: StateDoc, now: float, engine: Engine | None = None
) -> list[dict[str, Any]]:
    out = []
    policy = hl.Policy(**settings.health.model_dump())
    scrub = scrubber(settings)
    for key in settings.keys:
        rec = doc.keys.get(key.fingerprint) if key.fingerprint else None
        h = engine.health_of(key.fingerprint) if engine else (rec.health if rec else KeyHealth())
        row = key_row(key, rec, h, now, engine, policy)
        # What other processes or older versions wrote is shown scrubbed too.
        row["reason"] = scrub(row["reason"], 120) or None
        row["last_error"] = scrub(row["last_error"], 200) or None
        out.append(row)
    return out


def local_429(doc: StateDoc) -> dict[str, int]:
    return {name: rec.local_429 for name, rec in doc.pools.items()}


def snapshot(
    settings: Settings,
    doc: StateDoc,
    now: float,
    *,
    engine: Engine | None = None,
    recent: list[dict[str, Any]] | None = None,
    inflight: dict[str, int] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Everything the status page and /metrics show (no secret: masked keys, fingerprints)."""
    all_rows = rows(settings, doc, now, engine)
    for r in all_rows:
        r["inflight"] = (inflight or {}).get(r["fingerprint"], 0)
        r["local_429"] = 0
    pools = [
        {
            "name": p.name,
            "provider": p.preset.name,
            "strategy": p.strategy,
            "local_429": doc.pools[p.name].local_429 if p.name in doc.pools else 0,
            "keys": [r for r in all_rows if r["pool"] == p.name],
        }
        for p in settings.pools
    ]
    totals = {
        name: sum(r[name] for r in all_rows)
        for name in ("requests", "errors", "upstream_429", "retries", "tokens", "inflight")
    }
    totals["local_429"] = sum(p["local_429"] for p in pools)
    return {
        "generated_at": now,
        "version": __version__,
        "uptime_s": None if started is None else round(time.time() - started, 1),
        "totals": totals,
        "pools": pools,
        "recent": recent or [],
    }


def live_snapshot(
    run: Running,
    served: Iterable[Served],
    recent: Iterable[dict[str, Any]],
    now: float,
    *,
    started: float,
    reload_error: str | None,
) -> dict[str, Any]:
    """The running proxy's `snapshot`: with the requests in flight per key, the latest
    requests first, a configuration it could not apply and the shared state's status."""
    inflight: dict[str, int] = {}
    for s in served:
        inflight[s.key.fingerprint] = inflight.get(s.key.fingerprint, 0) + 1
    snap = snapshot(
        run.settings,
        run.keeper.view(),
        now,
        engine=run.engine,
        recent=list(reversed(list(recent))),
        inflight=inflight,
        started=started,
    )
    snap["config_error"] = reload_error
    snap["cluster"] = run.state.status()
    return snap


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    return _span(now - ts) + " ago"


def _span(seconds: float) -> str:
    s = max(0, int(seconds + 0.999))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _remaining(r: dict[str, Any]) -> str:
    parts = []
    for q in r["quota"]:
        if q["remaining"] is None:
            continue
        limit = f"/{q['limit']:g}" if q["limit"] is not None else ""
        parts.append(f"{q['remaining']:g}{limit} {q['name']}")
    return ", ".join(parts[:2]) or "-"


TABLE_HEAD = (
    *("POOL", "KEY", "MASKED", "STATUS", "RESETS IN", "REASON"),
    *("REMAINING", "REQS", "ERRS", "429", "LAST", "LAST USED"),
)


def render_table(
    key_rows: list[dict[str, Any]], now: float, local: dict[str, int] | None = None
) -> str:
    """The human table of `kmi-rotor status`."""
    head = TABLE_HEAD
    body = [
        line
        if line is not None
        else (
            r["pool"],
            r["label"],
            r["key"],
            r["status"],
            _span(r["until"] - now) if r.get("until") else "-",
            (r.get("reason") or "-")[:40],
            _remaining(r),
            str(r["requests"]),
            str(r["errors"]),
            str(r["upstream_429"]),
            str(r["last_status"] or (r["last_error"] and "error") or "-"),
            _ago(r["last_used"], now),
        )
        for r in key_rows
        for line in _with_scopes(r, now)
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (head, *body)
    ]
    for pool, n in sorted((local or {}).items()):
        if n:
            lines.append(f"pool {pool}: {n} request{'s' if n != 1 else ''} refused locally (429)")
    for r in key_rows:
        if r.get("secret_problem"):
            found = "shown from the state by its label" if r["fingerprint"] else "no record yet"
            lines.append(
                f"key {r['label']}: its secret is not available here ({r['secret_problem']}); "
                f"{found}"
            )
    return "\n".join(lines)


def _with_scopes(r: dict[str, Any], now: float) -> list[tuple[str, ...] | None]:
    """The key's own line (None: built by the caller), then one indented line per scope."""
    lines: list[tuple[str, ...] | None] = [None]
    for s in r.get("scopes") or ():
        lines.append(
            (
                "",
                f"  {s['scope']}",
                "",
                s["status"],
                _span(s["until"] - now) if s.get("until") else "-",
                (s.get("reason") or "-")[:40],
                _remaining(s),
                *("", "", "", "", ""),
            )
        )
    return lines


def proxy_note(doc: dict[str, Any] | None) -> str | None:
    """What the running proxy says about its configuration, when something is wrong."""
    if not doc or not doc.get("config_error"):
        return None
    at = doc.get("config_loaded_at")
    since = time.strftime("%H:%M:%S", time.localtime(at)) if isinstance(at, int | float) else "?"
    return (
        f"the running proxy (pid {doc.get('pid')}) could not apply its configuration: "
        f"{doc['config_error']}; it keeps the configuration it loaded at {since}"
    )
