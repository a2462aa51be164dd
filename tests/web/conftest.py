"""Fixtures for the status page tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .browser import CHROMIUM


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium; skipped where it is missing, except in CI where that is a failure."""
    if CHROMIUM.exists():
        return CHROMIUM
    why = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}: CI must run the browser tests")
    pytest.skip(why)
