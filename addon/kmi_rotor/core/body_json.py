"""A request body read as JSON once: the token estimate (`core/tokens.py`), the model
(`core/scope.py`) and the stream flag (`request_body.py`) all read the same parse, instead of
each parsing the body again (a long conversation's body costs more to parse than everything
else kmi-rotor does for the request).

What kmi-rotor reads of a body is its top level: the model, the stream flag, token limits,
small options. A body larger than `WHOLE` is therefore read one level deep: each top-level
value as its bytes, and only the scalars and the small objects and arrays among them turned
into Python values; a larger one (a conversation, a list of tools, an image) stays `Unread`.
Reading it costs a pass over its bytes and nothing per element: 8 MB of tiny objects cost
about 30 ms and no memory, where turning them into Python objects held the event loop for
0.2 s and took 200 MB. A body that large is read only if it is standard JSON (see
`_read_large`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec

MAX_BODY = 8 * 1024 * 1024
"""Larger bodies are not parsed: they count by their size."""
WHOLE = 32 * 1024
"""Bodies up to this size are read whole (a few thousand elements at most)."""
SMALL_VALUE = 4 * 1024
"""A top-level object or array of a larger body is read when it is at most this large."""


class Unread:
    """A top-level object or array of a large body, kept as its bytes (`raw`), not read."""

    __slots__ = ("raw",)

    def __init__(self, raw: msgspec.Raw) -> None:
        self.raw = raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unread) and self.raw == other.raw

    def __repr__(self) -> str:
        return f"Unread({len(self.raw)} bytes)"


@dataclass(slots=True, unsafe_hash=True)
class BodyJSON:
    """What one parse of a request body found. Read it, never change it: it is shared. (Not
    frozen, for the cost: one is made for every request, and a frozen dataclass costs about
    three times more to make; compared and hashed as a frozen one.)"""

    data: dict[str, Any] | None
    """The body's JSON object; None when the body is empty, larger than `MAX_BODY`, not JSON,
    or JSON that is not an object. In a body larger than `WHOLE`, a top-level object or array
    larger than `SMALL_VALUE` is `Unread`."""
    too_deep: bool = False
    """The body is JSON nested too deeply for the parser (no provider could read it either)."""
    parts: dict[str, msgspec.Raw] | None = field(default=None, compare=False, repr=False)
    """The top-level values as their bytes, when the body was read one level deep: what a
    rewrite of one of them (`rebuilt`) keeps of the others."""


NOTHING = BodyJSON(None)
_READ = msgspec.json.Decoder().decode
"""A JSON text to Python values, four to six times faster than `json.loads` (a long
conversation's body: 200 KB in about 75 µs instead of 315). Where it reads a body, it reads
what `json.loads` reads; what it refuses (NaN and infinities, a byte-order mark, UTF-16,
lone surrogates, numbers out of range, garbage) goes, in a body up to `WHOLE`, to
`json.loads`'s own path, which decides as before."""
_TOP = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
"""An object's members, each value as its bytes: the JSON checked, nothing else made."""
_CHECK = msgspec.json.Decoder(msgspec.Raw).decode
"""A JSON text checked (its depth too), nothing made of it."""
JSON_SPACE = b" \t\r\n"
"""The whitespace JSON allows around a value."""
_KEY = msgspec.json.Encoder().encode
_OPENERS = frozenset(b"[{")


def read_json(body: bytes | None) -> BodyJSON:
    """Parse `body` once (never raises)."""
    if not body or len(body) > MAX_BODY:
        return NOTHING
    if len(body) > WHOLE:
        return _read_large(body)
    try:
        data = _READ(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return _read_leniently(body)
    return BodyJSON(data) if isinstance(data, dict) else NOTHING


def _read_large(body: bytes) -> BodyJSON:
    """`top_level(body)`; a body it refuses is no JSON object, without a second reading.

    Only a body of standard JSON (RFC 8259: UTF-8, numbers without NaN or infinities) is read
    past `WHOLE`. `json.loads` would read more (those, a byte-order mark, UTF-16), but reading
    a large body with it held the event loop: 0.3 s for 8 MB of a top-level array. Such a
    body counts by its size, as any body that is not JSON."""
    try:
        return top_level(body)
    except RecursionError:
        return BodyJSON(None, too_deep=True)
    except (msgspec.DecodeError, UnicodeDecodeError):
        # An array is refused at its first byte: only its depth is looked at (in one pass).
        if body.lstrip(JSON_SPACE)[:1] == b"[" and _too_deep(body):
            return BodyJSON(None, too_deep=True)
        return NOTHING


def _too_deep(body: bytes) -> bool:
    """Whether `body` nests deeper than msgspec reads (nothing is made of it)."""
    try:
        _CHECK(body)
    except RecursionError:
        return True
    except (msgspec.DecodeError, UnicodeDecodeError):
        pass
    return False


def top_level(body: bytes) -> BodyJSON:
    """`body` read one level deep, whatever its size (see the module). Raises what msgspec
    raises on what it does not read (not an object, not JSON, too deep)."""
    parts = _TOP(body)
    data = {}
    for name, raw in parts.items():
        if len(raw) > SMALL_VALUE and memoryview(raw)[0] in _OPENERS:
            data[name] = Unread(raw)
        else:
            data[name] = _READ(raw)
    return BodyJSON(data, parts=parts)


def rebuilt(parts: dict[str, msgspec.Raw], name: str, value: Any) -> bytes:
    """The object of `parts` with `name` set to `value` (last when it is new), every other
    value the bytes it was (the names written again, as JSON writes them)."""
    out: list[bytes | msgspec.Raw] = []
    for key, raw in {**parts, name: _KEY(value)}.items():
        out += (b",", _KEY(key), b":", raw)
    out[0] = b"{"
    out.append(b"}")
    return b"".join(out)


def _read_leniently(body: bytes) -> BodyJSON:
    """`read_json` of what msgspec refused, as `json.loads` reads it."""
    try:
        data = json.loads(body)
    except RecursionError:
        return BodyJSON(None, too_deep=True)
    except (ValueError, UnicodeDecodeError):
        return NOTHING
    return BodyJSON(data) if isinstance(data, dict) else NOTHING


__all__ = [
    "JSON_SPACE",
    "MAX_BODY",
    "NOTHING",
    "BodyJSON",
    "Unread",
    "read_json",
    "rebuilt",
    "top_level",
]
