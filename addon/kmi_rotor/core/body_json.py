"""A request body read as JSON once: the token estimate (`core/tokens.py`), the model
(`core/scope.py`) and the stream flag (`request_body.py`) all read the same parse, instead of
each parsing the body again (a long conversation's body costs more to parse than everything
else kmi-rotor does for the request)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_BODY = 8 * 1024 * 1024
"""Larger bodies are not parsed: they count by their size."""


@dataclass(slots=True, unsafe_hash=True)
class BodyJSON:
    """What one parse of a request body found. Read it, never change it: it is shared. (Not
    frozen, for the cost: one is made for every request, and a frozen dataclass costs about
    three times more to make; compared and hashed as a frozen one.)"""

    data: dict[str, Any] | None
    """The body's JSON object; None when the body is empty, larger than `MAX_BODY`, not JSON,
    or JSON that is not an object."""
    too_deep: bool = False
    """The body is JSON nested too deeply for the parser (no provider could read it either)."""


NOTHING = BodyJSON(None)
_DECODER = json.JSONDecoder()
"""What `json.loads` decodes with when given no options."""
_SCAN = _DECODER.scan_once
"""The decoder's scanner: the value at an index of a text, and where it ends."""
_BRACE = ord("{")


def read_json(body: bytes | None) -> BodyJSON:
    """Parse `body` once (never raises)."""
    if not body or len(body) > MAX_BODY:
        return NOTHING
    try:
        if body[0] == _BRACE and body[1:2] != b"\x00":
            # What `json.loads` does with bytes it detects as UTF-8 (an object's `{` first,
            # no BOM, not UTF-16/32), without its detection and checks: the body is one.
            text = body.decode("utf-8", "surrogatepass")
            # `_DECODER.decode(text)`'s own first step (its scanner from 0: there is no
            # whitespace before the `{` to skip); it is asked the rest only when the object
            # does not end the text (whitespace after it, extra data).
            data, end = _SCAN(text, 0)
            if end != len(text):
                data = _DECODER.decode(text)
        else:
            data = json.loads(body)
    except RecursionError:
        return BodyJSON(None, too_deep=True)
    except (ValueError, UnicodeDecodeError, StopIteration):  # (the scanner's "no value")
        return NOTHING
    return BodyJSON(data) if isinstance(data, dict) else NOTHING


__all__ = ["MAX_BODY", "NOTHING", "BodyJSON", "read_json"]
