"""What a flow says, read without side effects on kmi-rotor's state: helpers of the hooks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from .config import Key, Pool
from .core.signals import FailureKind, Signal
from .core.stream_tap import SSETap, StreamOutcome
from .core.tokens import MAX_TOKENS

META = "kmi_rotor"


@dataclass
class Served:
    """What kmi-rotor holds for a flow between choosing its key and its end."""

    pool: Pool
    key: Key
    reservation: Any
    attempt: int
    started: float
    wall: float
    stream_request: bool = False
    estimated_from_size: bool = False
    ttfb: float | None = None
    tap: SSETap | None = None
    tokens: tuple[int | None, int | None] = (None, None)
    flow: http.HTTPFlow | None = None
    """The flow the key went into, so that it can be masked at shutdown whatever its stage."""


CLIENT_GONE = ("client disconnected", "stream reset by client", "client closed")


def client_left(reason: str) -> bool:
    """Whether a flow's error is the client leaving (HTTP/1 close, HTTP/2 stream reset), which
    is never the key's fault."""
    lowered = reason.lower()
    return any(marker in lowered for marker in CLIENT_GONE)


def content_length(request: http.Request) -> int | None:
    try:
        return int(request.headers.get("content-length", ""))
    except ValueError:
        return None


def wants_stream(request: http.Request, body: bytes) -> bool:
    """Whether the client asked for a streamed answer: the body's `stream` decides when it has
    one; otherwise Gemini's streaming method or an `Accept: text/event-stream`."""
    if b'"stream"' in body:
        stream = json_object(body).get("stream")
        if isinstance(stream, bool):
            return stream
    return "streamGenerateContent" in request.path or "text/event-stream" in request.headers.get(
        "accept", ""
    )


def json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def ask_for_usage(flow: http.HTTPFlow) -> None:
    """OpenAI-style streams carry usage only when asked: ask, unless the client said otherwise."""
    if not flow.request.path.split("?")[0].endswith("/chat/completions"):
        return
    data = json_object(flow.request.raw_content or b"")
    options = data.get("stream_options")
    if options is None:
        data["stream_options"] = {"include_usage": True}
    elif isinstance(options, dict) and "include_usage" not in options:
        options["include_usage"] = True
    else:
        return
    flow.request.content = json.dumps(data).encode()
    flow.metadata[META]["usage_requested"] = True


def stream_tokens(stream: StreamOutcome) -> tuple[int | None, int | None]:
    if stream.usage is None:
        return None, None
    return _capped(stream.usage.input_tokens), _capped(stream.usage.output_tokens)


def _capped(n: int | None) -> int | None:
    return None if n is None else min(max(0, n), MAX_TOKENS)


def stream_signal(sig: Signal, stream: StreamOutcome) -> tuple[Signal, str]:
    """A stream that failed in the middle, or never finished, is a failure of its key: of the
    kind its in-stream error would have had as an HTTP answer, or an overload when cut."""
    err = stream.error
    if err is not None:
        status = sig.status if err.status is None else err.status
        return Signal(status, err.kind, None, sig.windows, err.reason[:120]), "stream_error"
    if stream.truncated:
        failed = Signal(sig.status, FailureKind.OVERLOADED, None, sig.windows, "stream cut short")
        return failed, "truncated"
    return sig, sig.kind.value


def total(tokens: tuple[int | None, int | None]) -> int | None:
    known = [t for t in tokens if t is not None]
    return sum(known) if known else None


def count_outcome(d: Any, sig: Signal, tokens: tuple[int | None, int | None]) -> None:
    """Add an answer to a key's counters: errors, upstream 429s, tokens."""
    if sig.kind not in (FailureKind.OK, FailureKind.CLIENT_ERROR):
        d.add("errors")
    if sig.status == 429 and sig.kind in (FailureKind.RATE_LIMITED, FailureKind.QUOTA):
        d.add("upstream_429")
    count_tokens(d, tokens)


def count_tokens(d: Any, tokens: tuple[int | None, int | None]) -> None:
    if tokens[0]:
        d.add("tokens_in", tokens[0])
    if tokens[1]:
        d.add("tokens_out", tokens[1])


class Counters:
    """A key's pending changes whose counters also go to `also` (the shared state)."""

    def __init__(self, delta: Any, fp: str, also: Any) -> None:
        self.delta, self._fp, self._also = delta, fp, also

    def add(self, name: str, n: int = 1) -> None:
        self.delta.add(name, n)
        self._also(self._fp, name, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.delta, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("delta", "_fp", "_also"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.delta, name, value)
