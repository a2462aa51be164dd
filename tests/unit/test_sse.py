"""SSE framing alone: bytes in any chunking to (event type, data) pairs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


class _LineByLine(SSEReader):
    """The reference: every chunk through the general path, split into lines."""

    def _one_data_event(self, chunk: bytes) -> bool:
        return False


def _both(chunks: list[bytes], max_line: int) -> list[tuple[object, ...]]:
    out = []
    for cls in (SSEReader, _LineByLine):
        seen: list[tuple[bytes, bytes | None]] = []
        reader = cls(lambda t, d, seen=seen: seen.append((t, d)), max_line=max_line)
        states = []
        for c in chunks:
            reader.feed(c)
            states.append((list(seen), reader.pending(), reader.buffered, reader.discarded))
        out.append(states)
    return out


_WHOLE = [b"data: {}\n\n", b"data:x\n\n", b"data: \n\n", b"data:\n\n"]
"""Chunks the shortcut may take, depending on what came before."""
_PIECES = [
    *_WHOLE,
    b"data: ab\r\n\r\n",
    b"data: a\nb\n\n",
    b"data: a",
    b"data: " + b"x" * 30 + b"\n\n",
    b"event: e\n",
    b"event: message_stop\n",
    b": comment\n",
    b"\xef\xbb\xbf",
    b"\n",
    b"\r",
    b"\n\n",
    b"x" * 25,
    b"data",
]


@given(
    st.lists(
        st.one_of(
            st.sampled_from(_WHOLE),
            st.sampled_from(_PIECES),
            st.lists(st.sampled_from(_PIECES), min_size=2, max_size=3).map(b"".join),
            st.binary(max_size=12),
        ),
        max_size=12,
    ),
    st.sampled_from([4, 12, 24, 1 << 20]),
)
def test_a_whole_data_event_in_one_chunk_reads_as_line_by_line(
    chunks: list[bytes], max_line: int
) -> None:
    """The shortcut for a chunk that is one whole `data:` event gives, after every chunk,
    the same events, pending event, buffer and discarded count as splitting it into lines."""
    fast, reference = _both(chunks, max_line)
    assert fast == reference


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        ([b"data: a\n\n", b"data:b\n\n"], [(b"", b"a"), (b"", b"b")]),
        ([b"data: \n\n"], [(b"", b"")]),
        ([b"event: e\n", b"data: a\n\n"], [(b"e", b"a")]),  # an event begun before
        ([b"data: a\n", b"data: b\n\n"], [(b"", b"a\nb")]),
        ([b"da", b"data: a\n\n"], []),  # a partial line before: "dadata: a" is no field
        ([b"data: a\r", b"data: b\n\n"], [(b"", b"a\nb")]),  # a CR ended the line before
        ([b"data: a\r\n\r\n"], [(b"", b"a")]),
        ([b"data: 0123456789abcdef\n\n"], []),  # a line longer than max_line is dropped
    ],
)
def test_whole_data_events_after_what_came_before(
    chunks: list[bytes], events: list[tuple[bytes, bytes | None]]
) -> None:
    assert read(chunks, max_line=18)[0] == events


@pytest.mark.parametrize(
    ("chunk", "data"),
    [
        (b"data: a\n\n", b"a"),
        (b"data:a\n\n", b"a"),
        (b"data:\n\n", b""),
        (b"data: a\r\n\n", None),  # a CR anywhere: the general path
        (b"data: \ra\n\n", None),
        (b"\rdata: a\n\n", None),
        (b"data: a\n\r\n", None),
        (b"data: a\nb\n\n", None),
        (b"data: a\n", None),
        (b"event: e\n\n", None),
    ],
)
def test_whole_data_takes_one_data_line_and_no_cr(chunk: bytes, data: bytes | None) -> None:
    events: list[tuple[bytes, bytes | None]] = []
    reader = SSEReader(lambda t, d: events.append((t, d)))
    assert reader.whole_data(chunk) == data
    assert events == []  # what it takes is the caller's to dispatch
