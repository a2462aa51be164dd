"""The shortcuts of a success's health update give what the general code gives."""

from __future__ import annotations

import math

import pytest

from kmi_rotor.core import health as hl
from kmi_rotor.core.health import (
    MAX_SCOPES,
    SCOPE_TTL,
    KeyHealth,
    Policy,
    ScopedHealth,
    WindowState,
    apply_signal,
)
from kmi_rotor.core.health_records import window_state
from kmi_rotor.core.signals import FailureKind, Signal, Window

NOW = 1795793400.0


def _reference_live(
    scopes: dict[str, ScopedHealth], now: float, ttl: float = SCOPE_TTL
) -> dict[str, ScopedHealth]:
    """`_live_scopes` as it was written before its shortcut."""
    live = {k: s for k, s in scopes.items() if s.seen_at > now - ttl or hl._still_cooling(s, now)}
    if len(live) > MAX_SCOPES:
        newest = sorted(live, key=lambda k: live[k].seen_at, reverse=True)[:MAX_SCOPES]
        live = {k: live[k] for k in newest}
    return scopes if len(live) == len(scopes) else live


def _scopes(n: int, seen_at: float, cooling_until: float | None = None) -> dict[str, ScopedHealth]:
    return {
        f"model:m{i}": ScopedHealth(seen_at=seen_at - i, cooling_until=cooling_until)
        for i in range(n)
    }


SCOPE_CASES = [
    ("none", {}),
    ("one fresh", _scopes(1, NOW)),
    ("one stale", _scopes(1, NOW - SCOPE_TTL - 5)),
    ("one at the ttl", _scopes(1, NOW - SCOPE_TTL)),
    ("stale but cooling", _scopes(1, NOW - SCOPE_TTL - 5, cooling_until=NOW + 1)),
    ("stale, cooling over", _scopes(1, NOW - SCOPE_TTL - 5, cooling_until=NOW)),
    ("fresh and stale", {**_scopes(2, NOW), "model:old": ScopedHealth(seen_at=0.0)}),
    ("the most kept", _scopes(MAX_SCOPES, NOW)),
    ("one too many", _scopes(MAX_SCOPES + 1, NOW)),
    ("far too many, some stale", _scopes(MAX_SCOPES + 10, NOW - SCOPE_TTL + 5)),
    ("never seen", {"model:m": ScopedHealth()}),
]


@pytest.mark.parametrize("now", [NOW, 0.0, math.nan, math.inf, -math.inf, 1e300])
@pytest.mark.parametrize(("label", "scopes"), SCOPE_CASES, ids=[c[0] for c in SCOPE_CASES])
def test_live_scopes_agree_with_the_general_filter(
    label: str, scopes: dict[str, ScopedHealth], now: float
) -> None:
    mine, theirs = hl._live_scopes(scopes, now), _reference_live(scopes, now)
    assert mine == theirs, label
    assert list(mine) == list(theirs), label
    assert (mine is scopes) == (theirs is scopes), label


@pytest.mark.parametrize(
    "values",
    [(1.0, 2.0, 3.0, 4.0), (None, None, None, 0.0), (0.0, -1.0, None, NOW), (1e308, 0.5, 1.0, 2.0)],
)
def test_a_window_state_is_what_of_and_validation_make(
    values: tuple[float | None, float | None, float | None, float],
) -> None:
    mine = window_state(*values)
    of = WindowState.of(*values)
    valid = WindowState(limit=values[0], remaining=values[1], reset_at=values[2], seen_at=values[3])
    for other in (of, valid):
        assert mine == other
        assert repr(mine) == repr(other)
        assert mine.model_fields_set == other.model_fields_set
        assert mine.model_dump_json() == other.model_dump_json()
        assert mine.__dict__.keys() == other.__dict__.keys()
    assert mine.model_fields_set is not window_state(*values).model_fields_set
    mine.limit = 9.0  # one window's change touches no other
    assert of.limit == values[0]


