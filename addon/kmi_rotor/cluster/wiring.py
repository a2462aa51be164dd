"""How the addon picks and runs its `EngineState`: Redis with `[cluster]`, in-process without."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..engine import Engine
from ..listening import address as listen_address
from .state import EngineState, LocalState


def share(
    current: EngineState,
    settings: Settings,
    engine: Engine,
    on_action: Callable[[dict[str, Any]], None],
    in_flight: Callable[[], int],
) -> EngineState:
    """The state for `settings`: the current one when its Redis is unchanged (a reload keeps
    the connection), a new one when it changed, the in-process one without `[cluster]`."""
    from .node import RedisState

    wanted = settings.cluster
    if wanted is None:
        stop(current)
        engine.shared = None
        return current if isinstance(current, LocalState) else LocalState()
    if not isinstance(current, RedisState) or current.cluster != wanted:
        stop(current)
        current = RedisState(wanted, listen=listen_address())
    current.on_action, current.in_flight = on_action, in_flight
    current.configure(settings, engine)
    return current


def start(state: EngineState) -> None:
    from .node import RedisState

    if isinstance(state, RedisState):
        state.listen = state.listen or listen_address()
        state.start()


def stop(state: EngineState) -> None:
    """Stop a shared state's background work (from a hook: scheduled, never awaited here)."""
    from .node import RedisState

    if not isinstance(state, RedisState):
        return
    with contextlib.suppress(RuntimeError):  # no loop running: nothing was started
        loop = asyncio.get_running_loop()
        task = loop.create_task(state.stop())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[Any]] = set()
