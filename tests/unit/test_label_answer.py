"""The key's label put on an answer: appended at once when upstream sent no header of
kmi-rotor's, else through `with_fields`; the same fields either way."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.test import tutils

from kmi_rotor.answers import _ATTEMPT_HEADER, _KEY_HEADER, is_labelled, label_answer
from kmi_rotor.core.header_fields import with_fields

_NAMES = st.sampled_from(
    [
        b"content-type",
        b"x-ratelimit-limit-requests",
        b"kmi-rotor-key",
        b"KMI-Rotor-Key",
        b"kmi-rotor-attempt",
        b"Kmi-Rotor-Attempt",
        b"x-kmi-rotor-keys",  # the prefix inside another name
        b"kmi-rotor",
        b"kmi-rotor-",
    ]
)
_FIELDS = st.lists(st.tuples(_NAMES, st.binary(max_size=3)), max_size=6).map(tuple)


@settings(max_examples=300, deadline=None)
@given(fields=_FIELDS, label=st.text(max_size=4), attempt=st.integers(1, 3))
def test_the_label_is_what_with_fields_gives(
    fields: tuple[tuple[bytes, bytes], ...], label: str, attempt: int
) -> None:
    response = tutils.tresp()
    response.headers.fields = fields
    label_answer(response, label, attempt)
    updates = {
        _KEY_HEADER: label.encode("utf-8", "surrogateescape"),
        _ATTEMPT_HEADER: str(attempt).encode() if attempt > 1 else None,
    }
    assert response.headers.fields == with_fields(fields, updates)
    assert is_labelled(response)
