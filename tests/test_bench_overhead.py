"""Tests for scripts/bench_overhead.py's CPU accounting (the event loop's thread apart from the
others) and its sampler."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_overhead import launch, thread_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_pinned_child_runs_on_its_cpus_only(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    code = "import time; print('ready 0', flush=True); time.sleep(60)"
    argv = [sys.executable, "-c", code]
    child = launch(argv, tmp_path / "child.log", re.compile(r"ready (\d+)"), cpus=frozenset({cpu}))
    try:
        assert os.sched_getaffinity(child.proc.pid) == {cpu}
    finally:
        child.stop()


def test_thread_cpu_splits_the_main_thread_from_the_others() -> None:
    pid = os.getpid()
    main_before, others_before = thread_cpu(pid)
    started, stop = threading.Event(), threading.Event()

    def worker() -> None:
        _burn(0.2)
        started.set()
        stop.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert started.wait(10)
        main_after, others_after = thread_cpu(pid)  # the worker is alive: counted
    finally:
        stop.set()
        t.join()
    assert others_after - others_before >= 0.1
    assert main_after - main_before < 0.1  # the main thread only waited
    _burn(0.2)
    assert thread_cpu(pid)[0] - main_after >= 0.1


def test_the_sampler_records_where_the_cpu_goes(tmp_path: Path) -> None:
    """`sampler.py` as `--profile` uses it, in a process of its own: idle until SIGUSR1,
    collapsed stacks written on SIGUSR2, the busy function in nearly every sample."""
    out = tmp_path / "samples.txt"
    code = (
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(SCRIPTS)!r})\n"
        "import sampler\n"
        "sampler.load(None)\n"
        "def busy_for_the_sampler():\n"
        "    end = time.process_time() + 0.4\n"
        "    while time.process_time() < end:\n"
        "        pass\n"
        "busy_for_the_sampler()  # before SIGUSR1: not sampled\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "busy_for_the_sampler()\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\n"
    )
    env = {**os.environ, "KMI_ROTOR_SAMPLES": str(out)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    stacks = {}
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        stacks[stack] = int(n)
    total = sum(stacks.values())
    busy = sum(n for s, n in stacks.items() if s.split(";")[-1].startswith("busy_for_the_sampler"))
    assert total >= 50  # about 400 samples of 1 ms of CPU; a loaded machine loses some
    assert busy >= 0.9 * total
    assert all(s.startswith("<module> (<string>:") for s in stacks)
    from bench_overhead import summarise

    assert "0.0% under kmi-rotor frames" in summarise(out.read_text())


def test_the_hook_timer_counts_each_hook_and_passes_everything_on() -> None:
    """`hook_timer.py`'s wrappers: results, awaited values and errors pass through, and each
    hook's calls and CPU are counted (a step of a coroutine, not the time it waits)."""
    import asyncio

    import hook_timer

    class Addon:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def responseheaders(self, flow: str) -> str:
            self.seen.append(flow)
            _burn(0.002)
            return "sync"

        async def request(self, flow: str) -> str:
            _burn(0.002)
            await asyncio.sleep(0.05)  # waiting is not counted
            return f"async {flow}"

        async def error(self, flow: str) -> None:
            raise ValueError(flow)

    addon = Addon()
    assert sorted(hook_timer.wrap(addon)) == ["error", "request", "responseheaders"]
    assert addon.responseheaders("f1") == "sync" and addon.seen == ["f1"]

    async def go() -> str:
        with pytest.raises(ValueError, match="f3"):
            await addon.error("f3")
        return await addon.request("f2")

    assert asyncio.run(go()) == "async f2"
    got = hook_timer.times()
    assert {k: v["calls"] for k, v in got.items()} == {
        "error": 1,
        "request": 1,
        "responseheaders": 1,
    }
    assert 1500 <= got["responseheaders"]["us_per_call"] < 40000
    assert 1500 <= got["request"]["us_per_call"] < 40000  # the 50 ms asleep left out


def test_the_agent_cases_conversation_has_the_size_asked() -> None:
    from bench_load import chat_body

    small = json.loads(chat_body(True))
    body = chat_body(True, 200_000)
    data = json.loads(body)
    assert 190_000 <= len(body) <= 210_000
    assert data["stream"] is True and data["model"] == small["model"]
    assert data["messages"][-1] == small["messages"][-1]
    contents = [m["content"] for m in data["messages"]]
    assert len(set(contents)) == len(contents) > 60


def test_the_spinning_addon_spends_what_it_is_told_in_each_hook(tmp_path: Path) -> None:
    import asyncio
    import importlib.util

    from bench_overhead import SPIN_SHARES, spin_tree

    assert sum(SPIN_SHARES.values()) == pytest.approx(1.0)
    script = spin_tree(tmp_path, 20_000) / "addon" / "rotor.py"
    spec = importlib.util.spec_from_file_location("spin_addon", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (addon,) = module.addons
    options = []
    addon.load(type("Loader", (), {"add_option": lambda self, *a: options.append(a[0])})())
    assert options == ["rotor_config"]
    for hook, share in SPIN_SHARES.items():
        t0 = time.thread_time()
        result = getattr(addon, hook)(None)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
        spent = time.thread_time() - t0
        assert spent >= 20_000e-6 * share * 0.99, hook


@pytest.mark.parametrize(
    ("busy", "warned"), [([0.99, 1.0], False), ([0.99, 0.7], True), ([], False)]
)
def test_a_round_whose_proxies_were_not_busy_is_reported(busy: list[float], warned: bool) -> None:
    """Under `--together` the ratios are the costs' only while the shared CPU was busy."""
    from bench_overhead import CaseResult, Run, report

    run = Run(rps=100.0, p50_ms=1.0, p99_ms=2.0, cpu_us=1000.0, errors=0, p50_1_ms=1.0)
    result = CaseResult("reverse", [run, run], [run, run], busy=busy)
    text = report([result], events=50)
    assert ("WARNING: reverse: the proxies used 0.70" in text) is warned
    assert "| reverse | after | 100 / 100 | 1.00; 1.00, 1.00 |" in text
