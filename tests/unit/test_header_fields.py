"""Header fields read and rewritten in one pass give what mitmproxy's `Headers` calls give."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http

from kmi_rotor.core.header_fields import (
    field_positions,
    field_value,
    has_field,
    with_field_at,
    with_fields,
)

FIELDS = (
    (b"Content-Type", b"application/json"),
    (b"X-Many", b"a"),
    (b"server", b"up"),
    (b"x-many", b"b"),
    (b"X-Odd", b"caf\xc3\xa9 \xff"),
)


@pytest.mark.parametrize("name", ["content-type", "x-many", "x-odd", "server", "absent", "X-ODD"])
def test_field_value_is_headers_get(name: str) -> None:
    expected = http.Headers(FIELDS).get(name)
    assert field_value(FIELDS, name.lower().encode()) == expected


@pytest.mark.parametrize("name", ["content-type", "x-many", "absent", "X-Odd"])
def test_has_field_is_headers_contains(name: str) -> None:
    assert has_field(FIELDS, name.lower().encode()) is (name in http.Headers(FIELDS))


@pytest.mark.parametrize(
    "updates",
    [
        {"x-many": "c"},  # repeated: the first keeps its place and spelling, the rest go
        {"content-type": "text/plain"},
        {"new": "v"},  # appended
        {"x-many": None},  # removed, every one
        {"absent": None},
        {"server": "s2", "x-many": None, "new": "n", "gone": None},
    ],
)
def test_with_fields_is_set_and_pop(updates: dict[str, str | None]) -> None:
    expected = http.Headers(FIELDS)
    for name, value in updates.items():
        if value is None:
            expected.pop(name, None)
        else:
            expected[name] = value
    raw = {k.encode(): None if v is None else v.encode() for k, v in updates.items()}
    assert with_fields(FIELDS, raw) == expected.fields


_NAMES = st.sampled_from(["a", "A", "ab", "aB", "ba", "Ab", "b", "content-type", "Content-Type"])
_FIELD_LISTS = st.lists(st.tuples(_NAMES.map(str.encode), st.binary(max_size=3)), max_size=8).map(
    tuple
)


@settings(max_examples=300, deadline=None)
@given(
    fields=_FIELD_LISTS,
    updates=st.dictionaries(
        _NAMES.map(lambda n: n.lower().encode()), st.none() | st.binary(max_size=3), max_size=4
    ),
)
def test_any_fields_read_and_rewritten_as_headers_would(
    fields: tuple[tuple[bytes, bytes], ...], updates: dict[bytes, bytes | None]
) -> None:
    """Names of the same length that differ, names in any case, repeats, names absent."""
    expected = http.Headers(fields)
    for name, value in updates.items():
        if value is None:
            expected.pop(name.decode(), None)
        else:
            expected[name.decode()] = value.decode("latin-1")
    raw = {k: None if v is None else v.decode("latin-1").encode() for k, v in updates.items()}
    assert with_fields(fields, raw) == expected.fields
    assert with_fields(list(fields), raw) == expected.fields  # any iterable of pairs
    for name in {n.lower() for n, _ in fields} | {b"absent", b"ab"}:
        assert field_value(fields, name) == http.Headers(fields).get(name.decode())
        assert has_field(fields, name) is (name.decode() in http.Headers(fields))


@settings(max_examples=300, deadline=None)
@given(fields=_FIELD_LISTS, name=_NAMES, value=st.binary(max_size=3))
def test_a_field_found_by_position_and_rewritten_as_headers_would(
    fields: tuple[tuple[bytes, bytes], ...], name: str, value: bytes
) -> None:
    """`field_positions` finds every field of the name; `with_field_at` on the only one is
    `with_fields` (what `headers[name] = value` gives)."""
    low = name.lower().encode()
    at = field_positions(fields, low)
    assert at == [i for i, (k, _) in enumerate(fields) if k.lower() == low]
    if len(at) == 1:
        assert with_field_at(fields, at[0], value) == with_fields(fields, {low: value})
