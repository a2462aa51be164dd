"""Status snapshots for the web tests: a realistic pool and a hostile one.

Run as a script to render the realistic snapshot to a PNG with headless Chromium::

    .venv/bin/python -m tests.web.sample docs/status-page.png
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

HOSTILE = "<img src=x onerror=alert(1)>"

# (seconds before now, key, status, outcome, total_ms, attempt, stream, tokens_in, tokens_out)
RECENT: tuple[tuple[float, str, int | None, str, float, int, bool, int, int], ...] = (
    (1.2, "alpha", 200, "ok", 812.5, 1, True, 1180, 342),
    (3.9, "alpha", 200, "ok", 1460.0, 2, True, 950, 610),
    (4.1, "beta", 429, "upstream_429", 143.2, 1, True, 950, 0),
    (9.6, "beta", 200, "ok", 2310.8, 1, True, 2400, 1205),
    (14.0, "alpha", 200, "ok", 690.1, 1, False, 420, 96),
    (18.3, "beta", 200, "ok", 1022.4, 1, True, 1310, 488),
    (22.7, "alpha", 502, "error", 3010.0, 1, True, 1600, 0),
    (27.5, "beta", 200, "ok", 905.6, 1, True, 880, 300),
    (31.0, "alpha", 429, "local_429", 0.8, 1, False, 0, 0),
    (36.4, "alpha", 200, "ok", 1288.0, 1, True, 1720, 655),
    (41.9, "beta", 200, "ok", 760.3, 1, False, 530, 120),
    (47.2, "alpha", 200, "ok", 1935.7, 1, True, 2050, 940),
)


def _key(label: str, masked: str, fp: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "label": label,
        "masked": masked,
        "fingerprint": fp,
        "until": None,
        "reason": None,
        "retries": 0,
        "inflight": 0,
        "quota": [],
    }
    return base | fields


def _quota(name: str, source: str, limit: int, remaining: int, resets_at: float) -> dict[str, Any]:
    return {
        "name": name,
        "source": source,
        "limit": limit,
        "remaining": remaining,
        "resets_at": resets_at,
    }


def _alpha(now: float) -> dict[str, Any]:
    return _key(
        "alpha",
        "sk-…wxyz",
        "sha256:0123456789abcdef",
        status="ready",
        requests=412,
        errors=3,
        upstream_429=1,
        local_429=2,
        retries=1,
        tokens=148_230,
        last_status=200,
        last_used=now - 1.2,
        error_score=0.12,
        inflight=1,
        quota=[
            _quota("requests_per_minute", "local", 20, 12, now + 30),
            _quota("tokens_per_minute", "provider", 32000, 6400, now + 42),
        ],
    )


def _beta(now: float) -> dict[str, Any]:
    return _key(
        "beta",
        "sk-…9f3c",
        "sha256:fedcba9876543210",
        status="cooling",
        until=now + 37,
        reason="429 rate limited (provider retry-after 37s)",
        requests=388,
        errors=1,
        upstream_429=4,
        local_429=0,
        tokens=131_904,
        last_status=429,
        last_used=now - 4.1,
        error_score=0.4,
        quota=[_quota("requests_per_minute", "provider", 20, 0, now + 37)],
    )


def _gamma(now: float) -> dict[str, Any]:
    return _key(
        "gamma",
        "sk-…a7e1",
        "sha256:a1b2c3d4e5f60718",
        status="disabled",
        reason="disabled in config",
        requests=57,
        errors=9,
        upstream_429=0,
        local_429=0,
        tokens=12_660,
        last_status=401,
        last_used=now - 86_400 * 2,
        error_score=0.9,
    )


def _recent(now: float) -> list[dict[str, Any]]:
    return [
        {
            "ts": now - ago,
            "id": f"req-{i:04d}",
            "pool": "kimi",
            "key": key,
            "method": "POST",
            "path": "/coding/v1/chat/completions",
            "status": status,
            "outcome": outcome,
            "total_ms": ms,
            "attempt": attempt,
            "stream": stream,
            "tokens_in": tin,
            "tokens_out": tout,
        }
        for i, (ago, key, status, outcome, ms, attempt, stream, tin, tout) in enumerate(RECENT)
    ]


def realistic(now: float | None = None) -> dict[str, Any]:
    """One pool of three keys (ready with quota bars, cooling, disabled) and 12 recent requests."""
    now = time.time() if now is None else now
    return {
        "generated_at": now,
        "version": "0.1.0",
        "uptime_s": 3 * 3600 + 14 * 60 + 5,
        "totals": {
            "requests": 857,
            "local_429": 2,
            "upstream_429": 5,
            "errors": 13,
            "retries": 1,
            "inflight": 1,
            "tokens": 292_794,
        },
        "pools": [
            {
                "name": "kimi",
                "provider": "kimi-code",
                "strategy": "round-robin",
                "keys": [_alpha(now), _beta(now), _gamma(now)],
            }
        ],
        "recent": _recent(now),
    }


def hostile(now: float | None = None) -> dict[str, Any]:
    """The realistic snapshot with markup in every user-controlled string."""
    snap = realistic(now)
    pool = snap["pools"][0]
    pool["name"] = "<b>pool</b>"
    pool["keys"][0]["label"] = HOSTILE
    pool["keys"][0]["reason"] = "<script>alert(2)</script>"
    pool["keys"][0]["quota"][0]["name"] = "<svg onload=alert(3)>"
    pool["keys"][1]["masked"] = "sk-…<i>x</i>"
    snap["recent"][0]["key"] = HOSTILE
    return snap


if __name__ == "__main__":
    from .browser import screenshot_to

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "status-page.png")
    screenshot_to(realistic, out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def scoped(now: float | None = None) -> dict[str, Any]:
    """The realistic snapshot plus a pool of a provider that limits per model: its key is
    ready, cooling for one model and low on the other."""
    now = time.time() if now is None else now
    snap = realistic(now)
    omega = _key("omega", "sk-…0mg4", "sha256:00ff00ff00ff00ff", status="ready", requests=9)
    omega["scopes"] = [
        {
            "scope": "model:gpt-4o",
            "status": "ready",
            "until": None,
            "reason": None,
            "quota": [_quota("requests", "provider", 100, 40, now + 50)],
        },
        {
            "scope": "model:gpt-4o-mini",
            "status": "cooling",
            "until": now + 25,
            "reason": "429 rate limited",
            "quota": [_quota("requests", "provider", 30, 0, now + 25)],
        },
    ]
    pool = {"name": "oai", "provider": "openai", "strategy": "headroom", "keys": [omega]}
    snap["pools"].append(pool)
    return snap
