"""The state writer's cost: one commit of a realistic delta into state.json, in process.

A state folder is filled with a document of `--keys` keys (counters, health with a provider's
windows, one model scope) and the limiter windows of a busy proxy (`--entries` per window); then
`--commits` commits run as the proxy's writer thread runs them (the limiter's snapshot rendered,
the delta merged under the lock, the file replaced). Each delta touches `--touched` keys.
Reported: CPU and wall time per commit (median), and the file's size.

    .venv/bin/python scripts/bench_state.py [--keys 2] [--touched 50] [--entries 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "addon") not in sys.path:
    sys.path.insert(0, str(ROOT / "addon"))

from kmi_rotor.core.health import KeyHealth, ScopedHealth, WindowState  # noqa: E402
from kmi_rotor.core.state import Delta  # noqa: E402
from kmi_rotor.keeper import StateKeeper  # noqa: E402
from kmi_rotor.store import StateStore  # noqa: E402

T0 = 1_780_000_000.0


def health(i: int, now: float) -> KeyHealth:
    """A key's health as an OpenAI answer leaves it: two windows, one model scope."""
    windows = {
        "requests": WindowState(limit=500, remaining=499 - i % 7, reset_at=now + 0.12, seen_at=now),
        "tokens": WindowState(limit=30000, remaining=29000.0, reset_at=now + 0.5, seen_at=now),
    }
    scope = ScopedHealth(windows=dict(windows), seen_at=now)
    return KeyHealth(
        error_score=0.25 * (i % 3), score_at=now, windows=windows,
        scopes={"model:gpt-4o-mini": scope}, updated_at=now,
    )  # fmt: skip


def delta(fps: list[str], now: float) -> Delta:
    d = Delta()
    for i, fp in enumerate(fps):
        k = d.key(fp, f"key-{fp[:6]}", "openai")
        k.add("requests", 3)
        k.add("tokens_in", 300)
        k.add("tokens_out", 60)
        k.observe(now, 200, None)
        k.health = health(i, now)
    d.pool_add("openai", "local_429")
    return d


def limiter_source(n_keys: int, entries: int, now: float):  # type: ignore[no-untyped-def]
    """What `Limiter.capture` hands the writer: a render function over copied windows."""
    times = tuple(now - 50 + 50 * j / max(entries, 1) for j in range(entries))
    amounts = tuple(1 for _ in range(entries))
    copied = [("global", "requests:minute", times, amounts)]
    copied += [(f"key:{i:016x}", "requests:minute", times, amounts) for i in range(min(n_keys, 8))]

    def render() -> dict:  # type: ignore[type-arg]
        scopes: dict[str, dict[str, list[list[float]]]] = {}
        for scope_name, name, ts, am in copied:
            scopes.setdefault(scope_name, {})[name] = [[t, a] for t, a in zip(ts, am, strict=True)]
        return {"format": 1, "at": now, "scopes": scopes}

    return render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--touched", type=int, default=50, help="keys changed per commit")
    parser.add_argument("--entries", type=int, default=300, help="limiter entries per window")
    parser.add_argument("--commits", type=int, default=40)
    args = parser.parse_args(argv)
    fps = [f"{i:016x}" for i in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="bench-state-") as d:
        keeper = StateKeeper(StateStore(Path(d) / "state"))
        keeper._commit(delta(fps, T0), limiter_source(args.keys, args.entries, T0), T0)
        cpu, wall = [], []
        for n in range(args.commits):
            now = T0 + 0.5 * (n + 1)
            start = len(fps) and (n * args.touched) % len(fps)
            touched = (fps[start:] + fps[:start])[: args.touched]
            pending, render = delta(touched, now), limiter_source(args.keys, args.entries, now)
            c0, w0 = time.thread_time(), time.perf_counter()
            keeper._commit(pending, render, now)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
        size = keeper.store.path.stat().st_size
    touched_n = min(args.touched, args.keys)
    print(
        f"state commit, {args.keys} keys ({touched_n} changed), {args.entries} limiter entries "
        f"per window, file {size / 1024:.0f} KiB: {statistics.median(cpu) * 1e6:.0f} µs CPU, "
        f"{statistics.median(wall) * 1e6:.0f} µs wall per commit (median of {args.commits})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
