"""Provider budgets: a key's reported remaining, less what was sent since."""

from __future__ import annotations

import math

import pytest

from kmi_rotor.core.budget import Budget, Budgets
from kmi_rotor.core.signals import Window

T0 = 1_800_000_000.0


def report(remaining: float, reset_in: float, limit: float | None = 10) -> tuple[Window, ...]:
    return (Window("requests", "minute", limit, remaining, T0 + reset_in),)


@pytest.mark.parametrize(
    ("remaining", "in_flight", "sent", "left"),
    [
        (5, 0, 0, 5),
        (5, 2, 0, 3),  # requests in flight when the provider answered may not be counted
        (5, 0, 3, 2),
        (5, 2, 3, 0),
        (1, 0, 2, -1),
    ],
)
def test_left_counts_what_the_report_cannot_include(remaining, in_flight, sent, left) -> None:
    b = Budgets()
    b.observe("k", report(remaining, 30), [T0 - 0.1] * in_flight, T0)
    for i in range(sent):
        b.admitted("k", T0 + 1 + i)
    (budget,) = b._by_key["k"][""].values()
    assert budget.left(T0 + 10) == left
    assert (b.blocked_until("k", T0 + 10) is None) == (left > 0)


def test_a_spent_key_is_blocked_until_the_reset_then_gets_its_limit_back() -> None:
    b = Budgets()
    b.observe("k", report(1, 30, limit=3), [], T0)  # the window: 30 s, as the report tells
    b.admitted("k", T0 + 1)
    assert b.blocked_until("k", T0 + 2) == T0 + 30
    assert b.blocked_until("k", T0 + 30) is None
    # The window may slide: the request at T0 + 1 still counts until T0 + 31, so two fit now,
    # not the whole limit of three, and certainly not every waiting request.
    for i in range(2):
        assert b.blocked_until("k", T0 + 30 + i * 0.01) is None
        b.admitted("k", T0 + 30 + i * 0.01)
    assert b.blocked_until("k", T0 + 30.5) == T0 + 31
    assert b.blocked_until("k", T0 + 31) is None


def test_an_unknown_limit_after_the_reset_is_not_a_block() -> None:
    b = Budgets()
    b.observe("k", report(0, 5, limit=None), [], T0)
    assert b.blocked_until("k", T0 + 1) == T0 + 5
    for _ in range(50):
        b.admitted("k", T0 + 6)
    assert b.blocked_until("k", T0 + 6) is None


def test_tokens_and_windows_without_reset_are_not_budgets() -> None:
    b = Budgets()
    b.observe("k", (Window("tokens", "minute", 100, 0, T0 + 5),), [], T0)
    b.observe("j", (Window("requests", None, 10, 0, None),), [], T0)
    assert b.blocked_until("k", T0) is None and b.blocked_until("j", T0) is None


def test_a_fresh_report_replaces_the_old_budget_and_forget_drops_it() -> None:
    b = Budgets()
    b.observe("k", report(0, 30), [], T0)
    assert b.blocked_until("k", T0 + 1) is not None
    b.observe("k", report(4, 30), [], T0 + 2)
    assert b.blocked_until("k", T0 + 3) is None
    b.observe("k", report(0, 30), [], T0 + 4)
    b.forget("k")
    assert b.blocked_until("k", T0 + 5) is None


@pytest.mark.parametrize(
    ("left", "limit", "fraction"), [(5, 10, 0.5), (0, 10, 0.0), (3, None, None)]
)
def test_fraction(left, limit, fraction) -> None:
    budget = Budget(limit, left, T0 + 10, T0)
    assert budget.fraction(T0) == fraction
    b = Budgets()
    b.observe("k", report(left, 10, limit), [], T0)
    assert b.fraction("k", T0) == (1.0 if fraction is None else fraction)
    assert math.isfinite(b.fraction("nobody", T0))


@pytest.mark.parametrize("limit", [0, 0.4])
def test_a_window_that_holds_nothing_lets_one_probe_through_after_its_reset(limit: float) -> None:
    b = Budgets()
    b.observe("k", report(0, 2, limit=limit), [], T0)
    assert b.blocked_until("k", T0 + 1) == T0 + 2
    # Past the reset, nothing new was reported: one request may go and look.
    assert b.blocked_until("k", T0 + 3) is None
    b.admitted("k", T0 + 3)
    # The probe holds the next one back a window (2 s), a fixed time that does not move on.
    assert b.blocked_until("k", T0 + 3.5) == T0 + 5
    assert b.blocked_until("k", T0 + 4.9) == T0 + 5
    assert b.blocked_until("k", T0 + 5) is None


# (remaining, limit, reset in, cap): the key is blocked until `free`, then one probe goes.
@pytest.mark.parametrize(
    ("remaining", "limit", "reset_in", "cap", "free"),
    [
        (0, 0, 30, 60, 30),  # a zero window: its reset binds
        (0, 0, 31 * 86400, 60, 60),  # a reset far away: the cap binds
        (0, 10, 31 * 86400, 60, 60),
        (0, None, 31 * 86400, 60, 60),
        (0, 10, 30, 60, 30),
        (0, 0, 3600, 3600, 3600),
    ],
)
def test_no_report_benches_a_key_for_good(remaining, limit, reset_in, cap, free) -> None:
    b = Budgets(cap=cap)
    b.observe("k", report(remaining, reset_in, limit), [], T0)
    looks = [b.blocked_until("k", T0 + t) for t in (0, free / 3, free - 0.01)]
    assert looks == [T0 + free] * 3  # the same answer on every look
    assert b.blocked_until("k", T0 + free) is None
    b.admitted("k", T0 + free)  # the probe
    after = b.blocked_until("k", T0 + free + 0.01)
    if limit is not None and limit >= 1 and reset_in <= cap:
        assert after is None  # a real window came back: its limit, not one probe
    else:
        assert after is not None and T0 + free < after <= T0 + free + cap
        assert b.blocked_until("k", after) is None  # and then the next probe


def test_a_fresh_report_after_a_probe_binds_again() -> None:
    b = Budgets(cap=60)
    b.observe("k", report(0, 2, limit=0), [], T0)
    b.admitted("k", T0 + 2)
    # The probe's answer: still nothing, for another two seconds.
    b.observe("k", (Window("requests", "minute", 0, 0, T0 + 4.1),), [], T0 + 2.1)
    assert b.blocked_until("k", T0 + 2.2) == T0 + 4.1
    assert b.blocked_until("k", T0 + 4.1) is None


def test_budgets_never_raise_on_odd_reports() -> None:
    b = Budgets(guard=0.02)
    odd = [(-5, 1, 10), (0, 0, 10), (3, 1e-9, None), (1e12, 5, 1e12), (0, 1, 1)]
    for i, (remaining, reset_in, limit) in enumerate(odd):
        b.observe("k", report(remaining, reset_in, limit), [T0] * i, T0 + i)
        for j in range(5):
            b.admitted("k", T0 + i + j * 0.1)
            b.blocked_until("k", T0 + i + j)
            assert 0.0 <= b.fraction("k", T0 + i + j) <= 1.0
