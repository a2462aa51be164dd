"""What kmi-rotor holds for a flow between choosing its key and the flow's end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from .config import Key, Pool
from .core.outcome import Tokens
from .core.stream_tap import SSETap
from .running import Running


@dataclass(slots=True)
class Served:
    """A flow that holds a key: it is settled (its slot freed, its answer recorded) through the
    `Running` that admitted it, whatever configuration applies by then."""

    run: Running
    pool: Pool
    key: Key
    reservation: Any
    attempt: int
    started: float
    """`time.monotonic()` when the key was chosen."""
    wall: float
    """Wall-clock time the request arrived."""
    stream_request: bool = False
    estimated_from_size: bool = False
    ttfb: float | None = None
    tap: SSETap | None = None
    tokens: Tokens = (None, None)
    flow: http.HTTPFlow | None = None
    """The flow the key went into, so that it can be masked at shutdown whatever its stage."""
    scope: str = ""
    """The request's limit scope (`core/scope.py`): where its answer's windows and 429 go."""
    labelled: http.Response | None = None
    """The answer `responseheaders` named the key on (a failover's comes later, unnamed)."""
