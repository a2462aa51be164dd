"""Tests for scripts/bench_overhead.py's CPU accounting: the event loop's thread apart from the
others."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_overhead import thread_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


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
