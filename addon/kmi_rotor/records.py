"""What kmi-rotor writes down about each flow: its comment and marker in mitmweb, its
metadata in saved flows, and its line in the trace."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict
from typing import Any

from mitmproxy import http

from .config import Pool
from .core.signals import FailureKind, Signal
from .engine import Engine
from .flows import META, Served
from .trace import TraceRecord, TraceWriter

log = logging.getLogger("kmi_rotor")


class Bookkeeping:
    engine: Engine | None
    trace: TraceWriter | None
    _recent: deque[dict[str, Any]]
    clock: Any

    def _annotate(self, flow: http.HTTPFlow, served: Served, sig: Signal, outcome: str) -> None:
        assert self.engine is not None and flow.response is not None
        parts = [f"key {served.key.label}", str(flow.response.status_code)]
        if served.attempt > 1:
            parts.append(f"attempt {served.attempt}")
        st = self.engine.key_status(served.key, self.clock())
        if st["status"] != "ready":
            until = st["until"]
            left = f" {max(0, round(until - self.clock()))}s" if until else ""
            parts.append(f"{st['status']}{left}")
        flow.comment = " · ".join(parts)
        if sig.kind not in (FailureKind.OK, FailureKind.CLIENT_ERROR) or outcome != sig.kind.value:
            flow.marked = ":warning:"
        flow.metadata[META].update(
            {
                "outcome": outcome,
                "status": flow.response.status_code,
                "reason": sig.reason,
                **({"detail": sig.detail} if sig.detail else {}),
                "key_status": st["status"],
                "tokens_in": served.tokens[0],
                "tokens_out": served.tokens[1],
            }
        )

    def _trace(
        self, flow: http.HTTPFlow, pool: Pool, served: Served | None, outcome: str, arrived: float
    ) -> None:
        total = None if served is None else (time.monotonic() - served.started) * 1000
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
            )
            self._recent.append(asdict(record))
            if self.trace is not None:
                self.trace.write(record)
        except Exception:
            log.exception("kmi-rotor: could not trace a request")
