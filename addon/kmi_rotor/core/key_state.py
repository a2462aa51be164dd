"""A key's state for people, from its health and the time: `ready`, `cooling`, `blocked`,
`disabled` (or `unknown`), with until when and why; and the windows known of it."""

from __future__ import annotations

import math
from typing import Any, Protocol

from . import health as hl
from .health import KeyHealth


class KeyFacts(Protocol):
    """What the state of a key depends on besides its health."""

    @property
    def fingerprint(self) -> str: ...
    @property
    def disabled(self) -> bool: ...
    @property
    def problem(self) -> str | None: ...


def key_state(
    key: KeyFacts,
    h: KeyHealth,
    now: float,
    policy: hl.Policy | None = None,
    spent_until: float | None = None,
) -> dict[str, Any]:
    """`ready`, `cooling` (until, reason), `blocked` (until, reason) or `disabled` (reason).

    `spent_until`: when the key's provider budget (what it reported, less what was sent since)
    lets it take a request again; a key held back by it is not ready. `unknown` for a key
    known neither by its secret nor by a record in the state."""
    if key.problem and not key.fingerprint:
        return {"status": "unknown", "until": None, "reason": "no secret here, no record yet"}
    if key.disabled:
        return {"status": "disabled", "until": None, "reason": "disabled in the configuration"}
    st = hl.status(h, now)
    state, until, reason = st.state, st.until, st.reason
    cap = policy.max_cooldown_seconds if policy else math.inf
    if state == "ready" and not hl.usable(h, now, cap=cap):
        state, until = "cooling", hl.next_usable_at(h, now, policy)
        reason = "provider reports no remaining quota"
    if state == "ready" and spent_until is not None and spent_until > now:
        state, until = "cooling", spent_until
        reason = "provider reports no remaining requests"
    return {"status": state, "until": until, "reason": reason}


def quota(
    h: KeyHealth, now: float, local: dict[str, dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Known windows: the provider's (from its headers, those not reset yet) and the local
    limits' (`local`: the limiter's usage of the key's scope)."""
    out = [
        {
            "name": name,
            "source": "provider",
            "limit": w.limit,
            "remaining": w.remaining,
            "resets_at": w.reset_at,
        }
        for name, w in sorted(h.windows.items())
        if w.reset_at is None or w.reset_at > now
    ]
    for name, u in sorted((local or {}).items()):
        limit, used = u.get("limit"), u.get("used")
        remaining = None if limit is None or used is None else max(0.0, limit - used)
        out.append(
            {
                "name": name,
                "source": "local",
                "limit": limit,
                "remaining": remaining,
                "resets_at": u.get("free_at"),
            }
        )
    return out
