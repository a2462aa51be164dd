"""Time kmi-rotor's hooks in place, inside a real mitmdump under load.

`bench_hooks.py` runs the hooks in a tight loop, where caches stay warm; inside a loaded proxy
the same code costs two to three times more. Loaded beside kmi-rotor, this script wraps each
of the addon's hooks once the proxy runs and counts the CPU time of the hook's own steps
(`time.thread_time`, around every step of a coroutine, so the time other tasks run while a
hook waits is not counted). At `done` it writes, to `$KMI_ROTOR_HOOK_TIMES` (default
`hook-times-PID.json`), each hook's calls and CPU µs per call:

    mitmdump -s addon/rotor.py -s scripts/hook_timer.py --set rotor_config=...

A measuring tool: each step costs two `thread_time` calls (about 1 µs) more.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Generator
from typing import Any

import mitmproxy.proxy.layers
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import ctx, hooks
from mitmproxy.addonmanager import traverse

_spent: Counter[str] = Counter()
_calls: Counter[str] = Counter()
_clock = time.thread_time
_SKIPPED = frozenset({"load", "configure", "running", "done"})


class _Timed:
    """Awaits `coro`, counting the CPU time of each of its steps under `name`."""

    __slots__ = ("coro", "name")

    def __init__(self, coro: Any, name: str) -> None:
        self.coro, self.name = coro, name

    def __await__(self) -> Generator[Any, Any, Any]:
        value, error = None, None
        while True:
            start = _clock()
            try:
                step = self.coro.send(value) if error is None else self.coro.throw(error)
            except StopIteration as stop:
                _spent[self.name] += _clock() - start
                return stop.value
            _spent[self.name] += _clock() - start
            try:
                value, error = (yield step), None
            except BaseException as e:  # handed on to the coroutine, as `await` would
                value, error = None, e


def timed(name: str, hook: Callable[..., Any]) -> Callable[..., Any]:
    """`hook`, counting its calls and CPU time under `name`."""
    if inspect.iscoroutinefunction(hook):

        def run_async(*args: Any) -> _Timed:
            _calls[name] += 1
            return _Timed(hook(*args), name)

        return run_async

    def run(*args: Any) -> Any:
        _calls[name] += 1
        start = _clock()
        try:
            return hook(*args)
        finally:
            _spent[name] += _clock() - start

    return run


def wrap(addon: object) -> list[str]:
    """Replace `addon`'s hooks (those mitmproxy knows) by timed ones; their names."""
    names = []
    for name in hooks.all_hooks:
        hook = getattr(addon, name, None)
        if callable(hook) and name not in _SKIPPED:
            setattr(addon, name, timed(name, hook))
            names.append(name)
    return names


def times() -> dict[str, dict[str, float]]:
    return {
        name: {"calls": n, "us_per_call": round(_spent[name] / n * 1e6, 1)}
        for name, n in sorted(_calls.items())
    }


def running() -> None:
    for addon in traverse(ctx.master.addons.chain):
        if type(addon).__name__ == "Rotor":
            wrap(addon)


def done() -> None:
    path = os.environ.get("KMI_ROTOR_HOOK_TIMES", f"hook-times-{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(times(), f, indent=1)
