"""A sampling profiler inside mitmdump, for `bench_overhead.py --profile`.

Loaded with `mitmdump -s scripts/sampler.py`, it does nothing until the process gets SIGUSR1.
From then on, every millisecond of the process's CPU time (`ITIMER_PROF`) it records the
Python stack the event loop's thread is in; SIGUSR2 stops it and writes the stacks, collapsed
(`frame;frame;... count`, one line each, the outermost frame first, a frame written
`function (path:line)`), to the file named by `$KMI_ROTOR_SAMPLES`, atomically.

What it sees: Python runs a signal handler in the main thread between two bytecodes, so time
spent in C (a TLS read, a JSON parse) is charged to the Python function that called it, and
the CPU of other threads (kmi-rotor's writers) to whatever the main thread was doing then.
Unlike an outside profiler it needs no permission to read another process's memory.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from types import FrameType

PERIOD = 0.001
"""Seconds of the process's CPU time between two samples."""

_stacks: Counter[str] = Counter()
_names: dict[object, str] = {}


def _frame_name(frame: FrameType) -> str:
    code = frame.f_code
    name = _names.get(code)
    if name is None:
        name = _names[code] = f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})"
    return name


def _sample(signum: int, frame: FrameType | None) -> None:
    names = []
    while frame is not None:
        names.append(_frame_name(frame))
        frame = frame.f_back
    if names:
        _stacks[";".join(reversed(names))] += 1


def _start(signum: int, frame: FrameType | None) -> None:
    _stacks.clear()
    signal.setitimer(signal.ITIMER_PROF, PERIOD, PERIOD)


def _stop(signum: int, frame: FrameType | None) -> None:
    signal.setitimer(signal.ITIMER_PROF, 0, 0)
    out = Path(os.environ.get("KMI_ROTOR_SAMPLES", f"samples-{os.getpid()}.txt"))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(f"{stack} {n}\n" for stack, n in _stacks.items()))
    tmp.replace(out)


def load(loader: object) -> None:
    signal.signal(signal.SIGPROF, _sample)
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
