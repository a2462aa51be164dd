"""A key's state from its health and the time: for people (`ready`, `cooling`, `blocked`,
`disabled` or `unknown`, with until when and why; the windows known of it), and for steering
(whether it is in service; which of its dimensions its own local limits pace)."""

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


class RequestAndTokenLimits(Protocol):
    """A key's own local limits, as far as pacing goes."""

    @property
    def requests_per_second(self) -> int | None: ...
    @property
    def requests_per_minute(self) -> int | None: ...
    @property
    def requests_per_hour(self) -> int | None: ...
    @property
    def requests_per_day(self) -> int | None: ...
    @property
    def tokens_per_minute(self) -> int | None: ...
    @property
    def tokens_per_day(self) -> int | None: ...


def paced(limits: RequestAndTokenLimits) -> frozenset[str]:
    """Dimensions a key's local limits pace exactly: for those, the provider's remaining and
    reset (which must be read as the worst case of a sliding window) would only slow it."""
    out = set()
    if any(
        getattr(limits, f"requests_per_{u}") is not None
        for u in ("second", "minute", "hour", "day")
    ):
        out.add("requests")
    if limits.tokens_per_minute is not None or limits.tokens_per_day is not None:
        out.update(("tokens", "input_tokens", "output_tokens"))
    return frozenset(out)


def in_service(key: KeyFacts, h: KeyHealth, now: float) -> bool:
    """Whether the key could have taken traffic just now: not disabled or blocked, and not
    cooling down after a rate limit (a key cooling for a rate limit got no traffic to fail)."""
    if key.disabled:
        return False
    state = hl.status(h, now).state
    if state in ("disabled", "blocked"):
        return False
    return not (state == "cooling" and h.rate_limit_streak > 0)


def key_state(
    key: KeyFacts,
    h: KeyHealth,
    now: float,
    policy: hl.Policy | None = None,
    spent_until: float | None = None,
    scope: str = "",
) -> dict[str, Any]:
    """`ready`, `cooling` (until, reason), `blocked` (until, reason) or `disabled` (reason),
    for requests of `scope` ("" the whole key).

    `spent_until`: when the key's provider budget (what it reported, less what was sent since)
    lets it take a request again; a key held back by it is not ready. `unknown` for a key
    known neither by its secret nor by a record in the state."""
    if key.problem and not key.fingerprint:
        return {"status": "unknown", "until": None, "reason": "no secret here, no record yet"}
    if key.disabled:
        return {"status": "disabled", "until": None, "reason": "disabled in the configuration"}
    st = hl.status(h, now, scope)
    state, until, reason = st.state, st.until, st.reason
    cap = policy.max_cooldown_seconds if policy else math.inf
    if state == "ready" and hl.held_back(h, now, cap=cap, scope=scope):
        state, until = "cooling", hl.next_usable_at(h, now, policy, scope=scope)
        reason = "provider reports no remaining quota"
    if state == "ready" and spent_until is not None and spent_until > now:
        state, until = "cooling", spent_until
        reason = "provider reports no remaining requests"
    return {"status": state, "until": until, "reason": reason}


def quota(
    h: KeyHealth,
    now: float,
    local: dict[str, dict[str, Any]] | None,
    windows: dict[str, hl.WindowState] | None = None,
) -> list[dict[str, Any]]:
    """Known windows: the provider's (from its headers, those not reset yet; the key's, or
    `windows` of one limit scope) and the local limits' (`local`: the limiter's usage of the
    key's scope)."""
    out = [
        {
            "name": name,
            "source": "provider",
            "limit": w.limit,
            "remaining": w.remaining,
            "resets_at": w.reset_at,
        }
        for name, w in sorted((h.windows if windows is None else windows).items())
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
