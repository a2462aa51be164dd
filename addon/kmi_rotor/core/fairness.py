"""How evenly a pool's traffic spread over its keys, from trace records. Pure: no I/O.

The fairness figure is Jain's index over the per-key request counts of a pool's usable keys,
J = (Σx)² / (n·Σx²), with n the number of usable keys, idle ones included. Counting idle keys
is the point: one key taking all the traffic of three scores 1/3, not 1.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class KeySummary:
    """One key's traffic. `requests` counts attempts that used the key (retries included)."""

    pool: str
    label: str
    usable: bool  # False: seen in the trace but not a usable key of the configuration now
    requests: int
    successes: int
    failures: dict[str, int]  # outcome -> count, every outcome but "ok"
    share_pct: float | None  # of the pool's attempts that used a key; None when there were none
    mean_ms: float | None
    median_ms: float | None
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True)
class PoolSummary:
    """One pool's traffic. `fairness_pct` is None when its usable keys had no traffic at all."""

    name: str
    requests: int  # every attempt, including those refused before a key was chosen
    client_requests: int  # distinct request ids: failover retries folded in
    local_429: int
    retries: int  # attempts > 1
    outcomes: dict[str, int]
    fairness_pct: float | None
    usable_keys: int
    unused: tuple[str, ...]  # usable keys with no traffic, in configuration order
    keys: tuple[KeySummary, ...]


