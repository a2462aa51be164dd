"""What a configured proxy runs on: its settings, the engine, the state kept on disk, the trace
and where the engine's state lives (this process, or Redis). Created when a configuration
first applies; none of it optional. A reload replaces `settings` (and `state`, when
`[cluster]` changed) in place; so does a new state folder (at start-up) its keeper and trace."""

from __future__ import annotations

from dataclasses import dataclass

from .cluster.state import EngineState
from .config import Settings
from .engine import Engine
from .keeper import StateKeeper
from .trace import TraceWriter


@dataclass
class Running:
    settings: Settings
    engine: Engine
    keeper: StateKeeper
    trace: TraceWriter
    state: EngineState

    def close(self) -> None:
        """Flush the state and the trace (shutdown, or a new state folder; blocking)."""
        self.keeper.close_blocking()
        self.trace.close()
