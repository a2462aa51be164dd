"""Shared helpers: the package and the fake provider are importable from a plain clone, and
tests are marked by what they start, so `-m "not e2e and not browser"` selects the fast set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "addon", ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

E2E = ROOT / "tests" / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`e2e` on everything under tests/e2e; `browser` on every test that needs Chromium (the
    status page tests in tests/web). Tests elsewhere that start processes mark themselves.

    Tests marked `long(seconds)` run first, the longest first: a test of a minute or two
    started last would leave one worker running it alone while the others have finished."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)
        if "chromium" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
    items.sort(key=_length_first)


def _length_first(item: pytest.Item) -> float:
    """The sort key of `pytest_collection_modifyitems`: minus a long test's seconds, else 0
    (a stable sort keeps every other test in its place)."""
    mark = item.get_closest_marker("long")
    return -float(mark.args[0]) if mark is not None else 0.0
