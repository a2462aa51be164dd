"""A cheap incremental tap over a Server-Sent Events response body.

`SSETap` is handed every chunk of a streamed answer (arbitrary byte boundaries) and reports what
the stream said about itself: token usage, an error sent after the stream began, whether it
reached its terminal event. It observes only: every chunk is returned unchanged, nothing is
delayed, and no input whatsoever makes it raise.

Parsing follows the WHATWG Server-Sent Events rules: lines end with CRLF, LF or CR (a CR ending
one chunk and an LF opening the next are one line end); `field: value` with one optional space
after the colon; lines opening with `:` are comments; a blank line dispatches the event; `data`
lines are joined with LF; an event with no `data` line is not dispatched; a UTF-8 BOM opening
the stream is dropped.

Cost is kept O(bytes): lines are split on bytes before any decoding (UTF-8 is self-synchronising
and line ends are ASCII, so a character split across chunks is whole by the time its line ends,
and decoding line by line equals decoding the stream), values are decoded (invalid bytes
replaced) only for the few events that are parsed as JSON, and an event is parsed only when a
plain substring test shows it can carry usage, an error or a finish reason. Memory is bounded:
a line, or an event's data, longer than `max_line` bytes is dropped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20
"""Default cap, in bytes, on one line and on one event's data."""

_BOM = b"\xef\xbb\xbf"
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
_JSON_SPACE = b" \t\r\n"

# Structured error names (Anthropic `error.type`, OpenAI `error.code`/`error.type`) and the
# failure each stands for, with the HTTP status that would have carried it.
_NAMED_ERRORS: dict[str, tuple[str, int]] = {
    "overloaded_error": ("overloaded", 529),
    "rate_limit_error": ("rate_limited", 429),
    "rate_limit_exceeded": ("rate_limited", 429),
    "authentication_error": ("auth", 401),
    "invalid_api_key": ("auth", 401),
    "permission_error": ("auth", 403),
    "billing_error": ("quota", 402),
    "insufficient_quota": ("quota", 429),
    "payment_required": ("quota", 402),
    "api_error": ("server_error", 500),
    "server_error": ("server_error", 500),
    "timeout_error": ("server_error", 504),
}
# Only consulted for a 403, which means "bad key" unless the words say the plan ran out
# (Kimi Code answers 403 "usage limit for this billing cycle").
_BILLING_WORDS = (
    "billing",
    "quota",
    "balance",
    "credit",
    "payment",
    "usage limit",
    "余额",
    "欠费",
    "充值",
)


@dataclass(frozen=True)
class Usage:
    """Token counts a stream reported; None where it did not say."""

    input_tokens: int | None
    output_tokens: int | None

    @property
    def total(self) -> int | None:
        """The sum of the known counts; None only when neither is known."""
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)


@dataclass(frozen=True)
class StreamError:
    """A failure reported inside a stream, classified as its HTTP equivalent would be.

    `kind` is one of "overloaded", "rate_limited", "quota", "auth", "server_error", "unknown";
    `status` is the HTTP status it stands for; `message` is at most 120 characters.
    """

    kind: str
    status: int
    message: str


