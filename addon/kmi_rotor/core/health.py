"""What a response does to a key: cooldowns, blocks, disables, known windows and a decaying score.

Each kind of failure has its own remedy: a rate limit cools the key down, an exhausted quota blocks
it until the reset, a bad key disables it, an overload backs off briefly (it is not the key's
fault), and a bad request costs nothing. A new penalty never shortens one already running.

Providers that limit per model (or model class) report the windows of the model asked for, and
their 429s cool only that model: those windows and rate-limit cooldowns are held per scope
(`KeyHealth.scopes`). Scope "" is the whole key: what is held there binds every scope.
Quotas, bad credentials, overloads and operators' actions are always key-wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

# The records live apart (the state file's shapes); importers find them here too.
from .health_records import MAX_SCOPES as MAX_SCOPES
from .health_records import SCOPE_TTL as SCOPE_TTL
from .health_records import KeyHealth as KeyHealth
from .health_records import Persisted as Persisted
from .health_records import ScopedHealth as ScopedHealth
from .health_records import WindowState as WindowState
from .health_records import built, updated, window_state
from .signals import FailureKind, Signal, Window

_MAX_DOUBLINGS = 30
"""Backoffs stop doubling here: the caps are far below, and 2**streak must not overflow."""


@dataclass(frozen=True)
class Policy:
    max_cooldown_seconds: float = 3600.0
    quota_block_seconds: float = 3600.0
    """How long a quota error blocks a key when it carries no reset."""
    rate_limit_backoff: float = 2.0
    """First hint-less 429 backoff, doubled per consecutive 429, capped at max_cooldown_seconds."""
    overload_backoff: float = 1.0
    """First overload backoff, doubled per consecutive overload, capped at overload_backoff_max."""
    overload_backoff_max: float = 30.0
    half_life_seconds: float = 300.0
    auth_recheck_seconds: float | None = None
    """When set, a disabled key may be tried once this long after it was disabled."""


@dataclass(frozen=True)
class KeyStatus:
    state: Literal["ready", "cooling", "blocked", "disabled"]
    until: float | None
    reason: str | None


# -- applying what a response said ----------------------------------------------------------------


def apply_signal(
    h: KeyHealth,
    sig: Signal,
    now: float,
    policy: Policy,
    *,
    outage: bool = False,
    scope: str = "",
) -> KeyHealth:
    """The key's health after `sig` on a request of `scope`; `outage` means every key of the
    pool failed the same way. The windows and a rate limit go to `scope` ("" the whole key);
    everything else is key-wide."""
    if sig.kind is FailureKind.OK:  # every answer that went well: one copy of the record
        return _succeeded(h, sig.windows, now, policy, scope)
    h = updated(h, _seen(h, sig.windows, now, scope))
    match sig.kind:
        case FailureKind.RATE_LIMITED:
            h = (
                _scoped_rate_limit(h, sig, now, policy, scope)
                if scope
                else _rate_limited(h, sig, now, policy)
            )
        case FailureKind.QUOTA:
            h = _quota(h, sig, now, policy)
        case FailureKind.AUTH:
            h = _failed(h, now, policy, disabled_reason=sig.reason, disabled_at=now)
        case FailureKind.OVERLOADED:
            h = _overloaded(h, now, policy, sig.reason, sig.retry_at, outage)
    return updated(h, {"updated_at": now})


def apply_network_error(
    h: KeyHealth,
    now: float,
    policy: Policy,
    *,
    outage: bool = False,
    reason: str = "network error",
) -> KeyHealth:
    """The key's health after a request that got no answer: treated like an overload."""
    return updated(_overloaded(h, now, policy, reason, None, outage), {"updated_at": now})


def operator_reset(h: KeyHealth, now: float) -> KeyHealth:
    """Usable again right now: cooldown, block, disable, streaks and known windows cleared.

    Windows go too: an operator resets a key after fixing what made it fail (a top-up, a plan
    change), and the next response reports them afresh. The score is history and just decays.
    """
    return updated(
        h,
        {
            "cooling_until": None,
            "cooling_reason": None,
            "blocked_until": None,
            "blocked_reason": None,
            "disabled_reason": None,
            "disabled_at": None,
            "rate_limit_streak": 0,
            "overload_streak": 0,
            "windows": {},
            "scopes": {},
            "updated_at": now,
        },
    )


