"""How a key is shown and identified without ever being shown."""

from __future__ import annotations

import hashlib

_ELLIPSIS = "…"


def fingerprint(key: str) -> str:
    """A stable, non-reversible identifier of a key (state is matched on it, never on labels)."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def mask(key: str) -> str:
    """`sk-…wxyz`: enough to tell keys apart, never enough to use one.

    Short values show nothing at all: four characters of an eight-character key is half of it.
    """
    if len(key) < 16:
        return _ELLIPSIS
    prefix = ""
    for sep in ("-", "_"):
        head, found, _ = key.partition(sep)
        if found and 0 < len(head) <= 4:
            prefix = head + sep
            break
    return f"{prefix}{_ELLIPSIS}{key[-4:]}"


def mask_credential_value(value: str) -> str:
    """Mask a credential as it appears in a header: `Bearer sk-…wxyz`, scheme kept."""
    scheme, sep, rest = value.partition(" ")
    if sep and rest and scheme.isalpha():
        return f"{scheme} {mask(rest.strip())}"
    return mask(value)
