"""Masking and fingerprints: a key never shows, a fingerprint never repeats."""

from __future__ import annotations

import pytest

from kmi_rotor.core.secrets import fingerprint, mask, mask_credential_value

ELLIPSIS = "…"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("sk-abcdefghijklmnop1234", "sk-…1234"),
        ("sk-proj-abcdefghijklmnop9876", "sk-…9876"),
        ("sk_live_abcdefghijklmnop5678", "sk_…5678"),
        ("gsk_abcdefghijklmnopqrstuvwxyz", "gsk_…wxyz"),
        ("AIzaSyabcdefghijklmnopqrstuv", "…stuv"),
        ("abcdefghijklmnop", "…mnop"),  # exactly 16 characters: the tail is shown
        ("verylongprefix-abcdefghijkl", "…ijkl"),  # a long head is not a public prefix
        ("-abcdefghijklmnopqrs", "…pqrs"),  # an empty head is no prefix either
        ("abcdefghijklmno", ELLIPSIS),  # 15 characters: nothing at all
        ("sk-12345678", ELLIPSIS),
        ("abcd", ELLIPSIS),
        ("", ELLIPSIS),
    ],
)
def test_mask(key: str, expected: str) -> None:
    assert mask(key) == expected


@pytest.mark.parametrize(
    "key",
    ["sk-abcdefghijklmnop1234", "abcdefghijklmnopqrstuvwxyz0123456789", "short", "sk-12345678"],
)
def test_mask_never_contains_the_key(key: str) -> None:
    assert key not in mask(key)
    assert key not in mask_credential_value(f"Bearer {key}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer sk-abcdefghijklmnop1234", "Bearer sk-…1234"),
        ("bearer sk-abcdefghijklmnop1234", "bearer sk-…1234"),
        ("Bearer  sk-abcdefghijklmnop1234", "Bearer sk-…1234"),
        ("Bearer short", f"Bearer {ELLIPSIS}"),
        ("Basic dXNlcjpwYXNzd29yZDEyMzQ1Njc4", "Basic …Njc4"),
        ("sk-abcdefghijklmnop1234", "sk-…1234"),  # a bare key (x-api-key, ?key=)
        ("Bearer", ELLIPSIS),
        ("Bearer ", ELLIPSIS),
        ("", ELLIPSIS),
    ],
)
def test_mask_credential_value(value: str, expected: str) -> None:
    assert mask_credential_value(value) == expected


@pytest.mark.parametrize(
    "key", ["sk-abcdefghijklmnop1234", "x", "ключ-с-юникодом-1234567890", "a" * 200]
)
def test_fingerprint_is_stable_and_hides_the_key(key: str) -> None:
    fp = fingerprint(key)
    assert fp == fingerprint(key)
    assert fp.startswith("sha256:")
    assert len(fp) == len("sha256:") + 16
    assert all(c in "0123456789abcdef" for c in fp.removeprefix("sha256:"))
    assert key not in fp


def test_fingerprint_differs_per_key() -> None:
    keys = [
        "sk-abcdefghijklmnop1234",
        "sk-abcdefghijklmnop1235",
        "sk-abcdefghijklmnop1234 ",
        "SK-abcdefghijklmnop1234",
        "",
    ]
    assert len({fingerprint(k) for k in keys}) == len(keys)
