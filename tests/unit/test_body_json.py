"""One parse of a request body, read by the token estimate, the model and the stream flag: each
gives what it gives when it parses the body itself; headers read from the raw fields in one pass."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tutils

from kmi_rotor.core.body_json import (
    MAX_BODY,
    NOTHING,
    SMALL_VALUE,
    WHOLE,
    BodyJSON,
    Unread,
    read_json,
    rebuilt,
)
from kmi_rotor.core.scope import model_of_request
from kmi_rotor.core.tokens import Unreadable, estimate_from_body
from kmi_rotor.request_body import header_values, wants_stream

DEEP = b"[" * 100_000 + b"]" * 100_000
BODIES: list[bytes | None] = [
    None,
    b"",
    b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "m", "stream": true, "max_tokens": 12}',
    b'{"model": "m", "stream": "yes"}',
    b'  \n{"model": "spaced", "stream": false}',
    b'\xef\xbb\xbf{"model": "after-a-bom", "stream": true}',
    b'{"model": "   "}',
    b'{"model": 7, "max_tokens": 3}',
    b'[{"model": "in-a-list"}]',
    b'"stream"',
    b'{"stream": true',
    b'not json "stream" at all',
    b"\xff\xfe garbage",
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
]


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (None, NOTHING),
        (b"", NOTHING),
        (b'{"model": "m"}', BodyJSON({"model": "m"})),
        (b"[1, 2]", NOTHING),
        (b"42", NOTHING),
        (b"{not json", NOTHING),
        (b"\xff\xfe\x00", NOTHING),
        (DEEP, BodyJSON(None, too_deep=True)),
    ],
)
def test_read_json(raw: bytes | None, want: BodyJSON) -> None:
    assert read_json(raw) == want


def test_a_body_over_the_limit_is_not_parsed() -> None:
    raw = b'{"model": "m", "pad": "' + b"x" * MAX_BODY + b'"}'
    assert read_json(raw) == NOTHING


@pytest.mark.parametrize("raw", BODIES)
def test_the_estimate_from_a_parse_is_the_estimate_from_the_body(raw: bytes | None) -> None:
    try:
        alone = estimate_from_body(raw, strict=True)
    except Unreadable:
        with pytest.raises(Unreadable):
            estimate_from_body(raw, strict=True, parsed=read_json(raw))
        return
    assert estimate_from_body(raw, strict=True, parsed=read_json(raw)) == alone


@pytest.mark.parametrize("raw", BODIES)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1beta/models/g:generateContent"])
def test_the_model_from_a_parse_is_the_model_from_the_body(raw: bytes | None, path: str) -> None:
    assert model_of_request(path, raw, read_json(raw)) == model_of_request(path, raw)


@pytest.mark.parametrize("raw", [b for b in BODIES if b is not None])
@pytest.mark.parametrize("accept", ["", "text/event-stream"])
def test_the_stream_flag_from_a_parse_is_the_flag_from_the_body(raw: bytes, accept: str) -> None:
    req = tutils.treq(content=raw)
    if accept:
        req.headers["accept"] = accept
    assert wants_stream(req, raw, read_json(raw)) == wants_stream(req, raw)


def test_a_body_too_large_to_parse_once_still_says_it_streams() -> None:
    raw = json.dumps({"stream": True, "pad": "x" * MAX_BODY}).encode()
    assert wants_stream(tutils.treq(content=raw), raw, read_json(raw)) is True


FIELDS = [
    (b"Host", b"llm.test"),
    (b"content-type", b"application/json"),
    (b"HOST", b"other.test:8443"),
    (b"Accept", b"application/json"),
    (b"accept", b"text/event-stream"),
    (b"X-Name", b"caf\xc3\xa9 \xff"),
]


@pytest.mark.parametrize("name", ["host", "accept", "x-name", "content-length", "cookie"])
def test_header_values_read_the_raw_fields_as_mitmproxy_does(name: str) -> None:
    headers = http.Headers(FIELDS)
    assert header_values(headers.fields, name.encode()) == headers.get_all(name)


FAST_EDGES: list[bytes] = [
    b"{",
    b"{}",
    b"{\x00",
    b"{\x00\x00\x00",
    b"{\x00}\x00",
    b'{"a": 1}   \n',
    b'{"a": 1} x',
    b'{"a": 1}{"b": 2}',
    b'{"a": "\xed\xa0\x80"}',  # a lone surrogate, as json.loads reads it (surrogatepass)
    b'{"a": "\xff"}',
    b'{"a": "\\ud800"}',
    b'{"\xc3\xa9": "\xe2\x82\xac"}',
    b'{"a": NaN, "b": Infinity}',
    b'{"a": 1, "a": 2}',
    b'{"a": 1e999}',
    b"{\t\r\n}",
]


@pytest.mark.parametrize("raw", [b for b in BODIES if b] + FAST_EDGES)
def test_read_json_is_json_loads(raw: bytes) -> None:
    """The parse of a body that starts with `{` (read without `json.loads`' detection) and of
    any other is what `json.loads` gives, errors included."""
    assert repr(read_json(raw)) == repr(as_json_loads_reads(raw))  # NaN is not equal to itself


def as_json_loads_reads(raw: bytes) -> BodyJSON:
    """What `read_json` must give for `raw`: what `json.loads` makes of it."""
    try:
        data = json.loads(raw)
    except RecursionError:
        return BodyJSON(None, too_deep=True)
    except (ValueError, UnicodeDecodeError):
        return NOTHING
    return BodyJSON(data) if isinstance(data, dict) else NOTHING


@pytest.mark.parametrize(
    "path",
    [
        b"/v1beta/models/gemini-1.5-pro:streamGenerateContent?alt=sse",
        b"/v1beta/models/gemini-1.5-pro:generateContent",
        b"/\xff/streamGenerateContent",
        b"/x?q=streamGenerateContent",
        b"/streamgeneratecontent",
    ],
)
def test_a_streaming_method_in_the_path(path: bytes) -> None:
    req = tutils.treq(path=path, content=b"{}")
    assert wants_stream(req, b"{}") is ("streamGenerateContent" in req.path)


def test_a_parse_compares_and_hashes_by_its_fields() -> None:
    assert read_json(b'{"a": 1}') == BodyJSON({"a": 1}) != BodyJSON({"a": 1}, too_deep=True)
    assert hash(NOTHING) == hash(BodyJSON(None)) == hash((None, False))
    with pytest.raises(TypeError):
        hash(BodyJSON({"a": 1}))  # a dict in it: not hashable, as before


@settings(max_examples=300, deadline=None)
@given(
    data=st.dictionaries(st.text(max_size=4), st.none() | st.integers() | st.text(max_size=4)),
    after=st.sampled_from(["", " ", "\n\t", " x", "{}", "]"]),
)
def test_any_object_read_as_json_loads_reads_it(data: dict, after: str) -> None:
    """Objects, then whitespace or extra data after them."""
    raw = (json.dumps(data) + after).encode("utf-8", "surrogatepass")
    try:
        want = BodyJSON(json.loads(raw))
    except ValueError:
        want = NOTHING
    assert read_json(raw) == want


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    data=st.dictionaries(st.text(), JSON_VALUES, max_size=6),
    ascii_only=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_any_json_read_as_json_loads_reads_it(
    data: dict, ascii_only: bool, indent: int | None
) -> None:
    """Nested values, any text (escaped or as UTF-8), any number, any spacing: the fast reader
    gives exactly what `json.loads` gives (a float compared by its bits)."""
    raw = json.dumps(data, ensure_ascii=ascii_only, indent=indent).encode("utf-8", "surrogatepass")
    got = read_json(raw)
    assert got.data is not None
    assert json.dumps(got.data) == json.dumps(json.loads(raw))


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=40).map(lambda b: b"{" + b))
def test_any_bytes_read_as_json_loads_reads_them(raw: bytes) -> None:
    """Bytes that start like an object and go on with anything: parsed, refused or too deep,
    as `json.loads` decides."""
    assert repr(read_json(raw)) == repr(as_json_loads_reads(raw))


def agent_body(turns: int, **fields: Any) -> dict[str, Any]:
    """A chat request with a conversation of `turns` turns of about 3 KB each."""
    messages = [{"role": "user", "content": f"turn {i} " + "w" * 3000} for i in range(turns)]
    return {"model": "m", "messages": messages, **fields}


LARGE_BODIES = [
    agent_body(20),
    agent_body(20, stream=True, max_tokens=99, stream_options={"include_obfuscation": False}),
    agent_body(12, tools=[{"type": "function", "name": f"t{i}"} for i in range(5)], n=2.5),
    agent_body(15, generationConfig={"maxOutputTokens": 77}, temperature=None, user="\u00e9"),
    {"pad": "x" * 40_000, "big": list(range(9000)), "deep": {"a": {"b": [1] * 3000}}},
]


@pytest.mark.parametrize("doc", LARGE_BODIES)
@pytest.mark.parametrize("indent", [None, 1])
def test_a_large_body_is_read_one_level_deep(doc: dict[str, Any], indent: int | None) -> None:
    """Past `WHOLE`, every top-level value reads as `json.loads` reads it, but a large object
    or array is left as its bytes, which read as that value."""
    raw = json.dumps(doc, indent=indent).encode()
    assert len(raw) > WHOLE
    got = read_json(raw)
    assert got.data is not None and got.data.keys() == doc.keys()
    for name, value in got.data.items():
        if isinstance(value, Unread):
            assert isinstance(doc[name], dict | list) and len(value.raw) > SMALL_VALUE
            assert json.loads(bytes(value.raw)) == doc[name]
        else:
            assert value == doc[name]
            assert not isinstance(value, dict | list) or len(json.dumps(value)) <= 2 * SMALL_VALUE


@pytest.mark.parametrize("doc", LARGE_BODIES)
def test_a_large_body_is_estimated_as_if_read_whole(doc: dict[str, Any]) -> None:
    raw = json.dumps(doc).encode()
    whole = BodyJSON(json.loads(raw))
    assert estimate_from_body(raw, parsed=read_json(raw)) == estimate_from_body(raw, parsed=whole)
    assert model_of_request("/v1/chat/completions", raw, read_json(raw)) == doc.get("model")
    req = tutils.treq(content=raw)
    assert wants_stream(req, raw, read_json(raw)) is bool(doc.get("stream"))


def _read_traced(raw: bytes) -> tuple[BodyJSON, int]:
    """`read_json(raw)`, and the peak of the memory it took (bytes)."""
    tracemalloc.start()
    try:
        got = read_json(raw)
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_body_of_many_small_objects_costs_no_memory_to_read() -> None:
    """8 MB of empty objects made 2.8 million dicts (200 MB, 0.2 s of the event loop); read
    one level deep, the conversation is a view of the body's bytes."""
    count = (MAX_BODY - 100) // 3
    raw = b'{"model":"m","stream":true,"messages":[' + b"{}," * (count - 1) + b"{}]}"
    got, peak = _read_traced(raw)
    assert got.data is not None and isinstance(got.data["messages"], Unread)
    assert got.data["model"] == "m" and got.data["stream"] is True
    assert peak < 1_000_000


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": [' + b"1," * 20_000 + b'1], "b": "\xff"}',
        b'{"a": [' + b"1," * 20_000 + b"1]} x",
        b"[" + b"1," * 20_000 + b"1]",
        b" \n[" + b"1," * 20_000 + b"1]",
        b"[" * 20_000 + b"]" * 20_000,
        b'{"a": [' + b"1," * 20_000 + b"1]," + b'"d":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
    ],
)
def test_what_a_large_body_holds_outside_its_large_values_reads_as_json_loads_reads_it(
    raw: bytes,
) -> None:
    want = as_json_loads_reads(raw)
    got = read_json(raw)
    if got.parts is None:
        assert repr(got) == repr(want)
    else:  # read one level deep: the same values, the large ones unread
        assert want.data is not None and got.data is not None
        assert {k: v for k, v in got.data.items() if not isinstance(v, Unread)} == {
            k: v for k, v in want.data.items() if not isinstance(got.data[k], Unread)
        }


