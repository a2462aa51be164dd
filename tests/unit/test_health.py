"""What each response does to a key: cooldowns, blocks, disables, windows and the decaying score."""

from __future__ import annotations

import json

import pytest

from kmi_rotor.core.health import (
    KeyHealth,
    KeyStatus,
    Persisted,
    Policy,
    ScopedHealth,
    WindowState,
    _finite,
    _merge_windows,
    apply_network_error,
    apply_signal,
    decayed_score,
    headroom,
    held_back,
    next_usable_at,
    operator_reset,
    status,
    usable,
)
from kmi_rotor.core.health_records import updated
from kmi_rotor.core.signals import FailureKind, Signal, Window, parse_signal

NOW = 1795793400.0  # Fri, 27 Nov 2026 15:30:00 GMT
POLICY = Policy()
OK, RATE, QUOTA, AUTH, OVER, CLIENT = (
    FailureKind.OK,
    FailureKind.RATE_LIMITED,
    FailureKind.QUOTA,
    FailureKind.AUTH,
    FailureKind.OVERLOADED,
    FailureKind.CLIENT_ERROR,
)
STATUS = {OK: 200, RATE: 429, QUOTA: 402, AUTH: 401, OVER: 503, CLIENT: 400}


def sig(
    kind: FailureKind,
    retry_at: float | None = None,
    windows: tuple[Window, ...] = (),
    reason: str | None = None,
) -> Signal:
    return Signal(STATUS[kind], kind, retry_at, windows, reason or kind.value)


def apply(h: KeyHealth, s: Signal, now: float = NOW, **kw: object) -> KeyHealth:
    return apply_signal(h, s, now, POLICY, **kw)  # type: ignore[arg-type]


def exhausted(reset_at: float | None, dim: str = "requests") -> Window:
    return Window(dim, None, 60, 0, reset_at)


# -- rate limits ----------------------------------------------------------------------------------

RATE_CASES = [
    # (id, cooling_until before, streak before, retry_at, windows, cooling_until after)
    ("first-backoff", None, 0, None, (), NOW + 2),
    ("second-backoff", None, 1, None, (), NOW + 4),
    ("fourth-backoff", None, 3, None, (), NOW + 16),
    ("backoff-capped", None, 20, None, (), NOW + 3600),
    ("huge-streak-no-overflow", None, 10_000, None, (), NOW + 3600),
    ("retry-after", None, 0, NOW + 30, (), NOW + 30),
    ("retry-after-wins-over-streak", None, 5, NOW + 3, (), NOW + 3),
    ("retry-after-capped", None, 0, NOW + 7200, (), NOW + 3600),
    ("exhausted-window", None, 0, None, (exhausted(NOW + 45),), NOW + 45),
    (
        "earliest-exhausted-window",
        None,
        0,
        None,
        (exhausted(NOW + 45), exhausted(NOW + 20, "tokens")),
        NOW + 20,
    ),
    ("retry-after-beats-window", None, 0, NOW + 5, (exhausted(NOW + 45),), NOW + 5),
    ("never-shortened", NOW + 100, 0, NOW + 30, (), NOW + 100),
    ("never-shortened-by-backoff", NOW + 100, 0, None, (), NOW + 100),
    ("lengthened", NOW + 10, 0, NOW + 30, (), NOW + 30),
    ("expired-cooldown-replaced", NOW - 5, 0, NOW + 30, (), NOW + 30),
]


@pytest.mark.parametrize(
    ("before", "streak", "retry_at", "windows", "after"),
    [c[1:] for c in RATE_CASES],
    ids=[c[0] for c in RATE_CASES],
)
def test_rate_limited_cools_down(
    before: float | None,
    streak: int,
    retry_at: float | None,
    windows: tuple[Window, ...],
    after: float,
) -> None:
    h = KeyHealth(cooling_until=before, cooling_reason="earlier", rate_limit_streak=streak)
    new = apply(h, sig(RATE, retry_at, windows, "rate limited"))
    assert new.cooling_until == after
    assert new.rate_limit_streak == streak + 1
    assert new.cooling_reason == ("earlier" if after == before else "rate limited")
    assert new.disabled_reason is None and new.blocked_until is None
    assert status(new, NOW) == KeyStatus("cooling", after, new.cooling_reason)
    assert not usable(new, NOW)
    back = next_usable_at(new, NOW)
    assert back is not None and back >= after and usable(new, back)


