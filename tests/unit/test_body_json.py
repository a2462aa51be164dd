"""One parse of a request body, read by the token estimate, the model and the stream flag: each
gives what it gives when it parses the body itself; headers read from the raw fields in one pass."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tutils

from kmi_rotor.core.body_json import MAX_BODY, NOTHING, BodyJSON, read_json
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
