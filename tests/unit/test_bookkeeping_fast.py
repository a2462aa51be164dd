"""A flow's notes and trace line, written the short way, are what the long way wrote."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy.test import tflow, tutils

from kmi_rotor.bookkeeping import Bookkeeping
from kmi_rotor.core.signals import FailureKind, Signal
from kmi_rotor.names import META
from kmi_rotor.trace import TraceRecord

NOW = 1_795_793_400.0


class _Trace:
    def __init__(self) -> None:
        self.records: list[TraceRecord] = []

    def write(self, record: TraceRecord) -> None:
        self.records.append(record)


def _served(standing: dict[str, Any], **changes: Any) -> SimpleNamespace:
    engine = SimpleNamespace(standing=lambda key, now: dict(standing))
    fields: dict[str, Any] = {
        "run": SimpleNamespace(engine=engine, trace=_Trace()),
        "pool": SimpleNamespace(name="p"),
        "key": SimpleNamespace(label="a", fingerprint="sha256:00"),
        "attempt": 1,
        "started": time.monotonic(),
        "ttfb": 0.25,
        "tap": None,
        "tokens": (3, 4),
        "scope": "model:m",
    }
    return SimpleNamespace(**(fields | changes))


def _flow(status: int | None) -> Any:
    f = tflow.tflow(req=tutils.treq(path=b"/v1/chat/completions?key=secret"))
    f.response = None if status is None else tutils.tresp(status_code=status)
    f.metadata[META] = {"earlier": 1, "status": "old"}
    return f


def _annotate_as_before(flow: Any, served: Any, sig: Signal, outcome: str, now: float) -> None:
    status = flow.response.status_code if flow.response is not None else None
    parts = [f"key {served.key.label}", str(status)]
    if served.attempt > 1:
        parts.append(f"attempt {served.attempt}")
    st = served.run.engine.standing(served.key, now)
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


STANDINGS = [
    {"status": "ready", "until": None},
    {"status": "cooling", "until": NOW + 12.4},
    {"status": "blocked", "until": NOW - 3},
    {"status": "disabled", "until": None},
]
SIGNALS = [
    (Signal(200, FailureKind.OK, None, (), "ok"), "ok"),
    (Signal(200, FailureKind.OK, None, (), "ok"), "stream_error"),
    (Signal(429, FailureKind.RATE_LIMITED, None, (), "rate limited"), "rate_limited"),
    (Signal(400, FailureKind.CLIENT_ERROR, None, (), "client error (400)"), "client_error"),
    (Signal(200, FailureKind.AUTH, None, (), "invalid key", "said: no"), "stream_error"),
    (Signal(200, FailureKind.OVERLOADED, None, (), "stream cut short"), "truncated"),
]


@pytest.mark.parametrize("standing", STANDINGS)
@pytest.mark.parametrize(("sig", "outcome"), SIGNALS)
@pytest.mark.parametrize("attempt", [1, 3])
@pytest.mark.parametrize("status", [200, 429, None])
def test_annotate_writes_what_it_wrote_before(
    standing: dict[str, Any], sig: Signal, outcome: str, attempt: int, status: int | None
) -> None:
    served = _served(standing, attempt=attempt, tokens=(None, 7))
    mine, theirs = _flow(status), _flow(status)
    Bookkeeping(clock=lambda: NOW).annotate(mine, served, sig, outcome)  # type: ignore[arg-type]
    _annotate_as_before(theirs, served, sig, outcome, NOW)
    assert mine.comment == theirs.comment
    assert mine.marked == theirs.marked
    assert list(mine.metadata[META].items()) == list(theirs.metadata[META].items())


def _record_as_before(flow: Any, pool: Any, served: Any, outcome: str, arrived: float) -> Any:
    scope = served.scope if served else flow.metadata.get(META, {}).get("scope")
    return TraceRecord(
        ts=arrived,
        id=flow.id,
        pool=pool.name,
        key=served.key.label if served else None,
        fp=served.key.fingerprint if served else None,
        method=flow.request.method,
        path=flow.request.path,
        status=flow.response.status_code if flow.response else None,
        ttfb_ms=served.ttfb * 1000 if served and served.ttfb is not None else None,
        total_ms=None,  # a time: compared apart
        tokens_in=served.tokens[0] if served else None,
        tokens_out=served.tokens[1] if served else None,
        outcome=outcome,  # type: ignore[arg-type]
        attempt=served.attempt if served else 1,
        stream=bool(served and served.tap),
        scope=scope or None,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"ttfb": None, "tokens": (None, None), "scope": ""},
        {"tap": object(), "attempt": 2},
        None,  # no key was chosen
    ],
)
@pytest.mark.parametrize("status", [200, None])
def test_trace_writes_the_record_it_wrote_before(
    changes: dict[str, Any] | None, status: int | None
) -> None:
    served = None if changes is None else _served(STANDINGS[0], **changes)
    run = served.run if served else SimpleNamespace(trace=_Trace())
    flow = _flow(status)
    if served is None:
        flow.metadata[META]["scope"] = "class:opus"
    books = Bookkeeping(clock=lambda: NOW)
    books.trace(run, flow, SimpleNamespace(name="p"), served, "ok", NOW)  # type: ignore[arg-type]
    (mine,) = run.trace.records
    assert list(books.recent) == [mine.as_dict()]
    theirs = _record_as_before(flow, SimpleNamespace(name="p"), served, "ok", NOW)
    if served is None:
        assert mine.total_ms is None
    else:
        assert mine.total_ms is not None and 0 <= mine.total_ms < 60_000
    mine.total_ms = None
    assert mine.as_dict() == theirs.as_dict()
    assert [type(v) for v in mine.as_dict().values()] == [
        type(v) for v in theirs.as_dict().values()
    ]