def test_backoff_grows_per_consecutive_429_and_restarts_after_a_success() -> None:
    h, cooldowns, now = KeyHealth(), [], NOW
    for _ in range(4):
        h = apply(h, sig(RATE), now)
        cooldowns.append(h.cooling_until - now)  # type: ignore[operator]
        now = h.cooling_until  # type: ignore[assignment]
    assert cooldowns == [2, 4, 8, 16]
    h = apply(h, sig(OK), now)
    assert h.rate_limit_streak == 0
    assert apply(h, sig(RATE), now).cooling_until == now + 2


def test_success_while_cooling_keeps_the_cooldown() -> None:
    h = apply(KeyHealth(), sig(RATE, NOW + 60))
    after = apply(h, sig(OK), NOW + 1)
    assert after.cooling_until == NOW + 60
    assert (after.rate_limit_streak, after.overload_streak) == (0, 0)
    assert status(after, NOW + 1).state == "cooling"


def test_policy_changes_the_arithmetic() -> None:
    policy = Policy(max_cooldown_seconds=10, rate_limit_backoff=3)
    h = KeyHealth(rate_limit_streak=1)
    assert apply_signal(h, sig(RATE), NOW, policy).cooling_until == NOW + 6
    assert apply_signal(h, sig(RATE, NOW + 60), NOW, policy).cooling_until == NOW + 10


# -- quotas ---------------------------------------------------------------------------------------

QUOTA_CASES = [
    # (id, blocked_until before, retry_at, windows, blocked_until after)
    ("no-reset", None, None, (), NOW + 3600),
    ("retry-at", None, NOW + 86400, (), NOW + 86400),
    ("beyond-cooldown-cap", None, NOW + 20 * 86400, (), NOW + 20 * 86400),
    ("window-reset", None, None, (exhausted(NOW + 7200),), NOW + 7200),
    ("never-shortened", NOW + 86400, NOW + 60, (), NOW + 86400),
    ("lengthened", NOW + 60, NOW + 86400, (), NOW + 86400),
    ("expired-block-replaced", NOW - 1, None, (), NOW + 3600),
]


@pytest.mark.parametrize(
    ("before", "retry_at", "windows", "after"),
    [c[1:] for c in QUOTA_CASES],
    ids=[c[0] for c in QUOTA_CASES],
)
def test_quota_blocks_until_the_reset(
    before: float | None, retry_at: float | None, windows: tuple[Window, ...], after: float
) -> None:
    h = KeyHealth(blocked_until=before, blocked_reason="earlier")
    new = apply(h, sig(QUOTA, retry_at, windows, "insufficient_quota"))
    assert new.blocked_until == after
    assert new.blocked_reason == ("earlier" if after == before else "insufficient_quota")
    assert status(new, NOW) == KeyStatus("blocked", after, new.blocked_reason)
    assert new.cooling_until is None and new.disabled_reason is None
    assert next_usable_at(new, NOW) == after


# -- bad keys -------------------------------------------------------------------------------------


def test_auth_disables_until_an_operator_reset() -> None:
    h = apply(KeyHealth(), sig(AUTH, reason="invalid key (401)"))
    assert (h.disabled_reason, h.disabled_at) == ("invalid key (401)", NOW)
    for later in (NOW, NOW + 86400, NOW + 365 * 86400):
        assert status(h, later) == KeyStatus("disabled", None, "invalid key (401)")
        assert not usable(h, later)
        assert next_usable_at(h, later) is None
        assert next_usable_at(h, later, POLICY) is None
    # An answer to a request that was already in flight does not re-enable the key.
    assert apply(h, sig(OK), NOW + 1).disabled_reason == "invalid key (401)"
    reset = operator_reset(h, NOW + 5)
    assert status(reset, NOW + 5) == KeyStatus("ready", None, None)
    assert usable(reset, NOW + 5)


def test_auth_recheck_offers_one_try_after_the_interval() -> None:
    policy = Policy(auth_recheck_seconds=600)
    h = apply_signal(KeyHealth(), sig(AUTH), NOW, policy)
    assert status(h, NOW + 700).state == "disabled"
    assert next_usable_at(h, NOW, policy) == NOW + 600
    assert next_usable_at(h, NOW + 700, policy) == NOW + 700
    # An in-flight success before the recheck is due changes nothing...
    assert apply_signal(h, sig(OK), NOW + 10, policy).disabled_reason is not None
    # ...the recheck's success re-enables the key, its failure starts a new interval.
    assert apply_signal(h, sig(OK), NOW + 600, policy).disabled_reason is None
    again = apply_signal(h, sig(AUTH), NOW + 600, policy)
    assert next_usable_at(again, NOW + 600, policy) == NOW + 1200


