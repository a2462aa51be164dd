"""Which operator actions found in the state a proxy applies when it starts."""

from __future__ import annotations

import pytest
from testkit import delta, kd

from kmi_rotor.core.health import KeyHealth
from kmi_rotor.core.state import Operator, StateDoc, merge, pending_at_start

AT = 1000.0


def op(applied: bool | None, at: float = AT) -> Operator:
    return Operator(action="disable", at=at, applied=applied)


@pytest.mark.parametrize(
    ("applied", "health_at", "pending"),
    [
        # written by the CLI, no proxy applied it: it holds, whatever was observed since
        (False, 0.0, True),
        (False, AT - 1, True),
        (False, AT, True),
        (False, AT + 1, True),  # an observation written after it, before a proxy read it
        (False, AT + 3600, True),
        # applied by a proxy: the health it wrote carries it, and what followed stands
        (True, AT, False),
        (True, AT + 1, False),
        (True, AT + 3600, False),
        # a record from before the mark: newer health is the only sign of it being applied
        (None, 0.0, True),
        (None, AT - 1, True),
        (None, AT, False),
        (None, AT + 1, False),
    ],
)
def test_pending_at_start(applied: bool | None, health_at: float, pending: bool) -> None:
    assert pending_at_start(op(applied), KeyHealth(updated_at=health_at)) is pending


def on_disk(o: Operator) -> StateDoc:
    return merge(StateDoc(), delta(fp=kd("a", "p", operator=o)), AT)


@pytest.mark.parametrize(
    ("disk", "written", "kept"),
    [
        (op(False), op(True), op(True)),  # the proxy's mark of the same action
        (op(False, AT + 1), op(True), op(False, AT + 1)),  # a later action is not undone
        (op(True), op(False, AT + 1), op(False, AT + 1)),  # a later action replaces it
    ],
)
def test_merge_keeps_the_latest_action_and_its_mark(
    disk: Operator, written: Operator, kept: Operator
) -> None:
    doc = merge(on_disk(disk), delta(fp=kd("a", "p", operator=written)), AT + 2)
    assert doc.keys["fp"].operator == kept
