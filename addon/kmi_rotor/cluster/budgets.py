"""Provider budgets shared through Redis: what a report of a provider's is, as the scripts take it.

A key's budget (per key and scope; scope "" is the whole key) is core/budget.py's `Budget`
kept in Redis and dated by Redis's clock: `settle.lua` writes it from the answer that reported
it, with every request in flight on the key in any process as sent since; `admit.lua` counts
each request it admits against it and skips a key whose budget is spent until it frees.
Keys (prefix P, key fp, scope s, window name w):

    P:b:<fp>:<s>          hash w -> JSON {l, r, reset, seen, longest, guard, cap, adm} (ms)
    P:bs:<fp>:<s>:<w>     sorted set: requests sent since the report (id -> admitted at)
    P:fl:<fp>:<s>         sorted set: requests in flight ("id@admitted" -> lease end)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.budget import COUNTED
from ..core.signals import Window

NEVER_MS = 1e15
"""A time span that does not end, in milliseconds (JSON has no infinity)."""


def budget_reports(windows: Sequence[Window], now: float) -> list[list[Any]]:
    """The windows of a provider's report that budgets count (requests), as the settle
    script takes them: [name, limit (-1: unknown), remaining, ms to the reset]; named as
    `Budgets.observe` names them."""
    out: list[list[Any]] = []
    for w in windows:
        if w.dimension not in COUNTED or w.remaining is None or w.reset_at is None:
            continue
        name = w.dimension if w.period is None else f"{w.dimension}:{w.period}"
        limit = -1.0 if w.limit is None else w.limit
        out.append([name, limit, w.remaining, max(0.0, (w.reset_at - now) * 1000.0)])
    return out