# -- overloads, network errors, bad requests ------------------------------------------------------

OVERLOAD_CASES = [
    # (id, streak before, cooling_until before, retry_at, cooling_until after)
    ("first", 0, None, None, NOW + 1),
    ("second", 1, None, None, NOW + 2),
    ("fifth", 4, None, None, NOW + 16),
    ("capped", 5, None, None, NOW + 30),
    ("huge-streak", 10_000, None, None, NOW + 30),
    ("retry-after-honoured", 0, None, NOW + 10, NOW + 10),
    ("retry-after-capped", 0, None, NOW + 600, NOW + 30),
    ("retry-after-shorter-than-backoff", 3, None, NOW + 1, NOW + 8),
    ("never-shortens", 0, NOW + 120, None, NOW + 120),
]


@pytest.mark.parametrize(
    ("streak", "before", "retry_at", "after"),
    [c[1:] for c in OVERLOAD_CASES],
    ids=[c[0] for c in OVERLOAD_CASES],
)
def test_overload_backs_off_briefly(
    streak: int, before: float | None, retry_at: float | None, after: float
) -> None:
    h = KeyHealth(overload_streak=streak, cooling_until=before)
    new = apply(h, sig(OVER, retry_at, reason="overloaded (529)"))
    assert new.cooling_until == after
    assert new.overload_streak == streak + 1
    assert new.disabled_reason is None and new.blocked_until is None
    assert new.error_score == 1.0


@pytest.mark.parametrize("streak", [0, 1, 4, 50])
def test_network_error_is_an_overload(streak: int) -> None:
    h = KeyHealth(overload_streak=streak)
    assert apply_network_error(h, NOW, POLICY) == apply(
        h, sig(OVER, reason="network error")
    ).model_copy(update={"windows": {}})


def test_network_error_reason() -> None:
    h = apply_network_error(KeyHealth(), NOW, POLICY, reason="connection reset")
    assert (h.cooling_reason, h.cooling_until, h.updated_at) == ("connection reset", NOW + 1, NOW)


@pytest.mark.parametrize("kind", [OVER, None], ids=["overload", "network"])
def test_outage_costs_nothing(kind: FailureKind | None) -> None:
    h = KeyHealth(overload_streak=2, error_score=0.5, score_at=NOW - 10)
    if kind is None:
        new = apply_network_error(h, NOW, POLICY, outage=True)
    else:
        new = apply(h, sig(kind, NOW + 20), outage=True)
    assert new.model_copy(update={"updated_at": 0.0}) == h
    assert usable(new, NOW)


def test_client_error_costs_nothing() -> None:
    h = KeyHealth(rate_limit_streak=2, overload_streak=1, error_score=3.0, score_at=NOW - 5)
    new = apply(h, sig(CLIENT, NOW + 60))
    assert new.model_copy(update={"updated_at": 0.0}) == h
    assert new.updated_at == NOW and usable(new, NOW)


# -- every kind, side by side ---------------------------------------------------------------------

ACTION_CASES = [
    # (kind, state after, until, streaks after (rate, overload), score after)
    (OK, "ready", None, (0, 0), 0.0),
    (RATE, "cooling", NOW + 2 * 2**3, (4, 2), 1.0),
    (QUOTA, "blocked", NOW + 3600, (3, 2), 1.0),
    (AUTH, "disabled", None, (3, 2), 1.0),
    (OVER, "cooling", NOW + 4, (3, 3), 1.0),
    (CLIENT, "ready", None, (3, 2), 0.0),
]


@pytest.mark.parametrize(
    ("kind", "state", "until", "streaks", "score"), ACTION_CASES, ids=[c[0] for c in ACTION_CASES]
)
def test_each_kind_has_its_action(
    kind: FailureKind,
    state: str,
    until: float | None,
    streaks: tuple[int, int],
    score: float,
) -> None:
    h = KeyHealth(rate_limit_streak=3, overload_streak=2)
    new = apply(h, sig(kind))
    assert status(new, NOW) == KeyStatus(state, until, None if state == "ready" else kind.value)  # type: ignore[arg-type]
    assert (new.rate_limit_streak, new.overload_streak) == streaks
    assert new.error_score == score
    assert new.updated_at == NOW
    assert h == KeyHealth(rate_limit_streak=3, overload_streak=2)  # the input is never changed


