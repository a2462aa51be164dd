"""The local answer when kmi-rotor cannot serve a request: precise about when to come back."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .limiter import WINDOWS


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_at: float | None = None
    limit: str | None = None
    """The exhausted limit's name (`requests_per_second`, ...), when one is to blame."""
    limit_value: int | None = None
    scope: str | None = None
    keys: tuple[dict[str, Any], ...] = ()


MAX_RETRY = 366 * 86400.0
"""The furthest a refusal points into the future: any time beyond (an absurd setting, a state
file written by hand) is told as this, so rendering never overflows."""


def _bounded(retry_at: float | None, now: float) -> float | None:
    if retry_at is None or math.isnan(retry_at):
        return None
    return min(max(retry_at, now - MAX_RETRY), now + MAX_RETRY)


def retry_after_seconds(retry_at: float | None, now: float) -> int | None:
    """Whole seconds, rounded up: a client that waits this long is never early."""
    bounded = _bounded(retry_at, now)
    if bounded is None:
        return None
    return max(0, math.ceil(bounded - now - 1e-9))


def render(r: Refusal, now: float) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of a local refusal; never raises on odd times."""
    headers = {"content-type": "application/json", "cache-control": "no-store"}
    r = replace(r, retry_at=_bounded(r.retry_at, now))
    wait = retry_after_seconds(r.retry_at, now)
    error: dict[str, Any] = {
        "type": "rate_limit_error" if r.status == 429 else "kmi_rotor_error",
        "code": r.code,
        "message": f"kmi-rotor: {r.message}",
    }
    if wait is not None and r.retry_at is not None:
        headers["retry-after"] = str(wait)
        headers["retry-after-ms"] = str(max(0, math.ceil((r.retry_at - now) * 1000)))
        error["retry_after"] = wait
        error["frees_at"] = datetime.fromtimestamp(r.retry_at, UTC).isoformat(
            timespec="milliseconds"
        )
    if r.limit is not None:
        error["limit"] = r.limit
        error["scope"] = r.scope
        window = WINDOWS.get(r.limit)
        if window is not None and r.limit_value is not None:
            name = r.limit.replace("_", "-")
            headers["ratelimit-policy"] = f'"{name}";q={r.limit_value};w={int(window)}'
            headers["ratelimit"] = f'"{name}";r=0;t={wait if wait is not None else int(window)}'
    if r.keys:
        error["keys"] = [
            {
                "label": k.get("label"),
                "status": k.get("status"),
                "reason": k.get("reason"),
                "until": _iso(k.get("until")),
            }
            for k in r.keys
        ]
    return r.status, headers, {"error": error}


def _iso(ts: object) -> str | None:
    if not isinstance(ts, int | float):
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):  # beyond what a date can say
        return None
