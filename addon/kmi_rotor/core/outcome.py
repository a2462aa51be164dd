"""What an ended request says about its key: the tokens it used, the signal of a streamed
answer that failed or was cut, and whether its client simply left."""

from __future__ import annotations

from .signals import FailureKind, Signal
from .stream_tap import StreamOutcome
from .tokens import MAX_TOKENS

Tokens = tuple[int | None, int | None]
"""Input and output tokens, each None when unknown."""

CLIENT_GONE = ("client disconnected", "stream reset by client", "client closed")


def client_left(reason: str) -> bool:
    """Whether a flow's error is the client leaving (HTTP/1 close, HTTP/2 stream reset), which
    is never the key's fault."""
    lowered = reason.lower()
    return any(marker in lowered for marker in CLIENT_GONE)


def stream_tokens(stream: StreamOutcome) -> Tokens:
    """The usage a stream reported, each count bounded to [0, MAX_TOKENS]."""
    if stream.usage is None:
        return None, None
    return _capped(stream.usage.input_tokens), _capped(stream.usage.output_tokens)


def _capped(n: int | None) -> int | None:
    return None if n is None else min(max(0, n), MAX_TOKENS)


def stream_signal(sig: Signal, stream: StreamOutcome) -> tuple[Signal, str]:
    """A stream that failed in the middle, or never finished, is a failure of its key: of the
    kind its in-stream error would have had as an HTTP answer, or an overload when cut. With
    the outcome to record (`stream_error`, `truncated`, or the answer's own kind)."""
    err = stream.error
    if err is not None:
        status = sig.status if err.status is None else err.status
        return Signal(status, err.kind, None, sig.windows, err.reason[:120]), "stream_error"
    if stream.truncated:
        failed = Signal(sig.status, FailureKind.OVERLOADED, None, sig.windows, "stream cut short")
        return failed, "truncated"
    return sig, sig.kind.value


def total(tokens: Tokens) -> int | None:
    """Input and output together; None when neither is known."""
    tokens_in, tokens_out = tokens
    if tokens_in is None:
        return tokens_out
    return tokens_in if tokens_out is None else tokens_in + tokens_out