# -- error score ----------------------------------------------------------------------------------

DECAY_CASES = [
    # (id, score, score_at, now, half_life, expected)
    ("fresh", 1.0, NOW, NOW, 300, 1.0),
    ("one-half-life", 1.0, NOW, NOW + 300, 300, 0.5),
    ("two-half-lives", 4.0, NOW, NOW + 600, 300, 1.0),
    ("an-hour-ago", 1.0, NOW, NOW + 3600, 300, 0.5**12),
    ("never-stored", 0.0, None, NOW, 300, 0.0),
    ("clock-went-back", 2.0, NOW, NOW - 100, 300, 2.0),
    ("zero-half-life", 2.0, NOW, NOW + 1, 0, 0.0),
]


@pytest.mark.parametrize(
    ("score", "score_at", "now", "half_life", "expected"),
    [c[1:] for c in DECAY_CASES],
    ids=[c[0] for c in DECAY_CASES],
)
def test_decayed_score(
    score: float, score_at: float | None, now: float, half_life: float, expected: float
) -> None:
    h = KeyHealth(error_score=score, score_at=score_at)
    assert decayed_score(h, now, half_life) == pytest.approx(expected)


def test_each_failure_adds_one_to_the_decayed_score() -> None:
    h = apply(KeyHealth(), sig(RATE))
    h = apply(h, sig(OVER), NOW)
    assert (h.error_score, h.score_at) == (2.0, NOW)
    h = apply(h, sig(QUOTA), NOW + 300)
    assert (h.error_score, h.score_at) == (2.0, NOW + 300)  # 2 halved, plus 1
    assert decayed_score(h, NOW + 3900, POLICY.half_life_seconds) < 0.001
    assert apply(h, sig(OK), NOW + 300).error_score == 2.0  # successes do not erase history


# -- windows, usable, next_usable_at, headroom ----------------------------------------------------


def test_every_response_updates_the_windows() -> None:
    ok = sig(
        OK,
        windows=(
            Window("requests", None, 10000, 9999, NOW + 0.5),
            Window("tokens", "minute", 30000, 25000, NOW + 6),
        ),
    )
    h = apply(KeyHealth(), ok)
    assert h.windows == {
        "requests": WindowState(limit=10000, remaining=9999, reset_at=NOW + 0.5, seen_at=NOW),
        "tokens:minute": WindowState(limit=30000, remaining=25000, reset_at=NOW + 6, seen_at=NOW),
    }
    # A response without a limit (Azure) keeps the known one; a passed reset drops the window.
    later = apply(h, sig(OK, windows=(Window("tokens", "minute", None, 100, NOW + 9),)), NOW + 3)
    assert later.windows == {
        "tokens:minute": WindowState(limit=30000, remaining=100, reset_at=NOW + 9, seen_at=NOW + 3)
    }


def test_recorded_windows_read_back_from_the_state_file_unchanged() -> None:
    odd = (
        Window("requests", None, float("nan"), float("inf"), NOW + 1),
        Window("tokens", "minute", 30000, -float("inf"), None),
    )
    h = apply(KeyHealth(), sig(OK, windows=odd), NOW)
    assert h.windows == {
        "requests": WindowState(limit=None, remaining=None, reset_at=NOW + 1, seen_at=NOW),
        "tokens:minute": WindowState(limit=30000.0, remaining=None, reset_at=None, seen_at=NOW),
    }
    assert KeyHealth.model_validate_json(h.model_dump_json()) == h
    assert all(type(v) is float for w in h.windows.values() for v in (w.limit, w.seen_at) if v)


