"""Shared helpers: the package and the fake provider are importable from a plain clone."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "addon", ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