def _reference_seen(
    h: KeyHealth, windows: tuple[Window, ...], now: float, scope: str
) -> dict[str, object]:
    """The update recording a success's windows, as `_seen` made it before its shortcuts
    (each record copied by pydantic's `model_copy`)."""
    if not scope:
        return {"windows": hl._merge_windows(h.windows, windows, now)}
    old = h.scopes.get(scope) or ScopedHealth()
    update: dict[str, object] = {
        "windows": hl._merge_windows(old.windows, windows, now),
        "seen_at": now,
    }
    if old.rate_limit_streak:
        update["rate_limit_streak"] = 0
    scopes = h.scopes.copy()
    scopes[scope] = old.model_copy(update=update)
    return {"scopes": _reference_live(scopes, now)}


def _reference_success(
    h: KeyHealth, sig: Signal, now: float, policy: Policy, scope: str
) -> KeyHealth:
    """A success applied as before its shortcuts: the update merged from its three parts."""
    seen = _reference_seen(h, sig.windows, now, scope)
    update: dict[str, object] = {"rate_limit_streak": 0, "overload_streak": 0}
    recheck = hl._recheck_at(h, policy.auth_recheck_seconds)
    if recheck is not None and now >= recheck:
        update |= {"disabled_reason": None, "disabled_at": None}
    return h.model_copy(update={**seen, **update, "updated_at": now})


WINDOWS = (Window("requests", None, 10.0, 9.0, NOW + 1), Window("tokens", "minute", 5.0, 0.0, None))
HEALTHS = [
    KeyHealth(),
    KeyHealth(rate_limit_streak=3, overload_streak=2, error_score=1.5, score_at=NOW - 10),
    KeyHealth(disabled_reason="invalid key (401)", disabled_at=NOW - 100),
    KeyHealth(disabled_reason="invalid key (401)", disabled_at=NOW - 5),
    KeyHealth(disabled_reason="invalid key (401)"),
    KeyHealth(
        windows={"requests": WindowState(limit=10, remaining=0, reset_at=NOW + 5, seen_at=NOW)},
        scopes={
            "model:a": ScopedHealth(rate_limit_streak=2, seen_at=NOW - 1, cooling_until=NOW + 9),
            "model:old": ScopedHealth(seen_at=NOW - SCOPE_TTL - 1),
        },
    ),
]


@pytest.mark.parametrize("recheck", [None, 30.0])
@pytest.mark.parametrize("scope", ["", "model:a", "model:new"])
@pytest.mark.parametrize("windows", [(), WINDOWS])
@pytest.mark.parametrize("h", HEALTHS)
def test_a_success_is_applied_as_before(
    h: KeyHealth, windows: tuple[Window, ...], scope: str, recheck: float | None
) -> None:
    policy = Policy(auth_recheck_seconds=recheck)
    sig = Signal(200, FailureKind.OK, None, windows, "ok")
    mine = apply_signal(h, sig, NOW, policy, scope=scope)
    theirs = _reference_success(h, sig, NOW, policy, scope)
    assert mine == theirs
    assert repr(mine) == repr(theirs)
    assert mine.model_fields_set == theirs.model_fields_set
    assert mine.model_dump_json() == theirs.model_dump_json()
    for name in set(mine.scopes) & set(theirs.scopes):
        assert mine.scopes[name].model_fields_set == theirs.scopes[name].model_fields_set
    assert mine.model_fields_set is not h.model_fields_set  # the record's own


HELD = [
    KeyHealth(),
    KeyHealth(
        windows={"requests": WindowState(limit=10, remaining=0, reset_at=NOW + 5, seen_at=NOW)}
    ),
    KeyHealth(
        windows={"tokens": WindowState(limit=10, remaining=3, reset_at=NOW + 5, seen_at=NOW)}
    ),
    KeyHealth(scopes={"model:a": ScopedHealth(seen_at=NOW)}),
    KeyHealth(
        scopes={
            "model:a": ScopedHealth(
                windows={"requests": WindowState(remaining=0, reset_at=NOW + 5, seen_at=NOW)}
            )
        }
    ),
]


@pytest.mark.parametrize("cap", [math.inf, 1.0])
@pytest.mark.parametrize("paced", [frozenset(), frozenset({"requests"})])
@pytest.mark.parametrize("scope", ["", "model:a", "model:b"])
@pytest.mark.parametrize("h", HELD)
def test_held_back_is_whether_any_window_is_exhausted(
    h: KeyHealth, scope: str, paced: frozenset[str], cap: float
) -> None:
    assert hl.held_back(h, NOW, paced, cap, scope) == bool(hl._exhausted(h, NOW, paced, cap, scope))