@dataclass(frozen=True)
class StreamOutcome:
    """What a stream said about itself, so far or in the end.

    `truncated` is True only once the stream has ended (see `SSETap.finish`) with neither a
    terminal event (`data: [DONE]`, `event: message_stop`) nor an in-stream error, and only if
    the tap watched all of it.
    """

    events: int
    usage: Usage | None
    error: StreamError | None
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
    - `finish()` is idempotent: the first call fixes the outcome and calls `on_finish` once;
      chunks fed afterwards are ignored.
    - A final event lacking its blank line is not dispatched (per the SSE rules), but if its
      lines were complete and it is `data: [DONE]` or `event: message_stop`, it still counts
      as the terminal event: the answer was whole, only the framing was cut.
    - Named events other than Anthropic's and `error` are ignored (they are neither dialect's).
    """

    def __init__(
        self,
        on_finish: Callable[[StreamOutcome], None] | None = None,
        *,
        max_line: int = MAX_LINE,
    ) -> None:
        self._on_finish = on_finish
        self._max = max_line
        self._buf = bytearray()
        self._discarding = False
        self._skip_lf = False
        self._first_line = True
        self._type = b""
        self._data: list[bytes] = []
        self._data_len = 0
        self._data_dropped = False
        self._events = 0
        self._bytes = 0
        self._discarded = 0
        self._input: int | None = None
        self._output: int | None = None
        self._error: StreamError | None = None
        self._terminal = False
        self._dialect: str | None = None
        self._broken: str | None = None
        self._final: StreamOutcome | None = None

    # -- public ---------------------------------------------------------------------------

    def __call__(self, chunk: bytes) -> bytes:
        """Observe `chunk` and hand it back unchanged; `b""` marks the end of the stream."""
        try:
            if isinstance(chunk, bytes | bytearray | memoryview) and len(chunk) == 0:
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
                self._consume(data)
        except Exception as exc:
            self._break(exc)

    def finish(self) -> StreamOutcome:
        """End the stream: fix and return the outcome, calling `on_finish` on the first call."""
        if self._final is not None:
            return self._final
        try:
            if self._broken is None:
                self._terminal = self._terminal or self._pending_is_terminal()
        except Exception as exc:
            self._break(exc)
        self._final = self._snapshot(finished=True)
        if self._on_finish is not None:
            try:
                self._on_finish(self._final)
            except Exception as exc:  # the caller's bug must not break the stream either
                self._broken = self._broken or f"on_finish: {exc!r}"[:_MESSAGE_MAX]
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
        return len(self._buf)

    @property
    def discarded_lines(self) -> int:
        """Lines, and events' data, dropped for exceeding `max_line`."""
        return self._discarded

    @property
    def internal_error(self) -> str | None:
        """Why the tap stopped parsing, if it did (a bug in the tap or in `on_finish`)."""
        return self._broken

    # -- line splitting -------------------------------------------------------------------

    def _consume(self, chunk: bytes) -> None:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]  # second half of a CRLF split across chunks
        # A trailing CR ends its line now (it is a line end on its own); remember it so that
        # an LF opening the next chunk is not read as a second, empty line.
        self._skip_lf = chunk.endswith(b"\r")
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        nl = chunk.find(b"\n")
        if nl < 0:
            self._keep_partial(chunk)
            return
        self._complete_buffered(chunk[:nl])
        lines = chunk[nl + 1 :].split(b"\n")
        tail = lines.pop()
        for line in lines:
            if len(line) > self._max:
                self._discarded += 1
            else:
                self._line(line)
        self._keep_partial(tail)

    def _keep_partial(self, part: bytes) -> None:
        if not part or self._discarding:
            return
        if len(self._buf) + len(part) > self._max:
            # Drop the whole line, not just its head: the rule stays "a line longer than
            # max_line is ignored" whatever the chunking.
            self._buf.clear()
            self._discarding = True
            self._discarded += 1
            return
        self._buf += part

    def _complete_buffered(self, part: bytes) -> None:
        if self._discarding:
            self._discarding = False
            return
        if len(self._buf) + len(part) > self._max:
            self._buf.clear()
            self._discarded += 1
            return
        line = bytes(self._buf) + part if self._buf else part
        self._buf.clear()
        self._line(line)

    # -- fields and events ----------------------------------------------------------------

    def _line(self, line: bytes) -> None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            self._dispatch()
            return
        if line[0] == 0x3A:  # ":" opens a comment
            return
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if field == b"data":
            self._add_data(value)
        elif field == b"event":
            self._type = value
        # `id`, `retry` and unknown fields say nothing about usage, errors or the end.

    def _add_data(self, value: bytes) -> None:
        if self._data_dropped:
            return
        self._data_len += len(value) + 1
        if self._data_len > self._max:
            self._data_dropped = True
            self._data.clear()
            self._discarded += 1
            return
        self._data.append(value)

    def _dispatch(self) -> None:
        etype, lines, dropped = self._type, self._data, self._data_dropped
        self._type, self._data, self._data_len, self._data_dropped = b"", [], 0, False
        if not lines and not dropped:
            return  # no data line: per the SSE rules, nothing is dispatched
        self._events += 1
        if not dropped:
            self._inspect(etype, lines[0] if len(lines) == 1 else b"\n".join(lines))

    def _pending_is_terminal(self) -> bool:
        """Whether the undispatched event left at the end is a complete terminal event."""
        if self._type == _MESSAGE_STOP:
            return True
        return self._type in (b"", b"message") and self._data == [_DONE]

    # -- dialects -------------------------------------------------------------------------

    def _inspect(self, etype: bytes, data: bytes) -> None:
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
            obj = _parse(data)
            if obj is None:  # an error event is a failure even when its payload is unreadable
                self._set_error(classify_error(data.decode("utf-8", "replace"), finish_error=False))
                return
            if obj.get("type") == "error":
                self._dialect = self._dialect or "anthropic"
            self._anthropic(etype, obj)

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
        kind = obj.get("type")
        # Some Anthropic-compatible servers leave out the `event:` line; the payload's own
        # `type` still names the event.
        name = kind.encode("utf-8", "replace") if isinstance(kind, str) else b""
        if name in _ANTHROPIC_EVENTS or (name == _ERROR and isinstance(obj.get("error"), dict)):
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
            self._set_error(classify_error(err, finish_error=failed))

    def _anthropic(self, name: bytes, obj: dict[str, Any]) -> None:
        if name == _MESSAGE_START:
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif name == _MESSAGE_DELTA:
            usage = obj.get("usage")
        else:
            err = obj.get("error")
            # Other servers send `event: error` with the code and message at the top level.
            self._set_error(classify_error(err if err is not None else obj, finish_error=False))
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

    def _set_error(self, error: StreamError) -> None:
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
        self._buf.clear()
        self._data.clear()


