"""Tests for scripts/bench_hooks.py's hook-by-hook timing (`--evict`): the hooks it times are
the addon's own, each hook gets its own figure, and the copy between hooks stays off the clock."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_hooks


def _figures(line: str) -> dict[str, float]:
    return {name: float(v) for name, v in re.findall(r"(\w+) ([0-9.]+)(?=[,)])", line)}


def test_evict_times_each_hook_warm_and_cold(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_hooks.main(["--requests", "30", "--rounds", "1", "--evict", "0.25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("kmi-rotor hooks, 2 keys, openai, plain: ")
    warm = next(line for line in lines if "hook by hook, warm" in line)
    cold = next(line for line in lines if "copied before each hook" in line)
    for line in (warm, cold):
        hooks = _figures(line)
        assert set(hooks) == set(bench_hooks.HOOKS)
        assert all(v > 0 for v in hooks.values())
        total = float(re.search(r": ([0-9.]+) µs", line).group(1))
        assert total == pytest.approx(sum(hooks.values()), abs=0.3)
    assert re.search(r"cold / warm: [0-9.]+$", lines[-1])


def test_what_runs_between_hooks_is_not_counted() -> None:
    """2 ms of CPU burnt before each hook would add 8 ms per request if it were counted (the
    clock is thread time, which counts it): the hook's clock starts after it."""
    args = bench_hooks.argparse.Namespace(
        requests=5, rounds=1, stream=False, events=0, provider="openai", keys=2
    )
    calls = []

    def between() -> None:
        calls.append(1)
        end = time.thread_time() + 0.002  # CPU, which thread time would count
        while time.thread_time() < end:
            pass

    with bench_hooks.configured(args.keys, args.provider) as rotor:
        hooks = bench_hooks.measure_hooks(rotor, args, between)
    assert len(calls) == 4 * args.requests
    assert sum(hooks.values()) < 2000  # µs per request: the 8 ms of `between` left out
