"""The stream tap: same outcome for every chunking and line ending, bytes passed through unchanged."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmi_rotor.core.classify import FailureKind, StreamFailure
from kmi_rotor.core.sse import SSEReader
from kmi_rotor.core.stream_tap import MAX_LINE, SSETap, StreamOutcome, Usage, _worth_parsing

TEXT = "Bonjour é, 你好 😀"  # 2-, 3- and 4-byte UTF-8 characters

# -- stream builders ----------------------------------------------------------------------


def _data(obj: object) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "kimi-k2"}
    return _data(body | {"choices": [choice]} | extra)


def _event(name: str, obj: object) -> str:
    return f"event: {name}\n" + _data(obj)


OPENAI_HEAD = _chunk({"role": "assistant", "content": ""}) + _chunk({"content": TEXT})
OPENAI_USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
OPENAI_DONE = "data: [DONE]\n\n"

ANTHROPIC_START = _event(
    "message_start",
    {
        "type": "message_start",
        "message": {"id": "msg_1", "role": "assistant", "content": [], "stop_reason": None}
        | {"usage": {"input_tokens": 25, "output_tokens": 1}},
    },
)
ANTHROPIC_BODY = (
    _event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    + _event("ping", {"type": "ping"})
    + _event(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TEXT}},
    )
    + _event("content_block_stop", {"type": "content_block_stop", "index": 0})
)
ANTHROPIC_END = _event(
    "message_delta",
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 15}},
) + _event("message_stop", {"type": "message_stop"})


def _anthropic_error(etype: str, message: str) -> str:
    return _event("error", {"type": "error", "error": {"type": etype, "message": message}})


def _outcome(
    events: int,
    usage: Usage | None = None,
    error: StreamFailure | None = None,
    *,
    terminal: bool = True,
    dialect: str | None = "openai",
) -> StreamOutcome:
    """Expected outcome; `bytes` is filled in per line ending."""
    truncated = not terminal and error is None
    return StreamOutcome(events, usage, error, terminal, truncated, 0, dialect)


CASES: dict[str, tuple[str, StreamOutcome]] = {
    "openai-include-usage": (
        OPENAI_HEAD
        + _chunk({}, "stop", usage=None)
        + _data({"id": "chatcmpl-1", "choices": [], "usage": OPENAI_USAGE})
        + OPENAI_DONE,
        _outcome(5, Usage(12, 7)),
    ),
    "openai-usage-on-last-content-chunk": (
        OPENAI_HEAD + _chunk({"content": "!"}, "stop", usage=OPENAI_USAGE) + OPENAI_DONE,
        _outcome(4, Usage(12, 7)),
    ),
    "openai-no-usage": (OPENAI_HEAD + _chunk({}, "stop") + OPENAI_DONE, _outcome(4)),
    "openai-truncated": (OPENAI_HEAD, _outcome(2, terminal=False)),
    "openai-comments-and-fields": (
        ": OPENROUTER PROCESSING\n\nid: 7\nretry: 3000\nfoo: bar\n"
        + OPENAI_HEAD.replace("data: ", "data:", 1)
        + ":keep-alive\n\n"
        + OPENAI_DONE,
        _outcome(3),
    ),
    "openrouter-finish-reason-error": (
        OPENAI_HEAD
        + _chunk(
            {"content": ""},
            "error",
            error={"code": 502, "message": f"Provider disconnected: {TEXT}"},
        ),
        _outcome(
            3,
            error=StreamFailure(FailureKind.OVERLOADED, 502, "overloaded (502)"),
            terminal=False,
        ),
    ),
    "openrouter-finish-reason-error-no-code": (
        OPENAI_HEAD + _chunk({}, "error") + OPENAI_DONE,
        _outcome(4, error=StreamFailure(FailureKind.OVERLOADED, 502, "finish_reason error")),
    ),
    "openai-bare-error-chunk": (
        OPENAI_HEAD + _data({"error": {"code": 429, "message": "Too many requests"}}),
        _outcome(
            3, error=StreamFailure(FailureKind.RATE_LIMITED, 429, "rate limited"), terminal=False
        ),
    ),
    "anthropic-complete": (
        ANTHROPIC_START + ANTHROPIC_BODY + ANTHROPIC_END,
        _outcome(7, Usage(25, 15), dialect="anthropic"),
    ),
    "anthropic-truncated": (
        ANTHROPIC_START + ANTHROPIC_BODY,
        _outcome(5, Usage(25, 1), terminal=False, dialect="anthropic"),
    ),
    "anthropic-overloaded": (
        ANTHROPIC_START + ANTHROPIC_BODY + _anthropic_error("overloaded_error", f"过载 {TEXT}"),
        _outcome(
            6,
            Usage(25, 1),
            StreamFailure(FailureKind.OVERLOADED, 529, "overloaded (529)"),
            terminal=False,
            dialect="anthropic",
        ),
    ),
}

ENDINGS = {"LF": b"\n", "CRLF": b"\r\n", "CR": b"\r"}


def _encode(text: str, ending: bytes) -> bytes:
    return text.encode().replace(b"\n", ending)


def _run(chunks: list[bytes], tap: SSETap | None = None) -> StreamOutcome:
    """Feed chunks as mitmproxy does; check each comes back unchanged; end with b"".

    An empty piece (a split at either end) goes to `feed`: through `__call__` it means the end.
    """
    tap = tap or SSETap()
    for c in chunks:
        if c:
            assert tap(c) is c
        else:
            tap.feed(c)
    assert tap(b"") == b""
    return tap.outcome


def _chunkings(data: bytes, seed: int) -> Iterator[list[bytes]]:
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    rng = random.Random(seed)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# -- every chunking, every line ending ----------------------------------------------------


@pytest.mark.parametrize("ending", ENDINGS.values(), ids=ENDINGS.keys())
@pytest.mark.parametrize("case", CASES.keys())
def test_outcome_is_independent_of_chunking(case: str, ending: bytes) -> None:
    text, expected = CASES[case]
    data = _encode(text, ending)
    expected = dataclasses.replace(expected, bytes=len(data))
    for chunks in _chunkings(data, seed=len(data)):
        assert b"".join(chunks) == data
        assert _run(chunks) == expected, [len(c) for c in chunks]


def test_multibyte_character_split_inside_a_message() -> None:
    # The words decide this one (a 400 naming no code): they must survive the split.
    data = _encode(_anthropic_error("invalid_request_error", "😀余额不足"), b"\n")
    start = data.index("😀".encode())
    for cut in range(start + 1, start + 7):  # inside the 4-byte emoji and the 3-byte 余
        out = _run([data[:cut], data[cut:]])
        assert out.error == StreamFailure(FailureKind.QUOTA, 400, "insufficient balance")


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    # Read as two line ends, CR|LF would make a blank line and split this one event in two.
    data = b"data: {}\r\ndata: [DONE]\r\n\r\n"
    for i in range(len(data) + 1):
        out = _run([data[:i], data[i:]])
        assert (out.events, out.terminal_seen, out.truncated) == (1, False, True)


# -- usage and errors ---------------------------------------------------------------------


def test_usage_last_one_wins_and_anthropic_delta_may_carry_input() -> None:
    text = (
        _data({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
        + _data({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 20}})
        + OPENAI_DONE
    )
    assert _run([text.encode()]).usage == Usage(10, 20)
    text = ANTHROPIC_START + _event(
        "message_delta",
        {"type": "message_delta", "usage": {"input_tokens": 30, "output_tokens": 9}},
    )
    assert _run([text.encode()]).usage == Usage(30, 9)


def test_first_error_wins() -> None:
    text = _anthropic_error("rate_limit_error", "a") + _anthropic_error("api_error", "b")
    assert _run([text.encode()]).error == StreamFailure(
        FailureKind.RATE_LIMITED, 429, "rate limited"
    )


def test_anthropic_payload_without_event_lines() -> None:
    text = "".join(
        _data(json.loads(block.split("data: ", 1)[1]))
        for block in (ANTHROPIC_START + ANTHROPIC_BODY + ANTHROPIC_END).split("\n\n")
        if block
    )
    out = _run([text.encode()])
    assert (out.usage, out.terminal_seen, out.dialect) == (Usage(25, 15), True, "anthropic")


# -- the end of the stream ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "terminal"),
    [
        (b"data: [DONE]\n", True),  # complete line, blank line missing: still the end
        (b"data: [DONE]\r", True),
        (b"data: [DONE]", False),  # the line itself was cut
        (b"data: [DO", False),
        (b"event: message_stop\ndata: {}\n", True),
        (b"event: message_stop", False),
    ],
)
def test_final_event_without_blank_line(tail: bytes, terminal: bool) -> None:
    head = _encode(OPENAI_HEAD, b"\n")
    out = _run([head, tail])
    assert out.events == 2  # never dispatched
    assert (out.terminal_seen, out.truncated) == (terminal, not terminal)


def test_outcome_mid_stream_and_finish_idempotent() -> None:
    tap = SSETap()
    tap(_encode(OPENAI_HEAD, b"\n"))
    assert tap.outcome == StreamOutcome(2, None, None, False, False, tap.outcome.bytes, "openai")
    first = tap.finish()
    assert first.truncated
    assert tap.finish() is first and tap(b"") == b"" and tap.outcome is first
    tap(OPENAI_DONE.encode())  # after the end: passed through, ignored
    assert tap.outcome is first


# -- robustness and bounds ----------------------------------------------------------------


def test_overlong_line_is_discarded_with_bounded_buffer() -> None:
    tap = SSETap()
    block = b"x" * 65536
    for _ in range(80):  # 5 MiB without a line end
        assert tap(block) is block
        assert tap.buffered <= MAX_LINE
    assert tap.buffered == 0 and tap.discarded_lines == 1
    tap(b"\n\ndata: [DONE]\n\n")
    out = tap.finish()
    assert (out.events, out.terminal_seen, tap.discarded_lines) == (1, True, 1)


def test_overlong_line_in_one_chunk_and_overlong_event_data() -> None:
    tap = SSETap(max_line=100)
    tap(b"data: " + b"y" * 5 * 1024 * 1024 + b"\n\n")
    tap(b"data: 1\n" * 60 + b"\n")  # 60 short lines: 120 bytes of data in one event
    tap(b"data: [DONE]\n\n")
    out = tap.finish()
    assert (out.events, out.terminal_seen, tap.discarded_lines) == (2, True, 2)
    assert tap.buffered == 0


def test_overlong_rule_does_not_depend_on_chunking() -> None:
    data = b"data: " + b"z" * 200 + b"\n\ndata: " + b"w" * 50 + b"\n\n"
    results = set()
    for i in range(len(data) + 1):
        tap = SSETap(max_line=100)
        out = _run([data[:i], data[i:]], tap)
        results.add((out, tap.discarded_lines))
    assert results == {(StreamOutcome(1, None, None, False, True, len(data), None), 1)}


@pytest.mark.parametrize("seed", range(5))
def test_garbage_never_raises(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = b'data:event \r\n{}[]"usage"error"finish_reason:null\xff\xfe\x00\xe4\xbd'
    data = bytes(rng.choice(alphabet) for _ in range(20000)) + rng.randbytes(20000)
    for size in (1, 7, 4096):
        tap = SSETap()
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert b"".join(tap(c) for c in chunks) == data
        assert tap(b"") == b"" and tap.outcome.bytes == len(data)
        assert tap.internal_error is None


@pytest.mark.parametrize(
    "payload",
    [
        b"{",
        b"1e999999",
        b'{"usage": 5, "error": null}',
        b'{"usage": {"prompt_tokens": "x", "completion_tokens": true}}',
        b'{"usage": {"prompt_tokens": -1}}',
        b'{"error": 42}',
        b'{"error": []}',
        b'{"choices": "x", "finish_reason": "stop"}',
        b'{"choices": [1, null, {"finish_reason": "error"}]}',
        b'{"usage": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        b'{"usage": {"prompt_tokens": ' + b"9" * 5000 + b"}}",
        b'"usage": "error"',
        b'{"usage":',
        b'\xff\xfe{"error": {"message": "\xff"}}',
        b"data: data: data:",
    ],
)
def test_hostile_payloads_never_raise(payload: bytes) -> None:
    tap = SSETap()
    for line_start in (b"data: ", b"event: error\ndata: ", b"event: message_start\ndata: "):
        data = line_start + payload + b"\n\n"
        assert tap(data) is data
    tap.finish()
    assert tap.internal_error is None


def test_unreadable_error_event_is_still_an_error() -> None:
    out = _run([b"event: error\ndata: upstream went away\n\n"])
    assert out.error == StreamFailure(FailureKind.OVERLOADED, 500, "stream error")
    assert not out.truncated


def test_invalid_utf8_is_replaced() -> None:
    out = _run([b'data: {"error": {"code": "insufficient_quota", "message": "bad \xff"}}\n\n'])
    assert out.error == StreamFailure(FailureKind.QUOTA, None, "insufficient_quota")


def test_bom_and_non_bytes_input() -> None:
    tap = SSETap()
    assert tap(b"\xef\xbb") == b"\xef\xbb"
    assert tap(b"\xbfdata: [DONE]\n\n") == b"\xbfdata: [DONE]\n\n"
    odd: object = "not bytes"
    assert tap(odd) is odd  # type: ignore[arg-type]
    assert tap(bytearray(b"x")) == bytearray(b"x")
    assert tap(None) is None  # type: ignore[arg-type]
    assert tap.finish().terminal_seen


def test_internal_bug_stops_parsing_but_passes_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: SSEReader) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(SSEReader, "_dispatch", bug)
    tap = SSETap()
    data = _encode(OPENAI_HEAD + OPENAI_DONE, b"\n")
    assert _run([data, data], tap).bytes == 2 * len(data)
    out = tap.outcome
    assert tap.internal_error is not None and "bug" in tap.internal_error
    assert not out.truncated  # an unwatched stream is not claimed to be cut


# -- cost ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
def test_ten_thousand_events_are_cheap(dialect: str) -> None:
    if dialect == "openai":
        one, end = _chunk({"content": TEXT}).encode(), OPENAI_DONE.encode()
    else:
        one = _event("content_block_delta", {"type": "content_block_delta", "text": TEXT}).encode()
        end = ANTHROPIC_END.encode()
    chunks = [one] * 10_000 + [end]
    tap = SSETap()
    started = time.perf_counter()
    for c in chunks:
        tap(c)
    out = tap.finish()
    elapsed = time.perf_counter() - started
    assert out.terminal_seen and out.events >= 10_001
    assert elapsed < 2.0  # a loose bound; typical cost is a few microseconds per event


# -- which events are parsed --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "worth"),
    [
        (b'{"choices":[{"delta":{"content":"hi"}}]}', False),
        (b'{"choices":[{"delta":{},"finish_reason":null}],"usage":null}', False),
        (b'{"usage" :\t null, "finish_reason":\nnull}', False),
        (b'{"choices":[{"delta":{},"finish_reason":"stop"}]}', True),
        (b'{"choices":[],"usage":{"prompt_tokens":9}}', True),
        (b'{"usage" : {"prompt_tokens":9}}', True),
        (b'{"usage":null,"x":1,"usage":{}}', True),  # a later occurrence counts
        (b'{"error":{"message":"overloaded"}}', True),
        (b'{"type":"message_stop"}', True),
        (b'{"note":"usage","kind":"error"}', False),  # values, not keys
        (b'{"content":"say \\"usage\\": 1"}', False),  # the model's text, quotes escaped
        (b'{"usage":', True),  # cut after the colon: parsed (and found unreadable) to be safe
        (b'{"usage":nullable}', False),
        (b"", False),
    ],
)
def test_worth_parsing(data: bytes, worth: bool) -> None:
    assert _worth_parsing(data) is worth


# -- the usual chunk, read in `__call__` --------------------------------------------------

_TAP_PIECES = [
    _chunk({"content": TEXT}).encode(),
    _chunk({"content": "x"}, usage=None).encode(),
    _chunk({}, finish="stop", usage=OPENAI_USAGE).encode(),
    _chunk({}, finish="error").encode(),
    _data({"error": {"code": "rate_limit_exceeded", "message": "slow down"}}).encode(),
    _data({"type": "message_stop"}).encode(),
    _data({"type": "message_delta", "usage": {"output_tokens": 3}}).encode(),
    _data({"usage" + "x" * 20: 1}).encode(),  # the key only resembles one
    OPENAI_DONE.encode(),
    b"data: [DONE]   \n\n",
    b"data:\n\n",
    b"data: not json, long enough to be tested\n\n",
    b"data: {}\n\n",
    b'data: {"a": "\xff\xfe"}\n\n',
    b"data: a\r\n\r\n",
    b"data: a\n",
    b"event: error\n",
    b"event: message_stop\n",
    b"\n",
    b"\r",
    b"\xef\xbb\xbf",
    b"data",
]


@given(
    st.lists(
        st.one_of(
            st.sampled_from(_TAP_PIECES),
            st.lists(st.sampled_from(_TAP_PIECES), min_size=2, max_size=3).map(b"".join),
            st.binary(max_size=12),
        ),
        max_size=10,
    ),
    st.sampled_from([20, 64, MAX_LINE]),
)
def test_a_chunk_called_in_reads_as_fed(chunks: list[bytes], max_line: int) -> None:
    """`tap(chunk)` reads the usual chunk (one whole `data:` event) itself: after every
    chunk, the same outcome as `feed`, which hands it to the reader's events."""
    called, fed = SSETap(max_line=max_line), SSETap(max_line=max_line)
    for c in chunks:
        if c:
            assert called(c) is c
            fed.feed(c)
        assert called.outcome == fed.outcome
        assert (called.buffered, called.discarded_lines) == (fed.buffered, fed.discarded_lines)
    assert called.finish() == fed.finish()


