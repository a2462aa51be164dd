"""Kimi Code's `GET {base}/usages`: a key's quota windows, read before the key runs dry."""

from __future__ import annotations

import json
import math
import urllib.parse
from datetime import datetime
from typing import Any

from .signals import Window

UNIT_SECONDS = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400, "WEEK": 7 * 86400}
MAX_HORIZON = 62 * 86400.0


def may_follow_redirect(origin: str, target: str) -> bool:
    """Whether a request carrying a key to `origin` may follow a redirect to `target`: only
    to the same https origin (scheme, host and port), so the key never changes hands and
    never leaves TLS. `target` may be relative, as a `Location` header may be."""
    try:
        a = urllib.parse.urlsplit(origin)
        b = urllib.parse.urlsplit(urllib.parse.urljoin(origin, target))
        same = (a.hostname or "").rstrip(".").lower() == (b.hostname or "").rstrip(".").lower()
        return a.scheme == b.scheme == "https" and same and _port(a) == _port(b)
    except ValueError:  # a port out of range, a malformed address
        return False


def _port(u: urllib.parse.SplitResult) -> int:
    return u.port if u.port is not None else 443


def parse_usages(body: bytes | str, now: float) -> tuple[Window, ...]:
    """Windows from a `/usages` answer; anything malformed is skipped, never raised."""
    try:
        return _parse(json.loads(body), now)
    except (ValueError, TypeError, RecursionError, OverflowError):
        return ()


def _parse(data: Any, now: float) -> tuple[Window, ...]:
    if not isinstance(data, dict):
        return ()
    found: list[Window] = []
    usage = data.get("usage")
    if isinstance(usage, dict):
        w = _window(usage, "requests", "plan", now)
        if w is not None:
            found.append(w)
    limits = data.get("limits")
    for item in limits if isinstance(limits, list) else []:
        if not isinstance(item, dict):
            continue
        detail = item.get("detail") if isinstance(item.get("detail"), dict) else item
        period = _period(item.get("window"))
        name = str(item.get("name") or "requests")[:40].lower().replace(" ", "_")
        w = _window(detail, name, period, now)
        if w is not None:
            found.append(w)
    return tuple(found)


def _window(d: dict[str, Any], dimension: str, period: str | None, now: float) -> Window | None:
    limit, used, remaining = _num(d.get("limit")), _num(d.get("used")), _num(d.get("remaining"))
    if remaining is None and limit is not None and used is not None:
        remaining = max(0.0, limit - used)
    if remaining is None and limit is None:
        return None
    return Window(dimension, period, limit, remaining, _reset(d, now))


def _reset(d: dict[str, Any], now: float) -> float | None:
    for name in ("reset_in", "resetIn", "reset_in_seconds"):
        v = _num(d.get(name))
        if v is not None:
            return now + v if v <= MAX_HORIZON else None
    for name in ("reset_at", "resetAt", "resetTime", "reset_time"):
        v = d.get(name)
        at = _num(v)
        if at is not None:
            at = at / 1000 if at > 1e12 else at
        elif isinstance(v, str):
            at = _date(v)
        if at is not None and now < at <= now + MAX_HORIZON:
            return at
    return None


def _period(window: Any) -> str | None:
    if not isinstance(window, dict):
        return None
    unit = str(window.get("timeUnit") or window.get("time_unit") or "").upper()
    duration = _num(window.get("duration"))
    if unit not in UNIT_SECONDS or duration is None or duration * UNIT_SECONDS[unit] > MAX_HORIZON:
        return None
    if duration == 1:
        return unit.lower()
    return f"{int(duration * UNIT_SECONDS[unit])}s"


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return None
    if isinstance(v, int | float) and math.isfinite(v) and v >= 0:
        return float(v)
    return None


def _date(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