def _status_as_before(h: KeyHealth, now: float, scope: str) -> hl.KeyStatus:
    """`status` as written before its shortcut for a key with nothing running."""
    if h.disabled_reason is not None:
        return hl.KeyStatus("disabled", None, h.disabled_reason)
    blocked = hl._running(h.blocked_until, now)
    cooling, reason = hl._cooling_for(h, now, scope)
    if blocked is not None and (cooling is None or blocked >= cooling):
        return hl.KeyStatus("blocked", blocked, h.blocked_reason)
    if cooling is not None:
        return hl.KeyStatus("cooling", cooling, reason)
    return hl._READY


STATUSES = [
    KeyHealth(),
    KeyHealth(disabled_reason="invalid key (401)"),
    KeyHealth(blocked_until=NOW + 5, blocked_reason="quota"),
    KeyHealth(blocked_until=NOW - 5, blocked_reason="quota"),
    KeyHealth(cooling_until=NOW + 5, cooling_reason="rate limited"),
    KeyHealth(cooling_until=NOW, cooling_reason="rate limited"),
    KeyHealth(cooling_reason="left over"),
    KeyHealth(blocked_until=NOW + 5, cooling_until=NOW + 9, cooling_reason="r", blocked_reason="q"),
    KeyHealth(scopes={"model:a": ScopedHealth(cooling_until=NOW + 3, cooling_reason="scoped")}),
    KeyHealth(scopes={"model:a": ScopedHealth(cooling_until=NOW - 3, cooling_reason="over")}),
    KeyHealth(
        cooling_until=NOW + 1,
        cooling_reason="key",
        scopes={"model:a": ScopedHealth(cooling_until=NOW + 3, cooling_reason="scoped")},
    ),
    KeyHealth(scopes={"model:a": ScopedHealth(seen_at=NOW)}),
]


@pytest.mark.parametrize("now", [NOW, NOW + 10, math.nan])
@pytest.mark.parametrize("scope", ["", "model:a", "model:b"])
@pytest.mark.parametrize("h", STATUSES)
def test_status_is_what_it_was(h: KeyHealth, scope: str, now: float) -> None:
    mine, theirs = hl.status(h, now, scope), _status_as_before(h, now, scope)
    assert repr(mine) == repr(theirs)


def _reference_merge(
    old: dict[str, WindowState], new: tuple[Window, ...], now: float
) -> dict[str, WindowState]:
    """`_merge_windows` as written before its shortcuts: every value through `_finite`, every
    window validated."""
    out = {k: w for k, w in old.items() if w.reset_at is None or w.reset_at > now}
    for w in new:
        key = w.dimension if w.period is None else f"{w.dimension}:{w.period}"
        limit = w.limit if w.limit is not None else (out[key].limit if key in out else None)
        out[key] = WindowState(
            limit=hl._finite(limit),
            remaining=hl._finite(w.remaining),
            reset_at=hl._finite(w.reset_at),
            seen_at=now,
        )
    return out


ODD_VALUES = [None, 0.0, -0.0, 3.5, 7, True, 10**20, 1e308, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("value", ODD_VALUES)
@pytest.mark.parametrize("period", [None, "minute"])
def test_windows_merge_as_validation_would_leave_them(
    value: float | None, period: str | None
) -> None:
    old = {
        "requests": WindowState(limit=10, remaining=1, reset_at=NOW + 5, seen_at=NOW - 1),
        "tokens:minute": WindowState(limit=99, remaining=1, reset_at=NOW - 5, seen_at=NOW - 9),
    }
    new = (
        Window("requests", period, value, value, value),
        Window("tokens", period, None, value, NOW + 1),
        Window("requests", None, None, 2.0, None),
    )
    mine, theirs = hl._merge_windows(old, new, NOW), _reference_merge(old, new, NOW)
    assert list(mine) == list(theirs)
    for name, w in mine.items():
        assert repr(w) == repr(theirs[name])
        assert [type(v) for v in w.__dict__.values()] == [
            type(v) for v in theirs[name].__dict__.values()
        ]
        assert w.model_dump_json() == theirs[name].model_dump_json()
