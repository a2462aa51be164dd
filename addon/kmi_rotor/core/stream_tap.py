"""What a streamed answer says about itself, read in its dialect (OpenAI's or Anthropic's).

`SSETap` is handed every chunk of a streamed answer (arbitrary byte boundaries), frames it with
`sse.SSEReader` and reports what the events said: token usage, an error sent after the stream
began (classified by `classify.classify_stream_error`, the rules of an HTTP answer), whether
it reached its terminal event. It observes only: every chunk is returned unchanged, nothing is
delayed, and no input whatsoever makes it raise.

Events are decoded (invalid bytes replaced) only when they are parsed as JSON, and an event is
parsed only when a plain substring test shows it can carry usage, an error or a finish reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .classify import StreamFailure, classify_stream_error
from .sse import MAX_LINE, SSEReader

__all__ = ["MAX_LINE", "SSETap", "StreamOutcome", "Usage"]

_DONE = b"[DONE]"
_MESSAGE_START = b"message_start"
_MESSAGE_DELTA = b"message_delta"
_MESSAGE_STOP = b"message_stop"
_ERROR = b"error"
_ANTHROPIC_EVENTS = frozenset(
    {
        _MESSAGE_START,
        _MESSAGE_DELTA,
        _MESSAGE_STOP,
        b"content_block_start",
        b"content_block_delta",
        b"content_block_stop",
        b"ping",
    }
)
_ANTHROPIC_PARSED = frozenset({_MESSAGE_START, _MESSAGE_DELTA, _ERROR})
_MESSAGE_MAX = 120
# `"usage"`, `"error"` or `"finish_reason"` as an object key whose value is not null (JSON
# whitespace allowed around the colon), or `"message_stop"`: one pass over the event's bytes.
_WORTH_PARSING = re.compile(
    rb'"(?:usage|error|finish_reason)"[ \t\r\n]*:(?![ \t\r\n]*null)|"message_stop"'
)


@dataclass(frozen=True)
class Usage:
    """Token counts a stream reported; None where it did not say."""

    input_tokens: int | None
    output_tokens: int | None


@dataclass(frozen=True)
class StreamOutcome:
    """What a stream said about itself, so far or in the end.

    `truncated` is True only once the stream has ended (see `SSETap.finish`) with neither a
    terminal event (`data: [DONE]`, `event: message_stop`) nor an in-stream error, and only if
    the tap watched all of it.
    """

    events: int
    usage: Usage | None
    error: StreamFailure | None
    terminal_seen: bool
    truncated: bool
    bytes: int
    dialect: str | None


class SSETap:
    """Incremental observer of one SSE response; usable directly as mitmproxy's `stream`.

    Contract:
    - `tap(chunk)` returns `chunk` itself; a non-empty chunk is fed, `b""` ends the stream.
    - `feed`, `finish` and `__call__` never raise. A bug met while parsing stops the parsing
      for good (`internal_error` says why); bytes are still counted and passed through.
    - `finish()` is idempotent: the first call fixes the outcome; chunks fed afterwards are
      ignored.
    - A final event lacking its blank line is not dispatched (per the SSE rules), but if its
      lines were complete and it is `data: [DONE]` or `event: message_stop`, it still counts
      as the terminal event: the answer was whole, only the framing was cut.
    - Named events other than Anthropic's and `error` are ignored (they are neither dialect's).
    """

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        self._reader = SSEReader(self._inspect, max_line=max_line)
        self._events = 0
        self._bytes = 0
        self._input: int | None = None
        self._output: int | None = None
        self._error: StreamFailure | None = None
        self._terminal = False
        self._dialect: str | None = None
        self._broken: str | None = None
        self._final: StreamOutcome | None = None

    # -- public ---------------------------------------------------------------------------

    def __call__(self, chunk: bytes) -> bytes:
        """Observe `chunk` and hand it back unchanged; `b""` marks the end of the stream."""
        try:
            # `not chunk` first: a non-empty chunk (nearly every call) skips the type test.
            if not chunk and isinstance(chunk, bytes | bytearray | memoryview):
                self.finish()
            else:
                self.feed(chunk)
        except Exception:  # feed/finish already guard themselves; this is the last line
            pass
        return chunk

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk. Empty chunks do nothing; anything but bytes-like is ignored."""
        if self._final is not None:
            return
        try:
            if isinstance(chunk, bytes):
                data = chunk
            elif isinstance(chunk, bytearray | memoryview):
                data = bytes(chunk)
            else:
                return
            self._bytes += len(data)
            if data and self._broken is None:
                self._reader.feed(data)
        except Exception as exc:
            self._break(exc)

    def finish(self) -> StreamOutcome:
        """End the stream: fix and return the outcome (the same one on every later call)."""
        if self._final is not None:
            return self._final
        try:
            if self._broken is None:
                self._terminal = self._terminal or self._pending_is_terminal()
        except Exception as exc:
            self._break(exc)
        self._final = self._snapshot(finished=True)
        return self._final

    @property
    def outcome(self) -> StreamOutcome:
        """The outcome so far (the final one after `finish`); `truncated` is False until then.

        A flow that ends in error never delivers `b""`: call `finish()` then to learn whether
        the stream had already reached its end.
        """
        return self._final if self._final is not None else self._snapshot(finished=False)

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished line; never more than `max_line`."""
        return self._reader.buffered

    @property
    def discarded_lines(self) -> int:
        """Lines, and events' data, dropped for exceeding `max_line`."""
        return self._reader.discarded

    @property
    def internal_error(self) -> str | None:
        """Why the tap stopped parsing, if it did (a bug in the tap)."""
        return self._broken

    # -- dialects -------------------------------------------------------------------------

    def _pending_is_terminal(self) -> bool:
        """Whether the undispatched event left at the end is a complete terminal event."""
        etype, data = self._reader.pending()
        if etype == _MESSAGE_STOP:
            return True
        return etype in (b"", b"message") and data == [_DONE]

    def _inspect(self, etype: bytes, data: bytes | None) -> None:
        self._events += 1
        if data is None:
            return  # its data was too long to keep: counted, not read
        if etype in (b"", b"message"):
            self._inspect_unnamed(data)
        elif etype in _ANTHROPIC_EVENTS:
            self._dialect = self._dialect or "anthropic"
            if etype == _MESSAGE_STOP:
                self._terminal = True
            elif etype in _ANTHROPIC_PARSED:
                obj = _parse(data)
                if obj is not None:
                    self._anthropic(etype, obj)
        elif etype == _ERROR:
            self._inspect_error(data)

    def _inspect_error(self, data: bytes) -> None:
        obj = _parse(data)
        if obj is None:  # an error event is a failure even when its payload is unreadable
            self._set_error(classify_stream_error(data.decode("utf-8", "replace")))
            return
        if obj.get("type") == "error":
            self._dialect = self._dialect or "anthropic"
        self._anthropic(_ERROR, obj)

    def _inspect_unnamed(self, data: bytes) -> None:
        if len(data) < 16 and data.strip() == _DONE:
            self._dialect = self._dialect or "openai"
            self._terminal = True
            return
        if not _worth_parsing(data):
            if self._dialect is None and data[:1] == b"{":
                self._dialect = "openai"
            return
        obj = _parse(data)
        if obj is None:
            return
        name = _anthropic_name(obj)
        if name is not None:
            self._dialect = self._dialect or "anthropic"
            if name == _MESSAGE_STOP:
                self._terminal = True
            elif name in _ANTHROPIC_PARSED:
                self._anthropic(name, obj)
            return
        self._dialect = self._dialect or "openai"
        self._openai(obj)

    def _openai(self, obj: dict[str, Any]) -> None:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._take_usage(
                usage.get("prompt_tokens", usage.get("input_tokens")),
                usage.get("completion_tokens", usage.get("output_tokens")),
            )
        choices = obj.get("choices")
        failed = isinstance(choices, list) and any(
            isinstance(c, dict) and c.get("finish_reason") == "error" for c in choices
        )
        err = obj.get("error")
        if err is not None or failed:
            body = {} if err is None else {"error": err}
            self._set_error(classify_stream_error(body, finish_error=failed))

    def _anthropic(self, name: bytes, obj: dict[str, Any]) -> None:
        if name == _MESSAGE_START:
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif name == _MESSAGE_DELTA:
            usage = obj.get("usage")
        else:
            # The event is the error body itself (Anthropic: `{"type": "error", "error": {}}`;
            # other servers put the code and message at the top level).
            self._set_error(classify_stream_error(obj))
            return
        if isinstance(usage, dict):
            self._take_usage(usage.get("input_tokens"), usage.get("output_tokens"))

    def _take_usage(self, input_tokens: object, output_tokens: object) -> None:
        # Counts are cumulative in both dialects, so the latest known value of each wins.
        inp, out = _count(input_tokens), _count(output_tokens)
        if inp is not None:
            self._input = inp
        if out is not None:
            self._output = out

    def _set_error(self, error: StreamFailure) -> None:
        if self._error is None:  # the first failure is the cause; later ones are fallout
            self._error = error

    # -- bookkeeping ----------------------------------------------------------------------

    def _snapshot(self, *, finished: bool) -> StreamOutcome:
        known = self._input is not None or self._output is not None
        return StreamOutcome(
            events=self._events,
            usage=Usage(self._input, self._output) if known else None,
            error=self._error,
            terminal_seen=self._terminal,
            truncated=finished
            and not self._terminal
            and self._error is None
            and self._broken is None,
            bytes=self._bytes,
            dialect=self._dialect,
        )

    def _break(self, exc: BaseException) -> None:
        self._broken = self._broken or f"{type(exc).__name__}: {exc}"[:_MESSAGE_MAX]
        self._reader.clear()


def _anthropic_name(obj: dict[str, Any]) -> bytes | None:
    """The Anthropic event an unnamed payload is, by its own `type`; None when it is none.

    Some Anthropic-compatible servers leave out the `event:` line; the payload still names it.
    """
    kind = obj.get("type")
    name = kind.encode("utf-8", "replace") if isinstance(kind, str) else b""
    if name in _ANTHROPIC_EVENTS or (name == _ERROR and isinstance(obj.get("error"), dict)):
        return name
    return None


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _parse(data: bytes) -> dict[str, Any] | None:
    """The event's JSON object, or None for anything else (never raises on bad input)."""
    try:
        obj = json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _worth_parsing(data: bytes) -> bool:
    """Whether the data can carry usage, an error, a finish reason or Anthropic's end.

    Plain text tests: inside a JSON string a quote is escaped, so text the model wrote cannot
    fake a key, and content chunks (`"finish_reason":null`, `"usage":null`) are skipped.
    """
    return _WORTH_PARSING.search(data) is not None
