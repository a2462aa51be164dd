"""What kmi-rotor writes down about each flow: its comment and marker in mitmweb, its metadata
in saved flows, its line in the trace (and among the status page's recent requests), and its
key's counters in the state file (and the shared state)."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from mitmproxy import http

from .config import Key, Pool
from .core.outcome import Tokens
from .core.signals import FailureKind, Signal
from .core.state import KeyDelta
from .names import META
from .running import Running
from .served import Served
from .trace import TraceRecord

log = logging.getLogger("kmi_rotor")

RECENT = 200
"""Requests the status page lists."""


class RecentRequests:
    """The trace records of the last `size` requests, oldest first.

    Records are kept as they are; iterating gives each as the status page's dict
    (`TraceRecord.as_dict`), built then: the page is asked for far less often than requests
    are traced.
    """

    def __init__(self, size: int = RECENT) -> None:
        self._records: deque[TraceRecord] = deque(maxlen=size)

    def add(self, record: TraceRecord) -> None:
        """Keep `record`, forgetting the oldest one when `size` are kept."""
        self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter([r.as_dict() for r in self._records])


class Counters:
    """A key's pending changes in the state file; its counters also go to the shared state."""

    def __init__(self, delta: KeyDelta, fp: str, also: Callable[[str, str, int], None]) -> None:
        self.delta, self._fp, self._also = delta, fp, also

    def add(self, name: str, n: int = 1) -> None:
        self.delta.add(name, n)
        self._also(self._fp, name, n)

    def answer(self, sig: Signal, tokens: Tokens) -> None:
        """Add an answer: an error, an upstream 429, its tokens."""
        if sig.kind not in (FailureKind.OK, FailureKind.CLIENT_ERROR):
            self.add("errors")
        if sig.status == 429 and sig.kind in (FailureKind.RATE_LIMITED, FailureKind.QUOTA):
            self.add("upstream_429")
        self.tokens(tokens)

    def tokens(self, tokens: Tokens) -> None:
        if tokens[0]:
            self.add("tokens_in", tokens[0])
        if tokens[1]:
            self.add("tokens_out", tokens[1])


class Bookkeeping:
    """Writes down each flow; keeps the last requests for the status page."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.recent = RecentRequests()

    def counters(self, run: Running, key: Key) -> Counters:
        """Where a key's counters go: the state file, and the shared state when there is one."""
        return Counters(run.keeper.key(key), key.fingerprint, run.state.count)

    def annotate(self, flow: http.HTTPFlow, served: Served, sig: Signal, outcome: str) -> None:
        """Comment, marker and metadata of a flow that got an answer from upstream."""
        status = flow.response.status_code if flow.response is not None else None
        parts = [f"key {served.key.label}", str(status)]
        if served.attempt > 1:
            parts.append(f"attempt {served.attempt}")
        now = self.clock()
        st = served.run.engine.standing(served.key, now)  # its reason is not shown here
        if st["status"] != "ready":
            until = st["until"]
            left = f" {max(0, round(until - now))}s" if until else ""
            parts.append(f"{st['status']}{left}")
        flow.comment = " · ".join(parts)
        if sig.kind not in (FailureKind.OK, FailureKind.CLIENT_ERROR) or outcome != sig.kind.value:
            flow.marked = ":warning:"
        flow.metadata[META].update(
            {
                "outcome": outcome,
                "status": status,
                "reason": sig.reason,
                **({"detail": sig.detail} if sig.detail else {}),
                "key_status": st["status"],
                "tokens_in": served.tokens[0],
                "tokens_out": served.tokens[1],
            }
        )

    def failed(self, flow: http.HTTPFlow, served: Served, outcome: str, reason: str) -> None:
        """Comment and metadata of a flow that ended in an error (`reason`: scrubbed)."""
        flow.comment = f"key {served.key.label} · {outcome}: {reason[:80]}"
        if served.attempt > 1:
            flow.comment += f" · attempt {served.attempt}"
        flow.metadata[META].update({"outcome": outcome, "error": reason})

    def trace(
        self,
        run: Running,
        flow: http.HTTPFlow,
        pool: Pool,
        served: Served | None,
        outcome: str,
        arrived: float,
    ) -> None:
        """The flow's trace line (`served`: None for a request answered before a key)."""
        total = None if served is None else (time.monotonic() - served.started) * 1000
        scope = served.scope if served else flow.metadata.get(META, {}).get("scope")
        try:
            record = TraceRecord(
                ts=arrived,
                id=flow.id,
                pool=pool.name,
                key=served.key.label if served else None,
                fp=served.key.fingerprint if served else None,
                method=flow.request.method,
                path=flow.request.path,
                status=flow.response.status_code if flow.response else None,
                ttfb_ms=served.ttfb * 1000 if served and served.ttfb is not None else None,
                total_ms=total,
                tokens_in=served.tokens[0] if served else None,
                tokens_out=served.tokens[1] if served else None,
                outcome=outcome,  # type: ignore[arg-type]
                attempt=served.attempt if served else 1,
                stream=bool(served and served.tap),
                scope=scope or None,
            )
            self.recent.add(record)
            run.trace.write(record)
        except Exception:
            log.exception("kmi-rotor: could not trace a request")