def _succeeded(
    h: KeyHealth, windows: tuple[Window, ...], now: float, policy: Policy, scope: str
) -> KeyHealth:
    """`apply_signal` of a success: its windows seen (as `_seen` records them, the scope's
    streak ended), the key's streaks ended, and a planned recheck's disable lifted. The new
    record is built from a copy of the old one's values, without an update dict to merge."""
    values = h.__dict__.copy()
    if scope:
        values["scopes"] = _scopes_seen(h, windows, now, scope, True)
        fields = h.__pydantic_fields_set__ | _SUCCEEDED_IN_SCOPE
    else:
        values["windows"] = _merge_windows(h.windows, windows, now)
        fields = h.__pydantic_fields_set__ | _SUCCEEDED_KEY_WIDE
    values["rate_limit_streak"] = 0
    values["overload_streak"] = 0
    # Only the planned recheck re-enables a key: a request that was already in flight when the
    # key was disabled may still succeed, and must not undo the disable.
    if h.disabled_reason is not None:
        recheck = _recheck_at(h, policy.auth_recheck_seconds)
        if recheck is not None and now >= recheck:
            values["disabled_reason"] = None
            values["disabled_at"] = None
            fields |= _REENABLED
    values["updated_at"] = now
    return built(type(h), values, fields)


_SUCCEEDED_KEY_WIDE: Final = frozenset(
    ("windows", "rate_limit_streak", "overload_streak", "updated_at")
)
"""The fields a success sets on a key-wide answer (`_succeeded`)."""
_SUCCEEDED_IN_SCOPE: Final = frozenset(
    ("scopes", "rate_limit_streak", "overload_streak", "updated_at")
)
"""The fields a success sets on an answer to a request of a scope."""
_REENABLED: Final = frozenset(("disabled_reason", "disabled_at"))


def _rate_limited(h: KeyHealth, sig: Signal, now: float, policy: Policy) -> KeyHealth:
    hint = sig.retry_at if sig.retry_at is not None else _first_exhausted_reset(h, now)
    if hint is None:
        hint = now + policy.rate_limit_backoff * 2 ** min(h.rate_limit_streak, _MAX_DOUBLINGS)
    until = min(hint, now + policy.max_cooldown_seconds)
    return _failed(
        h, now, policy, rate_limit_streak=h.rate_limit_streak + 1, **_cooling(h, until, sig.reason)
    )


def _scoped_rate_limit(
    h: KeyHealth, sig: Signal, now: float, policy: Policy, scope: str
) -> KeyHealth:
    """A 429 for one scope: that scope cools (as `_rate_limited` does a key); the key stays
    usable for every other scope."""
    s = h.scopes[scope]
    hint = sig.retry_at if sig.retry_at is not None else _first_reset(s.windows, now)
    if hint is None:
        hint = now + policy.rate_limit_backoff * 2 ** min(s.rate_limit_streak, _MAX_DOUBLINGS)
    until = min(hint, now + policy.max_cooldown_seconds)
    update: dict[str, object] = {"rate_limit_streak": s.rate_limit_streak + 1}
    if s.cooling_until is None or s.cooling_until < until:
        update |= {"cooling_until": until, "cooling_reason": sig.reason}
    scopes = {**h.scopes, scope: updated(s, update)}
    return _failed(h, now, policy, scopes=scopes)


def _seen(
    h: KeyHealth, windows: tuple[Window, ...], now: float, scope: str = ""
) -> dict[str, object]:
    """The update that records a failed answer to a request of `scope`: its windows merged
    into the key's (scope "") or into the scope's (`_scopes_seen`)."""
    if not scope:
        return {"windows": _merge_windows(h.windows, windows, now)}
    return {"scopes": _scopes_seen(h, windows, now, scope, False)}