USABLE_CASES = [
    # (id, health, usable, next_usable_at, headroom)
    ("fresh", KeyHealth(), True, NOW, 1.0),
    ("cooling", KeyHealth(cooling_until=NOW + 10), False, NOW + 10, 1.0),
    ("cooling-over", KeyHealth(cooling_until=NOW - 1), True, NOW, 1.0),
    ("blocked", KeyHealth(blocked_until=NOW + 99), False, NOW + 99, 1.0),
    (
        "blocked-and-cooling",
        KeyHealth(blocked_until=NOW + 50, cooling_until=NOW + 80),
        False,
        NOW + 80,
        1.0,
    ),
    ("disabled", KeyHealth(disabled_reason="invalid key", disabled_at=NOW), False, None, 1.0),
    (
        "exhausted-window",
        KeyHealth(windows={"requests": WindowState(limit=3, remaining=0, reset_at=NOW + 40)}),
        False,
        NOW + 40,
        0.0,
    ),
    (
        "exhausted-window-reset-passed",
        KeyHealth(windows={"requests": WindowState(limit=3, remaining=0, reset_at=NOW - 1)}),
        True,
        NOW,
        1.0,
    ),
    (
        "exhausted-window-reset-unknown",
        KeyHealth(windows={"requests": WindowState(limit=3, remaining=0)}),
        True,
        NOW,
        1.0,
    ),
    (
        "exhausted-window-outlasts-cooldown",
        KeyHealth(
            cooling_until=NOW + 5,
            windows={
                "requests": WindowState(limit=3, remaining=0, reset_at=NOW + 40),
                "tokens": WindowState(limit=100, remaining=0, reset_at=NOW + 20),
            },
        ),
        False,
        NOW + 40,
        0.0,
    ),
    (
        "tightest-window",
        KeyHealth(
            windows={
                "requests": WindowState(limit=100, remaining=50, reset_at=NOW + 30),
                "tokens": WindowState(limit=10000, remaining=1000, reset_at=NOW + 30),
                "tokens:day": WindowState(limit=100, remaining=1, reset_at=NOW - 1),
                "input_tokens": WindowState(remaining=5, reset_at=NOW + 30),
                "output_tokens": WindowState(limit=10, remaining=20, reset_at=NOW + 30),
            }
        ),
        True,
        NOW,
        0.1,
    ),
    (
        "unified-rejected",
        KeyHealth(windows={"unified": WindowState(remaining=0, reset_at=NOW + 3 * 3600)}),
        False,
        NOW + 3 * 3600,
        0.0,
    ),
]


@pytest.mark.parametrize(
    ("h", "is_usable", "at", "room"),
    [c[1:] for c in USABLE_CASES],
    ids=[c[0] for c in USABLE_CASES],
)
def test_usable_next_usable_at_headroom(
    h: KeyHealth, is_usable: bool, at: float | None, room: float
) -> None:
    assert usable(h, NOW) is is_usable
    assert next_usable_at(h, NOW) == at
    assert headroom(h, NOW) == pytest.approx(room)


_SPENT = WindowState(limit=3, remaining=0, reset_at=NOW + 40, seen_at=NOW - 10)


@pytest.mark.parametrize(
    ("h", "kwargs", "held"),
    [
        (KeyHealth(), {}, False),
        (KeyHealth(windows={"requests": _SPENT}), {}, True),
        (KeyHealth(windows={"requests": _SPENT}), {"paced": frozenset({"requests"})}, False),
        (KeyHealth(windows={"requests:day": _SPENT}), {"paced": frozenset({"requests"})}, False),
        (KeyHealth(windows={"requests": _SPENT}), {"cap": 5.0}, False),  # seen 10 s ago
        (KeyHealth(windows={"requests": _SPENT}), {"cap": 60.0}, True),
        (KeyHealth(windows={"requests": _SPENT.model_copy(update={"reset_at": NOW})}), {}, False),
        (KeyHealth(windows={"requests": _SPENT.model_copy(update={"reset_at": None})}), {}, False),
        (KeyHealth(windows={"requests": _SPENT.model_copy(update={"remaining": -1})}), {}, True),
        (KeyHealth(windows={"requests": _SPENT.model_copy(update={"remaining": None})}), {}, False),
        (KeyHealth(windows={"requests": _SPENT.model_copy(update={"remaining": 1})}), {}, False),
        # A cooling key's exhausted window still holds it back: the two are asked apart.
        (KeyHealth(cooling_until=NOW + 5, windows={"tokens": _SPENT}), {}, True),
        (
            KeyHealth(scopes={"model:m": ScopedHealth(windows={"tokens": _SPENT})}),
            {"scope": "model:m"},
            True,
        ),
        (KeyHealth(scopes={"model:m": ScopedHealth(windows={"tokens": _SPENT})}), {}, False),
        (
            KeyHealth(scopes={"model:m": ScopedHealth(windows={"tokens": _SPENT})}),
            {"scope": "model:n"},
            False,
        ),
    ],
)
def test_held_back(h: KeyHealth, kwargs: dict[str, object], held: bool) -> None:
    assert held_back(h, NOW, **kwargs) is held  # type: ignore[arg-type]
    ready = status(h, NOW, str(kwargs.get("scope", ""))).state == "ready"
    assert usable(h, NOW, **kwargs) is (ready and not held)  # type: ignore[arg-type]