@pytest.mark.parametrize(
    ("piece", "events", "usage", "dialect", "terminal", "error"),
    [
        (_chunk({"content": TEXT}).encode(), 1, None, "openai", False, None),
        (b"data:\n\n", 1, None, None, False, None),
        (b"data: [DONE]\n\n", 1, None, "openai", True, None),
        (b"data: not json, long enough to be tested\n\n", 1, None, None, False, None),
        (_chunk({}, usage=OPENAI_USAGE).encode(), 1, Usage(12, 7), "openai", False, None),
        (_data({"type": "message_stop"}).encode(), 1, None, "anthropic", True, None),
        (
            _data({"error": {"code": "insufficient_quota"}}).encode(),
            1,
            None,
            "openai",
            False,
            FailureKind.QUOTA,
        ),
    ],
)
def test_the_usual_chunk_read_in_call(
    piece: bytes,
    events: int,
    usage: Usage | None,
    dialect: str | None,
    terminal: bool,
    error: FailureKind | None,
) -> None:
    tap = SSETap()
    assert tap(piece) is piece
    out = tap.outcome
    assert (out.events, out.usage, out.dialect, out.terminal_seen) == (
        events,
        usage,
        dialect,
        terminal,
    )
    assert (out.error.kind if out.error else None) == error
    assert out.bytes == len(piece)


def test_the_usual_chunk_after_the_end_or_a_bug_is_only_passed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    piece = _chunk({}, usage=OPENAI_USAGE).encode()
    done = SSETap()
    done.finish()
    assert done(piece) is piece and done.outcome.bytes == 0 and done.outcome.usage is None

    def bug(self: SSEReader, chunk: bytes) -> bytes | None:
        raise KeyError("bug")

    monkeypatch.setattr(SSEReader, "whole_data", bug)
    broken = SSETap()
    assert broken(piece) is piece and broken(piece) is piece
    assert broken.internal_error is not None and "bug" in broken.internal_error
    assert broken.outcome.bytes == 2 * len(piece) and broken.outcome.events == 0
