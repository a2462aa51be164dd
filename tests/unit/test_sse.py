"""SSE framing alone: bytes in any chunking to (event type, data) pairs."""

from __future__ import annotations

import pytest

from kmi_rotor.core.sse import SSEReader

STREAM = (
    b"\xef\xbb\xbf: a comment\n"
    b'event: message_start\ndata: {"a": 1}\n\n'
    b"id: 7\nretry: 10\ndata:first\ndata: second\n\n"
    b"event: ping\n\n"  # no data line: not dispatched
    b"data: [DONE]\n\n"
)
EVENTS = [(b"message_start", b'{"a": 1}'), (b"", b"first\nsecond"), (b"", b"[DONE]")]


def read(chunks: list[bytes], max_line: int = 1 << 20) -> tuple[list[tuple[bytes, object]], int]:
    seen: list[tuple[bytes, object]] = []
    reader = SSEReader(lambda t, d: seen.append((t, d)), max_line=max_line)
    for c in chunks:
        reader.feed(c)
    return seen, reader.discarded


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_events_whatever_the_line_ending_and_chunking(ending: bytes) -> None:
    data = STREAM.replace(b"\n", ending)
    for size in (1, 2, 3, 7, len(data)):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert read(chunks) == (EVENTS, 0), size


def test_overlong_data_is_an_event_without_data() -> None:
    seen, discarded = read([b"data: " + b"x" * 50 + b"\n\ndata: ok\n\n"], max_line=20)
    assert (seen, discarded) == ([(b"", b"ok")], 1)
    seen, discarded = read([b"data: 0123456789\n" * 3 + b"\n"], max_line=20)
    assert (seen, discarded) == ([(b"", None)], 1)


def test_pending_holds_the_event_a_cut_left_undispatched() -> None:
    reader = SSEReader(lambda t, d: None)
    reader.feed(b"event: message_stop\ndata: {}\n")
    assert reader.pending() == (b"message_stop", [b"{}"])
    reader.feed(b"\n")
    assert reader.pending() == (b"", [])


@pytest.mark.parametrize(
    ("line", "data"),
    [
        (b"data:x", b"x"),
        (b"data: x", b"x"),
        (b"data:  x", b" x"),  # only one space is dropped
        (b"data", b""),
        (b"data:", b""),
        (b"data: a: b", b"a: b"),
        (b"dataX: y", None),  # another field
        (b"data : y", None),  # field "data " is not "data"
        (b": data: y", None),  # a comment
    ],
)
def test_data_line_forms(line: bytes, data: bytes | None) -> None:
    expected = [] if data is None else [(b"", data)]
    for chunks in ([line + b"\n\n"], [line, b"\n\n"], [b"\n" + line + b"\n\n"]):
        assert read(chunks) == (expected, 0), chunks


def test_only_the_first_line_of_the_stream_loses_a_bom() -> None:
    bom = b"\xef\xbb\xbf"
    # later, a BOM is part of the field's name: "\ufeffdata" is an unknown field
    assert read([bom + b"data: a\n\n" + bom + b"data: b\n\n"]) == ([(b"", b"a")], 0)
    # the first line is the first one even when dropped for its length
    dropped = b"x" * 30 + b"\n" + bom + b"data: c\n\n"
    assert read([dropped], max_line=20) == ([], 1)
    assert read([dropped[:10], dropped[10:]], max_line=20) == ([], 1)