def _scopes_seen(
    h: KeyHealth, windows: tuple[Window, ...], now: float, scope: str, succeeded: bool
) -> dict[str, ScopedHealth]:
    """The key's scopes once an answer to a request of `scope` is recorded: its windows merged
    into the scope's, which is seen now (created when new; its rate-limit streak ended when
    the answer `succeeded`), old scopes pruned. The scope's record is built from a copy of the
    old one's values, as `updated` would build it, without an update dict to merge."""
    old = h.scopes.get(scope) or ScopedHealth()
    values = old.__dict__.copy()
    values["windows"] = _merge_windows(old.windows, windows, now)
    values["seen_at"] = now
    if succeeded and old.rate_limit_streak:
        values["rate_limit_streak"] = 0
        fields = old.__pydantic_fields_set__ | _SEEN_STREAK_ENDED
    else:
        fields = old.__pydantic_fields_set__ | _SEEN
    scopes = h.scopes.copy()
    scopes[scope] = built(type(old), values, fields)
    return _live_scopes(scopes, now)


_SEEN: Final = frozenset(("windows", "seen_at"))
"""The fields of a scope's record an answer sets (`_scopes_seen`)."""
_SEEN_STREAK_ENDED: Final = _SEEN | {"rate_limit_streak"}


def prune_scopes(h: KeyHealth, now: float, ttl: float = SCOPE_TTL) -> KeyHealth:
    """Scopes not seen for `ttl` dropped, and at most MAX_SCOPES kept (most recently seen)."""
    live = _live_scopes(h.scopes, now, ttl)
    if len(live) == len(h.scopes):
        return h
    return updated(h, {"scopes": live})


def _live_scopes(
    scopes: dict[str, ScopedHealth], now: float, ttl: float = SCOPE_TTL
) -> dict[str, ScopedHealth]:
    """`scopes` without those not seen for `ttl`, at most MAX_SCOPES (the most recently seen);
    `scopes` itself when none goes."""
    if len(scopes) <= MAX_SCOPES:  # the usual answer, found without a copy: all are live
        since = now - ttl
        for s in scopes.values():
            if not (s.seen_at > since or _still_cooling(s, now)):
                break
        else:
            return scopes
    live = {k: s for k, s in scopes.items() if s.seen_at > now - ttl or _still_cooling(s, now)}
    if len(live) > MAX_SCOPES:
        newest = sorted(live, key=lambda k: live[k].seen_at, reverse=True)[:MAX_SCOPES]
        live = {k: live[k] for k in newest}
    return scopes if len(live) == len(scopes) else live


def _still_cooling(s: ScopedHealth, now: float) -> bool:
    return s.cooling_until is not None and s.cooling_until > now


def _quota(h: KeyHealth, sig: Signal, now: float, policy: Policy) -> KeyHealth:
    until = sig.retry_at if sig.retry_at is not None else _first_exhausted_reset(h, now)
    if until is None:
        until = now + policy.quota_block_seconds
    if h.blocked_until is not None and h.blocked_until >= until:
        return _failed(h, now, policy)
    return _failed(h, now, policy, blocked_until=until, blocked_reason=sig.reason)


def _overloaded(
    h: KeyHealth, now: float, policy: Policy, reason: str, hint: float | None, outage: bool
) -> KeyHealth:
    if outage:
        return h  # every key failed alike: the provider is down, no key is to blame
    backoff = policy.overload_backoff * 2 ** min(h.overload_streak, _MAX_DOUBLINGS)
    # A Retry-After on an overload is honoured, but within the same short cap as the backoff.
    wait = max(backoff, hint - now if hint is not None else 0.0)
    until = now + min(wait, policy.overload_backoff_max)
    return _failed(
        h, now, policy, overload_streak=h.overload_streak + 1, **_cooling(h, until, reason)
    )


def _cooling(h: KeyHealth, until: float, reason: str) -> dict[str, object]:
    """A cooldown until `until`, unless a longer one is already running."""
    if h.cooling_until is not None and h.cooling_until >= until:
        return {}
    return {"cooling_until": until, "cooling_reason": reason}


def _failed(h: KeyHealth, now: float, policy: Policy, **update: object) -> KeyHealth:
    """`update` applied, and one more error on the decayed score."""
    score = decayed_score(h, now, policy.half_life_seconds) + 1.0
    return updated(h, {**update, "error_score": score, "score_at": now})


