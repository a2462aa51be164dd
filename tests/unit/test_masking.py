"""Writing a key into a request's credential slots: `put_all` gives what `put` one slot at a
time gives."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from kmi_rotor.admission import put_key
from kmi_rotor.core.credentials import Placement, Writes
from kmi_rotor.core.secrets import mask_credential_value
from kmi_rotor.masking import _mask_header, put, put_all

AUTH = Placement("header", "authorization", bearer=True)
API_KEY = Placement("header", "x-api-key")
QUERY = Placement("query", "key")


def request(fields: tuple[tuple[bytes, bytes], ...], path: bytes = b"/v1/x") -> http.Request:
    return tutils.treq(headers=http.Headers(fields), path=path)


@pytest.mark.parametrize(
    ("fields", "path", "slots"),
    [
        (((b"Authorization", b"Bearer own"), (b"accept", b"*/*")), b"/v1/x", [AUTH]),
        (((b"accept", b"*/*"),), b"/v1/x", [AUTH]),  # appended
        (
            ((b"authorization", b"a"), (b"x", b"y"), (b"AUTHORIZATION", b"b")),
            b"/v1/x",
            [AUTH],
        ),  # repeated: the first keeps its place and spelling, the rest go
        (((b"X-Api-Key", b"own"), (b"authorization", b"o")), b"/v1/x", [AUTH, API_KEY]),
        (((b"accept", b"*/*"),), b"/v1/x?key=own&alt=json", [QUERY]),
        (((b"x-api-key", b"own"),), b"/v1/x?key=own", [API_KEY, QUERY]),
        (((b"accept", b"*/*"),), b"/v1/x", [Placement("header", "X-Custom-Key")]),  # spelled
        (((b"x-custom-key", b"own"),), b"/v1/x", [Placement("header", "X-Custom-Key")]),
        ((), b"/v1/x", []),
    ],
)
@pytest.mark.parametrize("secret", ["sk-secret", "sk-caf\xe9", "sk-\udcff-odd"])
def test_put_all_is_put_one_by_one(
    fields: tuple[tuple[bytes, bytes], ...], path: bytes, slots: list[Placement], secret: str
) -> None:
    expected, got = request(fields, path), request(fields, path)
    for p in slots:
        put(expected, p, p.render(secret))
    put_all(got, [(p, p.render(secret)) for p in slots])
    assert got.headers.fields == expected.headers.fields
    assert got.path == expected.path
    if slots:  # admission's writer, from the slots' `Writes`, gives the same again
        shown = tuple((p.kind, p.name) for p in slots)
        simple = all(p.kind == "header" and p.name == p.name.lower() for p in slots)
        headers = tuple((p.name.encode(), p.bearer) for p in slots) if simple else None
        written = request(fields, path)
        put_key(written, Writes(tuple(slots), shown, headers), secret)
        assert written.headers.fields == expected.headers.fields
        assert written.path == expected.path


@pytest.mark.parametrize(
    "fields",
    [
        ((b"Authorization", b"Bearer sk-secret-0123456789"), (b"accept", b"*/*")),
        ((b"accept", b"*/*"), (b"authorization", b"Bearer sk-caf\xc3\xa9-0123456789")),
        ((b"authorization", b"sk-a-0123456789"), (b"x", b"y"), (b"AUTHORIZATION", b"sk-b")),
        ((b"accept", b"*/*"),),  # nothing to mask
        ((b"authorizatio", b"same length but one"), (b"x-authorization", b"k")),
        (),
    ],
)
def test_mask_header_is_headers_get_then_set(fields: tuple[tuple[bytes, bytes], ...]) -> None:
    """One pass for the usual single field; what `headers[name] = mask(headers[name])` gives
    in every case (a repeated name joined, then set once)."""
    fields = tuple(f for f in fields if f)
    expected, got = http.Headers(fields), http.Headers(fields)
    if "authorization" in expected:
        expected["authorization"] = mask_credential_value(expected["authorization"])
    _mask_header(got, b"authorization")
    assert got.fields == expected.fields
