"""HTTP header fields read and rewritten as raw `(name, value)` byte pairs, in one pass.

mitmproxy's `Headers` answers every `get`, `in`, `[]=` and `pop` by walking all its fields and
converting each name: a few such calls per answer cost more than one pass over the pairs. These
functions give the same results as those calls (names compared case-insensitively, repeated
values of `get` joined with ", ", an existing field's name kept as the peer spelled it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

Fields = tuple[tuple[bytes, bytes], ...]


def field_value(fields: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """What `Headers.get(name)` gives: every value of `name` (lower-case) joined with ", ",
    decoded as mitmproxy does; None when there is none."""
    n = len(name)  # a name of another length is not lowered (no new bytes per field)
    values = [v for k, v in fields if len(k) == n and k.lower() == name]
    if not values:
        return None
    if len(values) == 1:  # the usual case: nothing to join
        return values[0].decode("utf-8", "surrogateescape")
    return ", ".join(v.decode("utf-8", "surrogateescape") for v in values)


def has_field(fields: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    """What `name in headers` gives (`name` lower-case)."""
    n = len(name)
    return any(len(k) == n and k.lower() == name for k, _ in fields)


def field_positions(fields: Fields, name: bytes) -> list[int]:
    """Where the fields named `name` (lower-case) are, in order."""
    n = len(name)  # a name of another length is not lowered (no new bytes per field)
    return [i for i, (k, _) in enumerate(fields) if len(k) == n and k.lower() == name]


def with_field_at(fields: Fields, i: int, value: bytes) -> Fields:
    """The fields with the `i`th one's value replaced, its name kept as it is spelled: what
    `with_fields(fields, {name: value})` gives when it is the only field of its name."""
    return (*fields[:i], (fields[i][0], value), *fields[i + 1 :])


def with_fields(
    fields: Iterable[tuple[bytes, bytes]], updates: Mapping[bytes, bytes | None]
) -> Fields:
    """The fields with each name of `updates` (lower-case) set to its value, as
    `headers[name] = value` does (the first field of that name keeps its place and spelling,
    later ones go, a new one is appended), or removed for None, as `headers.pop(name)` does."""
    lengths = {len(k) for k in updates}  # a name of another length is not lowered
    pending = dict(updates)
    out: list[tuple[bytes, bytes]] = []
    for field in fields:  # a field kept is kept as it is, not rebuilt
        name = field[0]
        if len(name) not in lengths or (low := name.lower()) not in updates:
            out.append(field)
        elif low in pending:
            new = pending.pop(low)
            if new is not None:
                out.append((name, new))
    if pending:  # names not there yet, appended
        out.extend((k, v) for k, v in pending.items() if v is not None)
    return tuple(out)