def _merge_windows(
    old: dict[str, WindowState], new: tuple[Window, ...], now: float
) -> dict[str, WindowState]:
    """Windows as last reported; those whose reset has passed are dropped."""
    out = {k: w for k, w in old.items() if w.reset_at is None or w.reset_at > now}
    # Built as validation would leave them, not validated again: `_finite` turns what
    # validation would drop (NaN, infinity) into None. A clock that is not finite (never
    # seen) takes the validated path, which leaves `seen_at` unset.
    seen_at = _finite(now)
    for w in new:
        period, limit, remaining, reset_at = w.period, w.limit, w.remaining, w.reset_at
        key = w.dimension if period is None else f"{w.dimension}:{period}"
        if limit is None and key in out:
            # A response may omit the limit (Azure sends only what remains); limits rarely
            # change.
            limit = out[key].limit
        # `_finite` of each, written out for what a signal gives (None, or a float `x - x`
        # finds finite: it is NaN for NaN and infinities); anything else is converted by it.
        if limit is not None and (type(limit) is not float or limit - limit != 0.0):
            limit = _finite(limit)
        if remaining is not None and (type(remaining) is not float or remaining - remaining != 0.0):
            remaining = _finite(remaining)
        if reset_at is not None and (type(reset_at) is not float or reset_at - reset_at != 0.0):
            reset_at = _finite(reset_at)
        if seen_at is not None:
            out[key] = window_state(limit, remaining, reset_at, seen_at)
        else:
            out[key] = WindowState(limit=limit, remaining=remaining, reset_at=reset_at, seen_at=now)
    return out


def _finite(x: float | None) -> float | None:
    """A number as the state file would hold it: a float, None for NaN or infinity."""
    return float(x) if x is not None and math.isfinite(x) else None


# -- reading the health ---------------------------------------------------------------------------


def decayed_score(h: KeyHealth, now: float, half_life: float) -> float:
    """The error score as of `now`: halved every `half_life` seconds since it was stored."""
    if h.score_at is None or h.error_score == 0.0:
        return h.error_score
    elapsed = max(0.0, now - h.score_at)
    if half_life <= 0.0:
        return 0.0 if elapsed > 0.0 else h.error_score
    return h.error_score * 0.5 ** (elapsed / half_life)


def status(h: KeyHealth, now: float, scope: str = "") -> KeyStatus:
    """Disabled, else whichever of block and cooldown (the key's, or `scope`'s) lasts longer,
    else ready."""
    if h.disabled_reason is not None:
        return KeyStatus("disabled", None, h.disabled_reason)
    if (
        h.blocked_until is None
        and h.cooling_until is None
        and (not scope or (s := h.scopes.get(scope)) is None or s.cooling_until is None)
    ):
        return _READY  # nothing was ever running: the usual key, on every answer and admission
    blocked = _running(h.blocked_until, now)
    cooling, reason = _cooling_for(h, now, scope)
    if blocked is not None and (cooling is None or blocked >= cooling):
        return KeyStatus("blocked", blocked, h.blocked_reason)
    if cooling is not None:
        return KeyStatus("cooling", cooling, reason)
    return _READY


_READY: Final = KeyStatus("ready", None, None)
"""A ready key's status, the usual answer: one value (it is frozen), not one per call."""


def _cooling_for(h: KeyHealth, now: float, scope: str) -> tuple[float | None, str | None]:
    """The cooldown still running for `scope` (the key's or the scope's, whichever lasts
    longer) and its reason."""
    cooling, reason = _running(h.cooling_until, now), h.cooling_reason
    s = h.scopes.get(scope) if scope else None
    if s is None:
        return cooling, reason
    mine = _running(s.cooling_until, now)
    if mine is not None and (cooling is None or mine > cooling):
        return mine, s.cooling_reason
    return cooling, reason


def usable(
    h: KeyHealth,
    now: float,
    paced: frozenset[str] = frozenset(),
    cap: float = math.inf,
    scope: str = "",
) -> bool:
    """Ready for a request of `scope`, and no known window (the key's or the scope's) is
    exhausted until a reset still to come (a report holds the key back at most `cap` seconds
    after it was seen)."""
    return status(h, now, scope).state == "ready" and not held_back(h, now, paced, cap, scope)


def held_back(
    h: KeyHealth,
    now: float,
    paced: frozenset[str] = frozenset(),
    cap: float = math.inf,
    scope: str = "",
) -> bool:
    """Whether a known window (the key's or the scope's) is exhausted until a reset still to
    come: what keeps a ready key from being `usable` (same arguments)."""
    if not h.windows and (not scope or scope not in h.scopes or not h.scopes[scope].windows):
        return False  # no window known to hold it back: asked on every answer and admission
    return bool(_exhausted(h, now, paced, cap, scope))


