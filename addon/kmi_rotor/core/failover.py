"""Failover decisions: whether an attempt that failed before its answer reached the client is
re-sent on another key, and what the client is told when no other attempt is made.

Outcomes are the trace's words: `rate_limited`, `quota`, `auth`, `overloaded` (an HTTP
failure of the key or the provider), `error` (the connection failed before the answer's
headers: refused, reset, TLS, timeout), `ok`, `client_error`, ... Streamed and non-streamed
requests are decided alike: until the first byte of an answer has reached the client, a
streamed request can be re-sent like any other.
"""

from __future__ import annotations

import math
from typing import Literal

RETRIABLE = frozenset({"rate_limited", "quota", "auth", "overloaded", "error"})
"""Failures another key may not have."""
KEY_UNUSABLE = frozenset({"rate_limited", "quota", "auth"})
"""Failures that make the key unusable for a while: the pool, not the key, answers the client."""
MIN_RETRY_AFTER = 1.0
"""Seconds: SDKs ignore a `Retry-After: 0` and fall back to their own backoff."""

Closing = Literal["pass", "pool"]


def retry(outcome: str, attempt: int, max_attempts: int, key_ready: bool) -> bool:
    """Whether attempt number `attempt`, which ended in `outcome` before anything reached the
    client, is followed by another on a different key (`key_ready`: one is usable now)."""
    return outcome in RETRIABLE and attempt < max_attempts and key_ready


def closing(outcome: str | None) -> Closing:
    """What the client gets once the attempts stop on `outcome` (None: no attempt produced an
    answer): the pool's own answer after a failure of the key (`pool`: when to come back, or
    that every key is disabled), else the last answer as it came (`pass`)."""
    return "pool" if outcome in KEY_UNUSABLE else "pass"


def retry_at(pool_at: float | None, now: float) -> float | None:
    """When the client should come back: when the pool can serve (`pool_at`, None when every
    key is disabled), never sooner than MIN_RETRY_AFTER from `now`."""
    if pool_at is None or not math.isfinite(pool_at):
        return None
    return max(pool_at, now + MIN_RETRY_AFTER)
