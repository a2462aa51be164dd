"""Compare kmi_rotor.core.limiter with the `limits` package's moving window (memory storage).

Checks what each can express (injected clock, token correction, concurrency, earliest free
time, snapshot) and measures µs per admission decision at 10, 100 and 1,000 keys.

    .venv/bin/pip install limits   # only for this script
    .venv/bin/python scripts/bench_limiter_eval.py
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addon"))

from kmi_rotor.core.limiter import Admitted, Limiter, Limits

try:
    import limits.storage.memory as lim_memory
    from limits import RateLimitItem, RateLimitItemPerDay, RateLimitItemPerMinute
    from limits import RateLimitItemPerSecond as PerSecond
    from limits.storage import MemoryStorage
    from limits.strategies import MovingWindowRateLimiter
except ImportError:  # pragma: no cover
    sys.exit("install `limits` first: .venv/bin/pip install limits")

KEY = Limits(requests_per_second=5, requests_per_minute=100, requests_per_day=10_000,
             tokens_per_minute=100_000, tokens_per_day=1_000_000)  # fmt: skip
TOKENS = 200
STEP = 0.1  # simulated seconds between decisions: the keys normally have room


class Clock:
    """Replaces `time.time` inside limits' memory storage: the only way to control its clock."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


def make_limits_lib(clock: Clock) -> tuple[MovingWindowRateLimiter, MemoryStorage]:
    lim_memory.time = clock  # type: ignore[assignment]  # process-wide, not per instance
    storage = MemoryStorage()
    return MovingWindowRateLimiter(storage), storage


ITEMS: list[tuple[RateLimitItem, bool]] = [
    (PerSecond(5), False),
    (RateLimitItemPerMinute(100), False),
    (RateLimitItemPerDay(10_000), False),
    (RateLimitItemPerMinute(100_000), True),
    (RateLimitItemPerDay(1_000_000), True),
]


FULL_ITEMS: list[tuple[RateLimitItem, bool]] = [(RateLimitItemPerDay(1), False)]
FULL = Limits(requests_per_day=1)  # the keys kept full: one admission fills them for the run


def lib_admit(ml: MovingWindowRateLimiter, candidates: Sequence[str], tokens: int) -> str | None:
    """First candidate whose every window has room (test all, then hit all: no rollback)."""
    for key in candidates:
        items = FULL_ITEMS if key.startswith("f") else ITEMS
        if all(ml.test(item, key, cost=tokens if tok else 1) for item, tok in items):
            for item, tok in items:
                ml.hit(item, key, cost=tokens if tok else 1)
            return key
    return None


def check_capabilities() -> None:
    clock = Clock()
    ml, storage = make_limits_lib(clock)
    ctor = inspect.signature(MemoryStorage.__init__)
    print("(a) clock: MemoryStorage params", list(ctor.parameters), "-> patched module time only")
    item = RateLimitItemPerMinute(100)
    t0 = clock.now
    for cost in (10, 50, 40):
        ml.hit(item, "k", cost=cost)
        clock.now += 10
    stats = ml.get_window_stats(item, "k")
    clock.now = stats.reset_time
    print(f"(d) 100 tok/min used 10@0,50@10,40@20; a 60-token request: library says "
          f"reset at +{stats.reset_time - t0:.0f}s; fits then? {ml.test(item, 'k', cost=60)}; "
          f"really fits at +70s")  # fmt: skip
    one = PerSecond(1)
    clock.now = 2_000_000.0
    ml.hit(one, "b")
    clock.now += 1.0
    print(f"    boundary: 1/s hit at t, another at exactly t+1 admitted? {ml.hit(one, 'b')}")
    entries = len(storage.events.get(item.key_for("k"), []))
    print(f"(b) 100 tokens reserved = {entries} list entries; API has no remove/insert-at-time: "
          f"{[m for m in ('remove', 'refund', 'release') if hasattr(storage, m)]}")  # fmt: skip
    print("(c) concurrency: no release in any strategy (storage incr/decr only)")
    print("(e) snapshot: only pickle of the whole MemoryStorage (Entry objects), no JSON API")


def run(admit: Callable[[Sequence[str]], object], rotations: list[list[str]], n: int,
        clock: Clock) -> float:  # fmt: skip
    """µs per decision: round-robin candidate order, clock advancing STEP per decision."""
    start = time.perf_counter()
    for i in range(n):
        admit(rotations[i % len(rotations)])
        clock.now += STEP
    return (time.perf_counter() - start) / n * 1e6


def bench(n_keys: int, n: int, prefix_full: int) -> tuple[float, float, int]:
    """Both limiters on the same workload; the first `prefix_full` candidates are kept full.
    Also returns how many entries the library's storage holds at the end."""
    full = [f"f{i}" for i in range(prefix_full)]
    rest = [f"k{i}" for i in range(n_keys - prefix_full)]
    rotations = [full + rest[s:] + rest[:s] for s in range(len(rest))] or [full]
    clock = Clock()
    ours = Limiter(Limits(), {k: KEY for k in rest} | {k: FULL for k in full})

    def ours_admit(c: Sequence[str]) -> object:
        result = ours.try_admit(c, TOKENS, clock.now)
        if isinstance(result, Admitted):
            ours.release(result.reservation)
        return result

    fill(lambda c: ours.try_admit(c, TOKENS, clock.now), full, clock)
    t_ours = run(ours_admit, rotations, n, clock)
    clock = Clock()
    ml, storage = make_limits_lib(clock)
    fill(lambda c: lib_admit(ml, c, TOKENS), full, clock)
    t_lib = run(lambda c: lib_admit(ml, c, TOKENS), rotations, n, clock)
    return t_ours, t_lib, sum(len(v) for v in storage.events.values())


def fill(admit: Callable[[Sequence[str]], object], keys: list[str], clock: Clock) -> None:
    """Use up the per-day window of `keys` so they stay full during the run."""
    for key in keys:
        admit([key])
    clock.now += 1.0


def main() -> None:
    check_capabilities()
    print("\n(f) µs/decision, 2,000 decisions (5 windows per key, tokens=200, round-robin);")
    print("    'full' candidates come first (all full: every decision is a rejection)")
    print(f"{'keys':>6} {'full':>6} {'ours':>8} {'limits':>8} {'limits entries':>15}")
    for n_keys in (10, 100, 1_000):
        for prefix in (0, n_keys // 2, n_keys):
            ours, lib, entries = bench(n_keys, 2_000, prefix)
            print(f"{n_keys:>6} {prefix:>6} {ours:>8.1f} {lib:>8.1f} {entries:>15,}")


if __name__ == "__main__":
    main()
