"""Header fields read and rewritten in one pass give what mitmproxy's `Headers` calls give."""

from __future__ import annotations

import pytest
from mitmproxy import http

from kmi_rotor.core.header_fields import field_value, has_field, with_fields

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