def test_a_ready_status_carries_no_time_or_reason() -> None:
    assert status(KeyHealth(), NOW) == KeyStatus("ready", None, None)
    assert status(KeyHealth(cooling_until=NOW - 1, cooling_reason="429"), NOW) == KeyStatus(
        "ready", None, None
    )


def test_status_picks_the_longer_of_block_and_cooldown() -> None:
    h = KeyHealth(
        blocked_until=NOW + 50, blocked_reason="quota", cooling_until=NOW + 80, cooling_reason="429"
    )
    assert status(h, NOW) == KeyStatus("cooling", NOW + 80, "429")
    assert status(h.model_copy(update={"cooling_until": NOW + 20}), NOW) == KeyStatus(
        "blocked", NOW + 50, "quota"
    )
    assert status(h, NOW + 60) == KeyStatus("cooling", NOW + 80, "429")
    assert status(h, NOW + 80) == KeyStatus("ready", None, None)


# -- operator reset and persistence ---------------------------------------------------------------


def test_operator_reset_clears_every_penalty() -> None:
    h = KeyHealth(
        cooling_until=NOW + 100,
        cooling_reason="rate limited",
        blocked_until=NOW + 86400,
        blocked_reason="insufficient_quota",
        disabled_reason="invalid key (401)",
        disabled_at=NOW - 5,
        error_score=3.0,
        score_at=NOW,
        rate_limit_streak=4,
        overload_streak=2,
        windows={"requests": WindowState(limit=3, remaining=0, reset_at=NOW + 40)},
    )
    new = operator_reset(h, NOW)
    assert new == KeyHealth(error_score=3.0, score_at=NOW, updated_at=NOW)
    assert usable(new, NOW) and next_usable_at(new, NOW) == NOW and headroom(new, NOW) == 1.0
    assert h.disabled_reason == "invalid key (401)"  # the input is never changed


def test_health_round_trips_through_json_and_ignores_unknown_fields() -> None:
    h = apply(KeyHealth(), sig(RATE, NOW + 30, (exhausted(NOW + 30),)))
    assert KeyHealth.model_validate_json(h.model_dump_json()) == h
    doc = json.loads(h.model_dump_json()) | {"future_field": 1}
    doc["windows"]["requests"]["also_new"] = True
    assert KeyHealth.model_validate(doc) == h
    assert KeyHealth.model_validate({}) == KeyHealth()


# -- from a real response to a key's state --------------------------------------------------------

