"""What a request that found no key to admit it is told: wait (and until when), or a refusal.

Pure functions of what the engine found (the limiter's rejection, when keys come back): the
engine orders candidates and admits; this module builds the answer when nothing was admitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .limiter import GLOBAL, Exhausted, Rejected
from .refusal import Refusal


@dataclass(frozen=True)
class Wait:
    until: float | None
    """When capacity may free; None when only a finishing request can free it."""
    reason: str


def after_rejection(
    result: Rejected,
    keys_back_at: float | None,
    now: float,
    deadline: float,
    *,
    name: Callable[[str], str],
    limit_value: Callable[[Exhausted | None], int | None],
) -> Wait | Refusal:
    """Usable keys existed but the limiter admitted none: a 413 when no wait can help, a wait
    when capacity frees (or a key comes back, `keys_back_at`) by `deadline`, else a 429 that
    names the binding limit. `name` renders a limiter scope; `limit_value` a limit's setting."""
    if not result.possible:
        return _too_large(result, name)
    wake = _wake(result, keys_back_at)
    binding = binding_limit(result.exhausted, result.retry_at, now)
    if (wake is None and deadline > now) or (wake is not None and wake <= deadline):
        return Wait(wake, binding.limit if binding else "capacity")
    return _local_429(binding, wake if wake is not None else now + 1.0, name, limit_value)


def _too_large(result: Rejected, name: Callable[[str], str]) -> Refusal:
    first = result.exhausted[0] if result.exhausted else None
    return Refusal(
        413,
        "request_too_large",
        "the request's token estimate exceeds a token limit",
        limit=first.limit if first else None,
        scope=name(first.scope) if first else None,
    )


def _wake(result: Rejected, keys_back_at: float | None) -> float | None:
    """When to look again: capacity freeing or a key coming back, whichever is first; but
    a key coming back cannot free the proxy's own limits, which bound the wait from below."""
    wake = earliest(result.retry_at, keys_back_at)
    glob = [e.free_at for e in result.exhausted if e.scope == GLOBAL and e.free_at is not None]
    if wake is not None and glob:
        wake = max(wake, *glob)
    return wake


def _local_429(
    binding: Exhausted | None,
    retry_at: float,
    name: Callable[[str], str],
    limit_value: Callable[[Exhausted | None], int | None],
) -> Refusal:
    what = f"{binding.limit} of {name(binding.scope)}" if binding else "capacity"
    return Refusal(
        429,
        "local_rate_limit",
        f"{what} is exhausted",
        retry_at,
        limit=binding.limit if binding else None,
        limit_value=limit_value(binding),
        scope=name(binding.scope) if binding else None,
    )


def no_usable_key(
    pool: str,
    times: Sequence[float | None],
    reasons: tuple[dict[str, Any], ...],
    deadline: float,
) -> Wait | Refusal:
    """No key is usable now; `times` say when each comes back (None: disabled). A 503 when
    every key is disabled, a wait when one is back by `deadline`, else a 429 until then."""
    known = [t for t in times if t is not None]
    if not known:
        return Refusal(
            503, "all_keys_disabled", f"every key of pool {pool!r} is disabled", keys=reasons
        )
    wake = min(known)
    if wake <= deadline:
        return Wait(wake, "no usable key")
    return Refusal(
        429, "pool_exhausted", f"no key of pool {pool!r} can serve now", wake, keys=reasons
    )


def earliest(a: float | None, b: float | None) -> float | None:
    known = [x for x in (a, b) if x is not None]
    return min(known) if known else None


def binding_limit(
    exhausted: tuple[Exhausted, ...], retry_at: float | None, now: float
) -> Exhausted | None:
    """The limit the client waits for: the exhausted one that frees when the request can go
    (`retry_at`), or a concurrency limit when only a finishing request can help."""
    if not exhausted:
        return None
    if retry_at is None:
        return next((e for e in exhausted if e.free_at is None), exhausted[0])
    timed = [e for e in exhausted if e.free_at is not None]
    if not timed:
        return exhausted[0]
    # Equal distance: the global limit binds every key, so it is the one to name.
    return min(timed, key=lambda e: (abs((e.free_at or now) - retry_at), e.scope != GLOBAL))