def classify_error(err: object, *, finish_error: bool) -> StreamError:
    """Classify an in-stream error object as its HTTP equivalent would be.

    `err` is the `error` member (a dict with `type`/`code`/`message`, a string, or None);
    `finish_error` says a choice ended with `finish_reason: "error"`. A numeric `code` is the
    status; structured names decide otherwise; with neither, a `finish_reason` error counts as
    a 502 from the provider behind the gateway, and anything else as "unknown" 500.
    """
    fields = err if isinstance(err, dict) else {}
    code, etype = fields.get("code"), fields.get("type")
    message = fields.get("message") if fields else err
    names = [n for n in (etype, code) if isinstance(n, str)]
    named = next((_NAMED_ERRORS[n] for n in names if n in _NAMED_ERRORS), None)
    status = _status(code)
    text = message if isinstance(message, str) else ""
    if status is not None:
        kind = _kind_for_status(status, text)
        if named is not None and named[0] == "quota":
            kind = "quota"  # e.g. OpenAI's insufficient_quota arrives as a 429
    elif named is not None:
        kind, status = named
        if status == 403 and _mentions_billing(text):
            kind = "quota"
    elif finish_error:
        kind, status = "server_error", 502
    else:
        kind, status = "unknown", 500
    fallback = next(iter(names), "finish_reason error" if finish_error else "stream error")
    return StreamError(kind, status, _short(text or fallback))


def _kind_for_status(status: int, text: str) -> str:
    if status == 401:
        return "auth"
    if status == 402:
        return "quota"
    if status == 403:
        return "quota" if _mentions_billing(text) else "auth"
    if status == 429:
        return "rate_limited"
    if status in (503, 529):
        return "overloaded"
    return "server_error" if 500 <= status <= 599 else "unknown"


def _mentions_billing(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _BILLING_WORDS)


def _status(code: object) -> int | None:
    if isinstance(code, str) and code.isdigit() and len(code) == 3:
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
        return code
    return None


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _short(text: str) -> str:
    flat = " ".join(text[: _MESSAGE_MAX * 4].split())
    return flat if len(flat) <= _MESSAGE_MAX else flat[: _MESSAGE_MAX - 1] + "…"


def _parse(data: bytes) -> dict[str, Any] | None:
    """The event's JSON object, or None for anything else (never raises on bad input)."""
    try:
        obj = json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _worth_parsing(data: bytes) -> bool:
    """Whether the data can carry usage, an error, a finish reason or Anthropic's end.

    Plain substring tests: inside a JSON string a quote is escaped, so text the model wrote
    cannot fake a key, and content chunks (`"finish_reason":null`, `"usage":null`) are skipped.
    """
    return (
        _has_value(data, b'"usage"')
        or _has_value(data, b'"error"')
        or _has_value(data, b'"finish_reason"')
        or b'"message_stop"' in data
    )


def _has_value(data: bytes, key: bytes) -> bool:
    """Whether `key` occurs as an object key with a value other than null."""
    at = data.find(key)
    while at >= 0:
        i = at + len(key)
        while i < len(data) and data[i] in _JSON_SPACE:
            i += 1
        if i < len(data) and data[i] == 0x3A:  # ":" so this is a key, not a value
            i += 1
            while i < len(data) and data[i] in _JSON_SPACE:
                i += 1
            if data[i : i + 4] != b"null":
                return True
        at = data.find(key, at + len(key))
    return False