E2E_CASES = [
    # (id, status, headers, body, state, until)
    (
        "openai-6m0s",
        429,
        [("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "6m0s")],
        b'{"error":{"type":"requests","code":"rate_limit_exceeded","message":"Rate limit reached"}}',
        "cooling",
        NOW + 360,
    ),
    (
        "openai-insufficient-quota",
        429,
        [],
        b'{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"quota"}}',
        "blocked",
        NOW + 3600,
    ),
    (
        "kimi-overloaded",
        429,
        [],
        b'{"error":{"message":"The engine is currently overloaded, please try again later",'
        b'"type":"engine_overloaded_error"}}',
        "cooling",
        NOW + 1,
    ),
    (
        "kimi-billing-cycle",
        403,
        [],
        b'{"error":{"message":"You\'ve reached your usage limit for this billing cycle."}}',
        "blocked",
        NOW + 3600,
    ),
    (
        "gemini-per-day",
        429,
        [],
        b'{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":'
        b'"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":'
        b'"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaValue":"250"}]}]}}',
        "blocked",
        1795852800.0,  # midnight in Los Angeles
    ),
    ("anthropic-529", 529, [], None, "cooling", NOW + 1),
    ("bad-request", 400, [], b'{"error":{"message":"messages: field required"}}', "ready", None),
    ("bad-key", 401, [], None, "disabled", None),
]


@pytest.mark.parametrize(
    ("code", "headers", "raw", "state", "until"),
    [c[1:] for c in E2E_CASES],
    ids=[c[0] for c in E2E_CASES],
)
def test_from_response_to_state(
    code: int, headers: list[tuple[str, str]], raw: bytes | None, state: str, until: float | None
) -> None:
    h = apply(KeyHealth(), parse_signal(code, headers, raw, NOW))
    got = status(h, NOW)
    assert (got.state, got.until) == (state, until)


ODD_NUMBERS = [0, 1, -1, 10**15, 10**300, 1e308, -1e308, 0.5, float("nan"), float("inf"), None]


@pytest.mark.parametrize("value", ODD_NUMBERS)
@pytest.mark.parametrize("now", [NOW, 0, 17, float("nan"), float("inf")])
def test_windows_merged_are_those_validation_makes(value: float | None, now: float) -> None:
    # Merged windows are built without validating again: each must equal, field for field
    # (types and fields set included), what validating the same values would give.
    new = (Window("requests", None, value, value, value), Window("tokens", "day", 5, value, None))
    merged = _merge_windows({}, new, now)
    for key, w in merged.items():
        src = next(x for x in new if key.startswith(x.dimension))
        fields = {"limit": src.limit, "remaining": src.remaining, "reset_at": src.reset_at}
        # What validation makes of them once NaN and infinities are None (as merging does).
        fields = {k: _finite(v) for k, v in fields.items()}
        valid = WindowState.model_validate({**fields, "seen_at": now})
        assert w == valid
        assert w.model_dump() == valid.model_dump()
        assert [type(v) for v in w.__dict__.values()] == [type(v) for v in valid.__dict__.values()]
        assert w.model_fields_set == valid.model_fields_set
        assert w.model_dump_json() == valid.model_dump_json()
        assert WindowState.model_validate_json(w.model_dump_json()) == w


def test_window_built_unvalidated_is_a_model_of_its_own() -> None:
    a = WindowState.of(1.0, 2.0, 3.0, 4.0)
    b = WindowState.of(1.0, 2.0, 3.0, 4.0)
    a.limit = 9.0  # one window's change touches no other
    assert (b.limit, b.model_fields_set) == (1.0, {"limit", "remaining", "reset_at", "seen_at"})
    assert a.model_copy(update={"remaining": 0.0}).remaining == 0.0
    assert repr(b) == repr(WindowState(limit=1.0, remaining=2.0, reset_at=3.0, seen_at=4.0))


_RECORDS = [
    KeyHealth(),
    KeyHealth(cooling_until=NOW, windows={"requests": WindowState(limit=3, seen_at=NOW)}),
    KeyHealth.model_validate_json('{"error_score": 2.5, "unknown": 1, "score_at": NaN}'),
    ScopedHealth(rate_limit_streak=2, windows={"tokens": WindowState.of(1.0, 0.0, None, NOW)}),
    WindowState.of(1.0, 2.0, None, NOW),
]
_UPDATES = [
    {},
    {"updated_at": NOW},
    {"error_score": float("nan"), "score_at": -float("inf")},  # as given: not validated
    {"windows": {}, "scopes": {"model:m": ScopedHealth()}, "rate_limit_streak": 10**30},
    {"limit": None, "remaining": -1.0},
]


@pytest.mark.parametrize("record", _RECORDS)
@pytest.mark.parametrize("update", _UPDATES)
def test_a_record_updated_is_what_model_copy_gives(
    record: Persisted, update: dict[str, object]
) -> None:
    update = {k: v for k, v in update.items() if k in type(record).model_fields}
    mine, theirs = updated(record, update), record.model_copy(update=update)
    assert type(mine) is type(theirs)
    assert mine.__dict__.keys() == theirs.__dict__.keys()
    assert repr(mine) == repr(theirs)  # NaN is not equal to itself: compared as text
    assert mine.model_fields_set == theirs.model_fields_set
    assert (mine.__pydantic_extra__, mine.__pydantic_private__) == (None, None)
    assert mine.model_dump_json() == theirs.model_dump_json()
    # A copy of its own: changing it leaves the record as it was.
    before = repr(record), set(record.model_fields_set)
    mine.__dict__["seen_at"] = 1.0
    mine.__pydantic_fields_set__.add("seen_at")
    assert (repr(record), record.model_fields_set) == before
