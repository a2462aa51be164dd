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
    (budget,) = b._by_key["k"].values()
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
def test_a_window_that_holds_nothing_blocks_without_failing(limit: float) -> None:
    b = Budgets()
    b.observe("k", report(0, 2, limit=limit), [], T0)
    assert b.blocked_until("k", T0 + 1) == T0 + 2
    assert b.blocked_until("k", T0 + 3) == T0 + 3 + 2  # one (guessed) window later


def test_budgets_never_raise_on_odd_reports() -> None:
    b = Budgets(guard=0.02)
    odd = [(-5, 1, 10), (0, 0, 10), (3, 1e-9, None), (1e12, 5, 1e12), (0, 1, 1)]
    for i, (remaining, reset_in, limit) in enumerate(odd):
        b.observe("k", report(remaining, reset_in, limit), [T0] * i, T0 + i)
        for j in range(5):
            b.admitted("k", T0 + i + j * 0.1)
            b.blocked_until("k", T0 + i + j)
            assert 0.0 <= b.fraction("k", T0 + i + j) <= 1.0
