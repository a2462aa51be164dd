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
        comment = f"key {served.key.label} · {status}"
        if served.attempt > 1:
            comment += f" · attempt {served.attempt}"
        now = self.clock()
        st = served.run.engine.standing(served.key, now)  # its reason is not shown here
        key_status = st["status"]
        if key_status != "ready":
            until = st["until"]
            left = f" {max(0, round(until - now))}s" if until else ""
            comment += f" · {key_status}{left}"
        flow.comment = comment
        kind = sig.kind  # a StrEnum: equal to its value, read without the enum's property
        if kind not in (FailureKind.OK, FailureKind.CLIENT_ERROR) or outcome != kind:
            flow.marked = ":warning:"
        # Set one by one, in the order they are listed: no dict made to update from.
        meta = flow.metadata[META]
        meta["outcome"] = outcome
        meta["status"] = status
        meta["reason"] = sig.reason
        if sig.detail:
            meta["detail"] = sig.detail
        meta["key_status"] = key_status
        meta["tokens_in"], meta["tokens_out"] = served.tokens

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
        if served is not None:
            self._trace_served(run, flow, pool, served, outcome, arrived)
            return
        try:
            record = TraceRecord(
                ts=arrived,
                id=flow.id,
                pool=pool.name,
                key=None,
                fp=None,
                method=flow.request.method,
                path=flow.request.path,
                status=flow.response.status_code if flow.response else None,
                ttfb_ms=None,
                total_ms=None,
                tokens_in=None,
                tokens_out=None,
                outcome=outcome,  # type: ignore[arg-type]
                attempt=1,
                stream=False,
                scope=flow.metadata.get(META, {}).get("scope") or None,
            )
            self.recent.add(record)
            run.trace.write(record)
        except Exception:
            log.exception("kmi-rotor: could not trace a request")

    def _trace_served(
        self,
        run: Running,
        flow: http.HTTPFlow,
        pool: Pool,
        served: Served,
        outcome: str,
        arrived: float,
    ) -> None:
        """`trace` of a flow that held a key (every answer's): its fields given in their
        order, not by name, and not asking for each whether there was a key."""
        total = (time.monotonic() - served.started) * 1000
        try:
            key, request, response = served.key, flow.request, flow.response
            ttfb, tokens = served.ttfb, served.tokens
            record = TraceRecord(
                arrived,  # ts
                flow.id,
                pool.name,
                key.label,
                key.fingerprint,
                request.method,
                request.path,
                response.status_code if response else None,
                ttfb * 1000 if ttfb is not None else None,
                total,
                tokens[0],
                tokens[1],
                outcome,  # type: ignore[arg-type]
                served.attempt,
                bool(served.tap),  # stream
                served.scope or None,
            )
            self.recent.add(record)
            run.trace.write(record)
        except Exception:
            log.exception("kmi-rotor: could not trace a request")