LARGE_PAD = b"1," * 20_000
NOT_STANDARD = [
    b'{"a": [' + LARGE_PAD + b'1], "b": NaN}',
    b'{"a": "' + b"x" * 40_000 + b'", "b": {"c": Infinity}}',
    b'{"a": [' + LARGE_PAD + b'1], "b": 1e400}',
    b'\xef\xbb\xbf{"model": "m", "stream": true, "a": [' + LARGE_PAD + b"1]}",
    ('{"model": "m", "stream": true, "a": [' + "1," * 20_000 + "1]}").encode("utf-16"),
]


@pytest.mark.parametrize("raw", NOT_STANDARD)
def test_a_large_body_of_json_that_is_not_standard_counts_as_no_json(raw: bytes) -> None:
    """Past `WHOLE` only RFC 8259 JSON is read (UTF-8, no NaN, no infinities): what only the
    `json` module reads counts by its size, as a body that is not JSON, instead of being read
    whole a second time."""
    assert len(raw) > WHOLE
    assert as_json_loads_reads(raw).data is not None  # what json.loads would have read
    assert read_json(raw) == NOTHING
    assert estimate_from_body(raw, parsed=read_json(raw)) == estimate_from_body(b"x" * len(raw))


@pytest.mark.parametrize(
    "raw",
    [
        b"[" + b"{}," * ((MAX_BODY - 100) // 3) + b"{}]",
        b'{"messages": [' + b"{}," * ((MAX_BODY - 100) // 3) + b'{}], "n": NaN}',
    ],
    ids=["array", "nan"],
)
def test_a_large_body_refused_by_the_fast_reader_is_not_read_again(raw: bytes) -> None:
    """8 MB that msgspec refuses (a top-level array, a NaN) were read whole by `json.loads`:
    0.3 s of the event loop and 200 MB. Now they cost one pass and no memory."""
    got, peak = _read_traced(raw)
    assert got == NOTHING
    assert peak < 1_000_000


@pytest.mark.parametrize("doc", LARGE_BODIES)
@pytest.mark.parametrize("value", [{"include_usage": True}, None, 5])
def test_a_value_rebuilt_keeps_every_other_value_as_it_was(doc: dict[str, Any], value: Any) -> None:
    raw = json.dumps(doc, indent=2).encode()
    parsed = read_json(raw)
    assert parsed.parts is not None
    out = rebuilt(parsed.parts, "stream_options", value)
    assert json.loads(out) == {**doc, "stream_options": value}
    assert list(json.loads(out)) == [
        *doc.keys(),
        *(() if "stream_options" in doc else ("stream_options",)),
    ]
    for name, part in parsed.parts.items():
        if name != "stream_options":
            assert bytes(part) in out


def test_what_is_wrong_inside_a_large_value_is_not_seen() -> None:
    """A large value is not read: bytes that are not UTF-8 inside it leave the rest of the body
    read (the provider judges the conversation; kmi-rotor reads the model and the flags)."""
    raw = b'{"model": "m", "messages": ["' + b"\xff" * 5000 + b'"], "stream": true}' + b" " * WHOLE
    got = read_json(raw)
    assert got.data is not None
    assert (got.data["model"], got.data["stream"]) == ("m", True)
    assert isinstance(got.data["messages"], Unread)
    assert as_json_loads_reads(raw) == NOTHING  # json.loads, reading it all, refuses it
