"""Server-Sent Events framing: bytes in arbitrary chunks to (event type, data) pairs.

Parsing follows the WHATWG Server-Sent Events rules: lines end with CRLF, LF or CR (a CR ending
one chunk and an LF opening the next are one line end); `field: value` with one optional space
after the colon; lines opening with `:` are comments; a blank line dispatches the event; `data`
lines are joined with LF; an event with no `data` line is not dispatched; a UTF-8 BOM opening
the stream is dropped.

Cost is kept O(bytes): lines are split on bytes and never decoded here (UTF-8 is
self-synchronising and line ends are ASCII, so a character split across chunks is whole by the
time its line ends). Memory is bounded: a line, or an event's data, longer than `max_line`
bytes is dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_LINE = 1 << 20
"""Default cap, in bytes, on one line and on one event's data."""

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
"""A CR, as the byte value `in` looks for: `b"\\r" in chunk` first tries to read its operand
as an integer, and the error it raises and drops costs more than the search itself."""


class SSEReader:
    """Incremental SSE framing; calls `on_event(type, data)` for every dispatched event.

    `type` is the `event` field (b"" when absent); `data` is the event's data lines joined
    with LF. An event whose data exceeded `max_line` is dispatched with `data=None`: it counts
    as an event, but what it said is lost. Exceptions of `on_event` propagate to `feed`.
    """

    def __init__(
        self, on_event: Callable[[bytes, bytes | None], None], *, max_line: int = MAX_LINE
    ) -> None:
        self._on_event = on_event
        self._max = max_line
        self._buf = bytearray()
        self._discarding = False
        self._skip_lf = False
        self._first_line = True
        self._type = b""
        self._data: list[bytes] = []
        self._data_len = 0
        self._data_dropped = False
        self.discarded = 0
        """Lines, and events' data, dropped for exceeding `max_line`."""

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished line; never more than `max_line`."""
        return len(self._buf)

    def pending(self) -> tuple[bytes, list[bytes]]:
        """The type and data lines of the event whose lines are complete but which no blank
        line has dispatched (what a stream cut before its final blank line leaves)."""
        return self._type, list(self._data)

    def clear(self) -> None:
        """Drop everything buffered (after a failure, so that memory is given back)."""
        self._buf.clear()
        self._data.clear()

    def feed(self, chunk: bytes) -> None:
        """Split `chunk` into lines and dispatch every event it completes."""
        data = self.whole_data(chunk)
        if data is not None:
            self._on_event(b"", data)
            return
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]  # second half of a CRLF split across chunks
        # A trailing CR ends its line now (it is a line end on its own); remember it so that
        # an LF opening the next chunk is not read as a second, empty line.
        self._skip_lf = chunk.endswith(b"\r")
        if _CR in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if lines and (self._buf or self._discarding or self._first_line):
            first = self._complete_buffered(lines[0])
            if first is None:
                del lines[0]
            else:
                lines[0] = first
        # Hot loop, once per line of every streamed answer: the two lines nearly every event
        # is made of (`data: ...` and the blank line) are handled here without a call.
        for line in lines:
            if not line:
                self._dispatch()
            elif len(line) > self._max:
                self.discarded += 1
            elif line.startswith(b"data:"):
                self._add_data(line[6:] if line[5:6] == b" " else line[5:])
            else:
                self._line(line)
        self._keep_partial(tail)

    def whole_data(self, chunk: bytes) -> bytes | None:
        """The data of `chunk` if it is the usual one, a whole event of one `data:` line
        (`data: {...}\\n\\n`, no CR, within `max_line`) with nothing held from the chunks
        before: the chunk is then read, and its event is the caller's to handle as `feed`
        would dispatch it (type b""). None, having done nothing, for any other chunk. The same
        as `feed`'s general path, without splitting the chunk into lines."""
        if not (
            chunk.endswith(b"\n\n")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.startswith(b"data:")
            and len(chunk) <= self._max
            and _CR not in chunk
        ):
            return None
        # Nothing held: no partial line, no line being dropped, no event begun (nor dropped:
        # a dropped event's data still counts in `_data_len`).
        if self._buf or self._discarding or self._data_len or self._type:
            return None
        self._first_line = self._skip_lf = False  # a first line that opens with `data:` has no BOM
        return chunk[6:-2] if chunk[5:6] == b" " else chunk[5:-2]

    def _keep_partial(self, part: bytes) -> None:
        if not part or self._discarding:
            return
        if len(self._buf) + len(part) > self._max:
            # Drop the whole line, not just its head: the rule stays "a line longer than
            # max_line is ignored" whatever the chunking.
            self._buf.clear()
            self._discarding = True
            self.discarded += 1
            return
        self._buf += part

    def _complete_buffered(self, part: bytes) -> bytes | None:
        """The line `part` ends (with what was buffered before it); None when it is dropped
        (counted here). The stream's first line loses its BOM (a BOM opening any later line,
        even after a first line dropped for its length, is data)."""
        first, self._first_line = self._first_line, False
        if self._discarding:
            self._discarding = False
            return None
        if len(self._buf) + len(part) > self._max:
            self._buf.clear()
            self.discarded += 1
            return None
        line = bytes(self._buf) + part if self._buf else part
        self._buf.clear()
        return line.removeprefix(_BOM) if first else line

    def _line(self, line: bytes) -> None:
        """A non-blank line other than `data:` (the hot loop in `feed` handles those)."""
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
        # `id`, `retry` and unknown fields carry nothing a reader of this stream needs.

    def _add_data(self, value: bytes) -> None:
        if self._data_dropped:
            return
        self._data_len += len(value) + 1
        if self._data_len > self._max:
            self._data_dropped = True
            self._data.clear()
            self.discarded += 1
            return
        self._data.append(value)

    def _dispatch(self) -> None:
        etype, lines, dropped = self._type, self._data, self._data_dropped
        self._type, self._data, self._data_len, self._data_dropped = b"", [], 0, False
        if not lines and not dropped:
            return  # no data line: per the SSE rules, nothing is dispatched
        data = None if dropped else lines[0] if len(lines) == 1 else b"\n".join(lines)
        self._on_event(etype, data)