@dataclass(frozen=True)
class Summary:
    """Pools in configuration order, then pools only the trace knows, by first appearance."""

    records: int
    first_ts: float | None
    last_ts: float | None
    pools: tuple[PoolSummary, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _KeyAcc:
    outcomes: Counter[str] = field(default_factory=Counter)
    totals: list[float] = field(default_factory=list)
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass
class _PoolAcc:
    requests: int = 0
    retries: int = 0
    ids: set[str] = field(default_factory=set)
    outcomes: Counter[str] = field(default_factory=Counter)
    keys: dict[str, _KeyAcc] = field(default_factory=dict)


def jain_index(counts: Sequence[int]) -> float | None:
    """Jain's fairness index of `counts` in [1/n, 1]; None when there is nothing to compare."""
    total = sum(counts)
    if not counts or total == 0:
        return None
    return total * total / (len(counts) * sum(x * x for x in counts))


def summarize(records: Iterable[Mapping[str, Any]], keys: Sequence[tuple[str, str]]) -> Summary:
    """Per-key and per-pool figures of `records` (trace dicts).

    `keys` are the usable keys as (pool, label), idle ones included: they define the pools'
    fairness figures and `unused` lists. Keys and pools seen only in the records are reported
    too, marked not usable and left out of the fairness figure. Fields of the wrong type are
    ignored rather than trusted, so a hand-edited trace cannot break a summary.
    """
    pools: dict[str, _PoolAcc] = {}
    for pool, label in keys:
        pools.setdefault(pool, _PoolAcc()).keys.setdefault(label, _KeyAcc())
    count, first, last = 0, None, None
    for rec in records:
        count += 1
        ts = _num(rec.get("ts"))
        if ts is not None:
            first = ts if first is None else min(first, ts)
            last = ts if last is None else max(last, ts)
        _add(pools.setdefault(str(rec.get("pool")), _PoolAcc()), rec)
    usable: dict[str, list[str]] = {}
    for pool, label in keys:
        usable.setdefault(pool, []).append(label)
    return Summary(
        records=count,
        first_ts=first,
        last_ts=last,
        pools=tuple(_pool_summary(name, acc, usable.get(name, [])) for name, acc in pools.items()),
    )


def _add(acc: _PoolAcc, rec: Mapping[str, Any]) -> None:
    outcome = str(rec.get("outcome"))
    acc.requests += 1
    acc.outcomes[outcome] += 1
    attempt = rec.get("attempt")
    if isinstance(attempt, int) and attempt > 1:
        acc.retries += 1
    if isinstance(rec.get("id"), str):
        acc.ids.add(rec["id"])
    label = rec.get("key")
    if not isinstance(label, str):
        return  # refused before a key was chosen: the pool's, no key's
    k = acc.keys.setdefault(label, _KeyAcc())
    k.outcomes[outcome] += 1
    total = _num(rec.get("total_ms"))
    if total is not None:
        k.totals.append(total)
    k.tokens_in += _int(rec.get("tokens_in"))
    k.tokens_out += _int(rec.get("tokens_out"))


def _pool_summary(name: str, acc: _PoolAcc, usable: list[str]) -> PoolSummary:
    keyed = sum(k.outcomes.total() for k in acc.keys.values())
    index = jain_index([acc.keys[label].outcomes.total() for label in usable])
    return PoolSummary(
        name=name,
        requests=acc.requests,
        client_requests=len(acc.ids),
        local_429=acc.outcomes["local_429"],
        retries=acc.retries,
        outcomes=dict(sorted(acc.outcomes.items())),
        fairness_pct=None if index is None else 100.0 * index,
        usable_keys=len(usable),
        unused=tuple(label for label in usable if not acc.keys[label].outcomes),
        keys=tuple(
            _key_summary(name, label, k, label in usable, keyed) for label, k in acc.keys.items()
        ),
    )


def _key_summary(pool: str, label: str, k: _KeyAcc, usable: bool, keyed: int) -> KeySummary:
    requests = k.outcomes.total()
    return KeySummary(
        pool=pool,
        label=label,
        usable=usable,
        requests=requests,
        successes=k.outcomes["ok"],
        failures={o: n for o, n in sorted(k.outcomes.items()) if o != "ok"},
        share_pct=100.0 * requests / keyed if keyed else None,
        mean_ms=statistics.fmean(k.totals) if k.totals else None,
        median_ms=statistics.median(k.totals) if k.totals else None,
        tokens_in=k.tokens_in,
        tokens_out=k.tokens_out,
    )


def _num(v: object) -> float | None:
    # bool is an int subclass, and `true` is no duration
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _int(v: object) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


# Rendering --------------------------------------------------------------------------------

_HEAD = ("KEY", "REQUESTS", "SHARE", "OK", "FAILURES", "MEAN MS", "MEDIAN MS", "TOKENS IN/OUT")


def render_summary(summary: Summary) -> str:
    """A plain-text report: one header line and one table of keys per pool."""
    if not summary.pools:
        return "no pools and no traffic"
    blocks = [_render_pool(p) for p in summary.pools]
    if summary.records == 0:
        blocks.insert(0, "no traffic recorded")
    return "\n\n".join(blocks)


def _render_pool(p: PoolSummary) -> str:
    if p.fairness_pct is None:
        fair = "fairness: no traffic"
    else:
        fair = f"fairness {p.fairness_pct:.1f}% over {p.usable_keys} usable keys"
    head = (
        f"pool {p.name}: {_n(p.requests, 'request')} ({_n(p.retries, 'failover retry')}, "
        f"{p.local_429} refused locally with 429), {fair}"
    )
    lines = [head]
    if p.unused:
        lines.append(f"unused: {', '.join(p.unused)}")
    rows = [_row(k) for k in p.keys]
    if rows:
        lines.append(_table([_HEAD, *rows]))
    return "\n".join(lines)


def _row(k: KeySummary) -> tuple[str, ...]:
    failures = ", ".join(f"{o} {n}" for o, n in k.failures.items()) or "-"
    return (
        k.label if k.usable else f"{k.label} (not usable)",
        str(k.requests),
        "-" if k.share_pct is None else f"{k.share_pct:.1f}%",
        str(k.successes),
        failures,
        _ms(k.mean_ms),
        _ms(k.median_ms),
        f"{k.tokens_in}/{k.tokens_out}",
    )


def _n(count: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{count} {noun if count == 1 else plural}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _table(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(cell) for cell in col) for col in zip(*lines, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