def next_usable_at(
    h: KeyHealth,
    now: float,
    policy: Policy | None = None,
    paced: frozenset[str] = frozenset(),
    scope: str = "",
) -> float | None:
    """When the key becomes usable for `scope` (`now` if it is); None when disabled with no
    recheck due.

    With `policy.auth_recheck_seconds`, a disabled key is due for one try that long after.
    """
    if h.disabled_reason is not None:
        recheck = _recheck_at(h, policy.auth_recheck_seconds if policy else None)
        return None if recheck is None else max(now, recheck)
    cooling, _ = _cooling_for(h, now, scope)
    times = [now, cooling or now, h.blocked_until or now]
    cap = policy.max_cooldown_seconds if policy else math.inf
    return max(times + [_frees_at(w, cap) for w in _exhausted(h, now, paced, cap, scope)])


def headroom(h: KeyHealth, now: float, scope: str = "", skip: tuple[str, ...] = ()) -> float:
    """Remaining fraction (0..1) of the tightest window still running (the key's or the
    scope's); 1.0 when none is known. Windows of a dimension in `skip` (say, the requests a
    shared store already counts) are left out."""
    fractions = [
        _fraction(w)
        for name, w in _named_windows(h, scope)
        if w.reset_at is not None and w.reset_at > now and name.split(":")[0] not in skip
    ]
    return min((f for f in fractions if f is not None), default=1.0)


def _windows(h: KeyHealth, scope: str) -> list[WindowState]:
    """The windows that bind a request of `scope`: the key's, and the scope's own."""
    return [w for _, w in _named_windows(h, scope)]


def _named_windows(h: KeyHealth, scope: str) -> list[tuple[str, WindowState]]:
    s = h.scopes.get(scope) if scope else None
    return [*h.windows.items(), *(s.windows.items() if s is not None else ())]


def _fraction(w: WindowState) -> float | None:
    if w.remaining is None:
        return None
    if w.remaining <= 0:
        return 0.0
    if w.limit is None or w.limit <= 0:
        return None
    return min(1.0, w.remaining / w.limit)


def _exhausted(
    h: KeyHealth,
    now: float,
    paced: frozenset[str] = frozenset(),
    cap: float = math.inf,
    scope: str = "",
) -> list[WindowState]:
    """Windows (the key's and `scope`'s) with nothing left until a reset still to come;
    `paced` dimensions are left out (local limits pace them exactly, which a provider's coarse
    reset time cannot). A report binds at most `cap` seconds after it was seen: then a request
    may look again."""
    s = h.scopes.get(scope) if scope else None
    named = [*h.windows.items(), *(s.windows.items() if s is not None else ())]
    return [
        w
        for name, w in named
        if name.split(":", 1)[0] not in paced
        if w.remaining is not None and w.remaining <= 0 and _frees_at(w, cap) > now
    ]


def _frees_at(w: WindowState, cap: float) -> float:
    """When an exhausted window stops holding its key back: its reset, capped."""
    reset = w.reset_at if w.reset_at is not None else -math.inf
    return min(reset, w.seen_at + cap)


def _first_exhausted_reset(h: KeyHealth, now: float) -> float | None:
    return _first_reset(h.windows, now)


def _first_reset(windows: dict[str, WindowState], now: float) -> float | None:
    """The earliest reset still to come of an exhausted window."""
    spent = [w.reset_at for w in windows.values() if w.remaining is not None and w.remaining <= 0]
    return min((r for r in spent if r is not None and r > now), default=None)


def _running(until: float | None, now: float) -> float | None:
    return until if until is not None and until > now else None


def _recheck_at(h: KeyHealth, recheck_seconds: float | None) -> float | None:
    if h.disabled_reason is None or recheck_seconds is None or h.disabled_at is None:
        return None
    return h.disabled_at + recheck_seconds


def observe_windows(h: KeyHealth, windows: tuple[Window, ...], now: float) -> KeyHealth:
    """The key's health with quota windows learnt outside a request (a usage endpoint)."""
    merged = _merge_windows(h.windows, windows, now)
    return updated(h, {"windows": merged, "updated_at": now})
